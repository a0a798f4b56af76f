"""Gemma (``GemmaModel``, ``GemmaForCausalLM``): Llama's layout with an RMSNorm that computes
``x_hat * (1 + weight)`` (``norm_offset=1``), token embeddings multiplied by ``sqrt(hidden_size)``
(``embed_scale``; the growth rescales the embedding rows by sqrt(d/D) and a tied head's input norm
by the inverse) and a tied LM head by default. :func:`gemma_like` is the layout Gemma 2 and Gemma 3
extend."""

from __future__ import annotations

import dataclasses
import math

from transformers import PretrainedConfig

from .base import ArchAdapter, ConfigOption, ParamSpec, gqa_tiny_configs, register_adapter
from .llama import llama_like


def gemma_embed_scale(config: PretrainedConfig, hidden: int) -> float:
    """``GemmaTextScaledWordEmbedding``: the token embedding is multiplied by ``sqrt(hidden_size)``."""
    return math.sqrt(hidden)


def query_pre_attn_scalar_scale(config: PretrainedConfig, layer: int, head_dim: int) -> float:
    """Gemma 2 / 3 attention: q.k times ``query_pre_attn_scalar ** -0.5``, whatever the head_dim."""
    return float(getattr(config, "query_pre_attn_scalar", head_dim)) ** -0.5


#: Options every Gemma generation has.
GEMMA_OPTIONS = {
    "attention_bias": ConfigOption("q/k/v/o biases, grown like their weights"),
    "use_bidirectional_attention": ConfigOption(
        "bidirectional instead of causal attention mask, the same in every layer; new blocks are identities"
    ),
}


def gemma_like(
    name: str,
    model_types: tuple[str, ...],
    layer_params: dict[str, ParamSpec] | None = None,
    config_options: dict[str, ConfigOption] | None = None,
    without_options: tuple[str, ...] = (),
    **fields,
) -> ArchAdapter:
    """A Gemma-family adapter: :func:`~progtrain.arch.llama.llama_like` with Gemma's norm offset and
    embedding scale; ``layer_params`` are added to Llama's, ``without_options`` names Llama options the
    family's config does not have, ``fields`` replace adapter fields."""
    base = llama_like(name, model_types, {**GEMMA_OPTIONS, **(config_options or {})})
    return dataclasses.replace(
        base,
        config_options={k: v for k, v in base.config_options.items() if k not in without_options},
        layer_params={**base.layer_params, **(layer_params or {})},
        norm_offset=1.0,
        embed_scale=gemma_embed_scale,
        **fields,
    )


GEMMA = register_adapter(
    gemma_like("gemma", ("gemma",), tiny_configs=gqa_tiny_configs(("attention_bias",), head_dim=8))
)
