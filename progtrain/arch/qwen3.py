"""Qwen3 (``Qwen3Model``, ``Qwen3ForCausalLM``): Qwen2's layout (Llama's, with a ``layer_types`` list
and the ``max_window_layers`` threshold) plus an RMSNorm on every query and key head
(``self_attn.q_norm`` / ``k_norm``, one ``head_dim``-sized gain shared by all heads, epsilon
``rms_norm_eps``).

The q/k norms normalise each head over its own ``head_dim``, which the growth keeps fixed (rotary
positions), so they never grow: new heads share the gain, and tiling the stream leaves every q/k row
unchanged. Only a non-integer widening touches them, through the shared epsilon (see
``ArchAdapter.qk_norm``).
"""

import dataclasses

from .base import ConfigOption, P, gqa_tiny_configs, register_adapter
from .llama import llama_like

_PER_LAYER = (
    "sliding or full attention per layer, as listed in layer_types (derived from use_sliding_window, "
    "sliding_window and max_window_layers); depth growth rebuilds layer_types so that every block "
    "keeps its own attention type and a new block takes its source block's"
)

_BASE = llama_like(
    "qwen3",
    ("qwen3",),
    {
        "attention_bias": ConfigOption("q/k/v/o biases, grown like their weights"),
        "layer_types": ConfigOption(_PER_LAYER),
        "use_sliding_window": ConfigOption(_PER_LAYER),
        "sliding_window": ConfigOption(_PER_LAYER),
        "max_window_layers": ConfigOption(_PER_LAYER),
        "rms_norm_eps": ConfigOption(
            "epsilon of every RMSNorm, the q/k norms included; a non-integer widening scales it by d/D "
            "and the q/k rows by sqrt(d/D), which gives the q/k norms their old epsilon back"
        ),
    },
)

QWEN3 = register_adapter(
    dataclasses.replace(
        _BASE,
        layer_params={
            **_BASE.layer_params,
            "self_attn.q_norm.weight": P("q_norm", None),  # (head_dim,): shared by every query head
            "self_attn.k_norm.weight": P("k_norm", None),
        },
        layer_threshold_config_keys=("max_window_layers",),
        qk_norm="head",
        tiny_configs=gqa_tiny_configs(("attention_bias",), head_dim=8),
    )
)
