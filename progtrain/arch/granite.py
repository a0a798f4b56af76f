"""Granite (``GraniteModel``, ``GraniteForCausalLM``): Llama's layout with four scalar multipliers
(muP-style): ``embedding_multiplier`` (embeddings times m), ``residual_multiplier`` (each block's
attention and FFN output times r before it is added to the stream), ``attention_multiplier`` (the
softmax scale, in place of 1/sqrt(head_dim)) and ``logits_scaling`` (logits divided by s). No
``head_dim`` key: head_dim = hidden_size / num_attention_heads, kept fixed (rotary).

None of the four is computed from the width inside the model: each is a fixed config number. muP
checkpoints often chose them from the width (e.g. logits_scaling = hidden / base width), but the
function only depends on the numbers, so the growth keeps every multiplier as it is and stays exact
(a zero-output block times r is still zero; tiled embeddings times m are still tiled). Re-tuning them
for the wider model is a training decision, not part of the growth.
"""

import dataclasses

from transformers import PretrainedConfig

from .base import ConfigOption, gqa_tiny_configs, register_adapter
from .llama import llama_like


def _granite_attention_scale(config: PretrainedConfig, layer: int, head_dim: int) -> float:
    """Granite multiplies q.k by ``attention_multiplier`` (not 1/sqrt(head_dim)) in every layer."""
    return float(getattr(config, "attention_multiplier", 1.0))


_KEPT = "a fixed config number, kept by the growth: "

_BASE = llama_like(
    "granite",
    ("granite",),
    {
        "attention_bias": ConfigOption("q/k/v/o biases, grown like their weights"),
        "mlp_bias": ConfigOption("gate/up/down biases, grown like their weights"),
        "embedding_multiplier": ConfigOption(_KEPT + "tiled or zero-padded embeddings times m stay so"),
        "residual_multiplier": ConfigOption(
            _KEPT + "every block output is scaled by r before the residual add; a new block writes r * 0"
        ),
        "attention_multiplier": ConfigOption(
            _KEPT + "the softmax scale of every layer (the adapter's attention-scale law), head_dim is fixed"
        ),
        "logits_scaling": ConfigOption(_KEPT + "logits are divided by it after the unchanged LM head"),
    },
)
_BASE.config_options.pop("head_dim")  # GraniteConfig has no head_dim: it is hidden / heads

GRANITE = register_adapter(
    dataclasses.replace(
        _BASE,
        config_keys={**_BASE.config_keys, "head_dim": None},
        attention_scale=_granite_attention_scale,
        # multipliers far from 1 (Granite-3 values), so a growth that ignored one would show
        tiny_configs=gqa_tiny_configs(
            ("attention_bias", "mlp_bias"), embedding_multiplier=12.0, residual_multiplier=0.22,
            attention_multiplier=0.0625, logits_scaling=8.0,
        ),
    )
)
