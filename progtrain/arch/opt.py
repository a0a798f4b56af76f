"""OPT (``OPTModel``, ``OPTForCausalLM``): learned positions read at ``position + 2`` (the table has
``max_position_embeddings + 2`` rows and never grows), q/k/v/out and FFN biases (``enable_bias``),
LayerNorm before (``do_layer_norm_before=True``, pre-norm) or after (post-norm, OPT-350m) each
sub-layer, an LM head tied to the token embedding.

When ``word_embed_proj_dim != hidden_size`` (OPT-350m) the token embedding and the head live in the
``word_embed_proj_dim`` space and the stream is entered through ``project_in`` and left through
``project_out``: the embedding and head never grow, ``project_in`` writes the stream, ``project_out``
reads it (its fan-in is split under tiling), and the final LayerNorm is an ordinary norm (its output
reaches the head through ``project_out``). :func:`opt_for_config` picks that layout and the pre- or
post-norm flag per config; ``word_embed_proj_dim`` follows ``hidden_size`` when they are equal."""

from __future__ import annotations

import dataclasses

from transformers import PretrainedConfig

from .base import ArchAdapter, ConfigOption, P, TinyConfig, hf_size_keys, register_adapter

_OPTIONS = {
    "enable_bias": ConfigOption("q/k/v/out and fc1/fc2 biases, grown like their weights"),
    "activation_function": ConfigOption(
        "any activation: new FFN units write through zero fc2 columns, so f(0) never reaches the stream"
    ),
    "do_layer_norm_before": ConfigOption(
        "pre-norm (True) or post-norm (False) blocks; post-norm widening by a non-integer factor and depth "
        "growth are approximate, as for BERT"
    ),
    "word_embed_proj_dim": ConfigOption(
        "token embedding width: equal to hidden_size it follows hidden_size; otherwise the embedding and head "
        "stay at word_embed_proj_dim and project_in / project_out grow with the stream"
    ),
    "layer_norm_elementwise_affine": ConfigOption(
        "LayerNorms without gain and bias cannot carry the rescaling that keeps widening exact",
        allowed=(True,),
    ),
    "_remove_final_layer_norm": ConfigOption(
        "a pre-norm model without final LayerNorm (legacy OPT-350m conversion flag) has no norm in front of "
        "the head to carry the rescaling of a widened stream",
        allowed=(False,),
    ),
}

_POST_NORM_TIED = ConfigOption(
    "a post-norm OPT without project_out and with a tied head feeds the last block's LayerNorm, which also "
    "writes the stream, straight into the head, so a widened stream cannot be rescaled for the head alone; "
    "untie the head (tie_word_embeddings=False) or use a pre-norm model",
    allowed=(True,),
)


def opt_for_config(adapter: ArchAdapter, config: PretrainedConfig) -> ArchAdapter:
    """The OPT adapter of one config: pre- or post-norm, with or without ``project_in``/``project_out``."""
    pre = bool(getattr(config, "do_layer_norm_before", True))
    projected = getattr(config, "word_embed_proj_dim", config.hidden_size) != config.hidden_size
    if pre and not projected:
        return adapter
    params, head, options = dict(adapter.params), dict(adapter.head_params), dict(adapter.config_options)
    if projected:
        params.update(
            {
                "decoder.embed_tokens.weight": P("embed", None, None),
                "decoder.project_in.weight": P("embed_proj", "hidden.out", None),
                "decoder.project_out.weight": P("head_proj", None, "hidden.in"),
                # its output reaches the head through project_out, whose split fan-in carries the rescaling
                "decoder.final_layer_norm.weight": P("norm", "hidden.gain"),
                "decoder.final_layer_norm.bias": P("norm", "hidden.shift"),
            }
        )
        head["lm_head.weight"] = P("head", None, None)
    elif not pre and getattr(config, "tie_word_embeddings", True):
        options["do_layer_norm_before"] = _POST_NORM_TIED
    return dataclasses.replace(
        adapter, params=params, head_params=head, pre_norm=pre, config_options=options, for_config=None
    )


_TINY = dict(hidden_size=32, num_attention_heads=4, ffn_dim=64, num_hidden_layers=2, vocab_size=101,
             max_position_embeddings=64)

OPT = register_adapter(
    ArchAdapter(
        name="opt",
        model_types=("opt",),
        layers_path="decoder.layers",
        params={
            "decoder.embed_tokens.weight": P("embed", None, "hidden.out"),
            "decoder.embed_positions.weight": P("pos_embed", None, "hidden.out"),
            "decoder.final_layer_norm.weight": P("final_norm", "hidden.gain"),
            "decoder.final_layer_norm.bias": P("final_norm", "hidden.shift"),
        },
        layer_params={
            "self_attn_layer_norm.weight": P("norm", "hidden.gain"),
            "self_attn_layer_norm.bias": P("norm", "hidden.shift"),
            "self_attn.q_proj.weight": P("q", "q.out", "hidden.in"),
            "self_attn.q_proj.bias": P("q", "q.out"),
            "self_attn.k_proj.weight": P("k", "k.out", "hidden.in"),
            "self_attn.k_proj.bias": P("k", "k.out"),
            "self_attn.v_proj.weight": P("v", "v.out", "hidden.in"),
            "self_attn.v_proj.bias": P("v", "v.out"),
            "self_attn.out_proj.weight": P("o", "hidden.out", "o.in"),
            "self_attn.out_proj.bias": P("o", "hidden.out"),
            "final_layer_norm.weight": P("norm", "hidden.gain"),
            "final_layer_norm.bias": P("norm", "hidden.shift"),
            "fc1.weight": P("up", "ffn.out", "hidden.in"),
            "fc1.bias": P("up", "ffn.out"),
            "fc2.weight": P("down", "hidden.out", "ffn.in"),
            "fc2.bias": P("down", "hidden.out"),
        },
        head_params={"lm_head.weight": P("head", None, "hidden.in")},
        # norm_eps None: OPT's LayerNorm eps is nn.LayerNorm's default 1e-5, not a config option
        config_keys=hf_size_keys(kv_heads=None, ffn="ffn_dim", head_dim=None, norm_eps=None),
        norm="layernorm",
        pre_norm=True,
        config_options=_OPTIONS,
        hidden_follow_keys=("word_embed_proj_dim",),
        for_config=opt_for_config,
        tiny_configs=(
            TinyConfig("tied", dict(_TINY, tie_word_embeddings=True)),
            TinyConfig("untied", dict(_TINY, tie_word_embeddings=False)),
            TinyConfig("post-norm", dict(_TINY, do_layer_norm_before=False, tie_word_embeddings=False)),
            TinyConfig("projected", dict(_TINY, word_embed_proj_dim=16)),  # project_in / project_out (OPT-350m)
        ),
    )
)
