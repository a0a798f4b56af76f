"""Gemma 3 text (``Gemma3TextModel``, ``Gemma3ForCausalLM``, ``model_type="gemma3_text"``): Gemma 2's
layout plus per-head q/k RMSNorms over head_dim (``q_norm``/``k_norm``; head_dim is kept fixed, so
they never grow), and rotary parameters per attention type (``rope_parameters`` keyed by
``sliding_attention`` / ``full_attention``), which follow each block through ``layer_types``. The
multimodal ``Gemma3ForConditionalGeneration`` (``model_type="gemma3"``) is not described."""

from __future__ import annotations

from .base import ConfigOption, P, gqa_tiny_configs, register_adapter
from .gemma import gemma_like, query_pre_attn_scalar_scale
from .gemma2 import GEMMA2_OPTIONS, SANDWICH_NORMS

GEMMA3_TEXT = register_adapter(
    gemma_like(
        "gemma3_text",
        ("gemma3_text",),
        {
            **SANDWICH_NORMS,
            "self_attn.q_norm.weight": P("q_norm", None),
            "self_attn.k_norm.weight": P("k_norm", None),
        },
        {
            **GEMMA2_OPTIONS,
            "rope_parameters": ConfigOption(
                "rotary parameters per attention type (sliding_attention / full_attention): each block "
                "keeps its type through layer_types, and head_dim is kept fixed"
            ),
        },
        without_options=("hidden_act",),  # hidden_activation instead
        attention_scale=query_pre_attn_scalar_scale,
        tiny_configs=gqa_tiny_configs(
            ("attention_bias",), head_dim=8, sliding_window=4, query_pre_attn_scalar=16, final_logit_softcapping=5.0,
            layer_types=["sliding_attention", "full_attention"],
        ),
    )
)
