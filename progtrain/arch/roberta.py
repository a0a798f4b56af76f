"""RoBERTa (``RobertaModel``, ``RobertaForMaskedLM``, ``RobertaForCausalLM``): BERT's layout (post-LayerNorm
blocks, learned positions and token types, a pooler) under the ``roberta`` prefix, with the MLM head at
``lm_head`` (dense, layer_norm, decoder tied to the word embeddings). Position ids start after
``pad_token_id`` (padding_idx + 1 + i); the position table never grows, so the offset is untouched."""

from __future__ import annotations

import dataclasses

from .base import P, TinyConfig, register_adapter
from .bert import BERT

ROBERTA = register_adapter(
    dataclasses.replace(
        BERT,
        name="roberta",
        model_types=("roberta",),
        head_params={
            "lm_head.dense.weight": P("head_transform", "hidden.out", "hidden.in"),
            "lm_head.dense.bias": P("head_transform", "hidden.out"),
            "lm_head.layer_norm.weight": P("final_norm", "hidden.gain"),
            "lm_head.layer_norm.bias": P("final_norm", "hidden.shift"),
            "lm_head.decoder.weight": P("head", None, "hidden.in"),
            "lm_head.decoder.bias": P("head_bias", None),
            "lm_head.bias": P("head_bias", None),
        },
        # RobertaConfig has no position_embedding_type: BERT's other options, as BERT grows them
        config_options={k: v for k, v in BERT.config_options.items() if k != "position_embedding_type"},
        # positions start after pad_token_id (1): the table holds max_position_embeddings - 2 positions
        tiny_configs=tuple(
            TinyConfig(t.name, dict(t.config, max_position_embeddings=66), t.task) for t in BERT.tiny_configs
        ),
    )
)
