"""Qwen2 (``Qwen2Model``, ``Qwen2ForCausalLM``): Llama's layout with q/k/v biases and a per-layer
``layer_types`` list (rebuilt on depth growth)."""

from .base import register_adapter
from .llama import llama_like

QWEN2 = register_adapter(llama_like("qwen2", ("qwen2",)))
