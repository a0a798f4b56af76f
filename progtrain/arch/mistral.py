"""Mistral (``MistralModel``, ``MistralForCausalLM``): Llama's layout with sliding-window attention."""

from .base import ConfigOption, gqa_tiny_configs, register_adapter
from .llama import llama_like

MISTRAL = register_adapter(
    llama_like(
        "mistral",
        ("mistral",),
        {
            "sliding_window": ConfigOption(
                "every layer attends to the same window of past tokens; new blocks are identities"
            ),
        },
        gqa_tiny_configs(sliding_window=4),  # a window the 64-token probe and the generation cross
    )
)
