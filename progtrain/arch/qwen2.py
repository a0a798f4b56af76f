"""Qwen2 (``Qwen2Model``, ``Qwen2ForCausalLM``): Llama's layout with q/k/v biases, a per-layer
``layer_types`` list and the ``max_window_layers`` threshold (layers at or above it use the sliding
window), both rebuilt on depth growth."""

import dataclasses

from .base import register_adapter
from .llama import llama_like

QWEN2 = register_adapter(
    dataclasses.replace(llama_like("qwen2", ("qwen2",)), layer_threshold_config_keys=("max_window_layers",))
)
