"""Gemma 2 (``Gemma2Model``, ``Gemma2ForCausalLM``): Gemma's layout (x * (1 + w) RMSNorm, embeddings
times sqrt(hidden)) with norms after each sub-layer (``post_attention_layernorm`` and
``post_feedforward_layernorm`` normalise the sub-layer's output before it is added; zero ``o`` / ``down``
rows make RMSNorm(0) = 0, so new blocks are still identities), attention scaled by
``query_pre_attn_scalar ** -0.5``, tanh soft-capping of attention scores and final logits, and sliding
or full attention per layer (``layer_types``, rebuilt on depth growth)."""

from __future__ import annotations

from .base import ConfigOption, P, gqa_tiny_configs, register_adapter
from .gemma import gemma_like, query_pre_attn_scalar_scale

#: The pre/post norm pair around the FFN (Gemma 2 and 3).
SANDWICH_NORMS = {
    "pre_feedforward_layernorm.weight": P("norm", "hidden.gain"),
    "post_feedforward_layernorm.weight": P("norm", "hidden.gain"),
}

_PER_LAYER = (
    "sliding or full attention per layer, as listed in layer_types; depth growth rebuilds layer_types "
    "so that every block keeps its own attention type and a new block takes its source block's"
)

#: Options Gemma 2 and Gemma 3 share (Gemma 3 adds its own).
GEMMA2_OPTIONS = {
    "hidden_activation": ConfigOption(
        "any gate activation: new FFN units write through zero down columns, so f(0) never reaches the stream"
    ),
    "query_pre_attn_scalar": ConfigOption(
        "q.k is scaled by query_pre_attn_scalar ** -0.5, independent of head_dim and of the width; "
        "modelled by attention_scale (head_dim is kept fixed, so the scale never changes)"
    ),
    "attn_logit_softcapping": ConfigOption(
        "attention scores become cap * tanh(scores / cap); the growth keeps every score (q.k * scale) "
        "unchanged, so the capped scores are unchanged"
    ),
    "final_logit_softcapping": ConfigOption(
        "logits become cap * tanh(logits / cap); the growth keeps the logits, so the capped ones too"
    ),
    "sliding_window": ConfigOption(_PER_LAYER),
    "layer_types": ConfigOption(_PER_LAYER),
}

GEMMA2 = register_adapter(
    gemma_like(
        "gemma2",
        ("gemma2",),
        SANDWICH_NORMS,
        GEMMA2_OPTIONS,
        without_options=("hidden_act",),  # hidden_activation instead
        attention_scale=query_pre_attn_scalar_scale,
        # a window of 4 (the 64-token probe and the generation cross it), softcaps small enough to bend the
        # scores and logits, an attention scale that is not 1/sqrt(head_dim)
        tiny_configs=gqa_tiny_configs(
            ("attention_bias",), head_dim=8, sliding_window=4, query_pre_attn_scalar=16,
            attn_logit_softcapping=2.0, final_logit_softcapping=5.0,
        ),
    )
)
