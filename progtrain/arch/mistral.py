"""Mistral (``MistralModel``, ``MistralForCausalLM``): Llama's layout with sliding-window attention."""

from .base import register_adapter
from .llama import llama_like

MISTRAL = register_adapter(llama_like("mistral", ("mistral",)))
