"""Qwen2 (``Qwen2Model``, ``Qwen2ForCausalLM``): Llama's layout with q/k/v biases, a per-layer
``layer_types`` list and the ``max_window_layers`` threshold (layers at or above it use the sliding
window), both rebuilt on depth growth."""

import dataclasses

from .base import TINY_SIZES, ConfigOption, TinyConfig, gqa_tiny_configs, register_adapter
from .llama import llama_like

_PER_LAYER = (
    "sliding or full attention per layer, as listed in layer_types (derived from use_sliding_window, "
    "sliding_window and max_window_layers); depth growth rebuilds layer_types so that every block "
    "keeps its own attention type and a new block takes its source block's"
)

QWEN2 = register_adapter(
    dataclasses.replace(
        llama_like(
            "qwen2",
            ("qwen2",),
            {
                "layer_types": ConfigOption(_PER_LAYER),
                "use_sliding_window": ConfigOption(_PER_LAYER),
                "sliding_window": ConfigOption(_PER_LAYER),
                "max_window_layers": ConfigOption(_PER_LAYER),
            },
        ),
        layer_threshold_config_keys=("max_window_layers",),
        tiny_configs=(
            *gqa_tiny_configs(),
            # layer 1 (at max_window_layers and above) attends through a window of 4 tokens
            TinyConfig("kv2-sliding", dict(TINY_SIZES, num_key_value_heads=2, use_sliding_window=True,
                                           sliding_window=4, max_window_layers=1)),
        ),
    )
)
