"""GPT-NeoX / Pythia (``GPTNeoXModel``, ``GPTNeoXForCausalLM``): pre-LayerNorm, parallel residual,
partial rotary positions, fused ``query_key_value`` laid out per head as (heads, 3, head_dim),
head_dim = hidden_size / num_attention_heads, untied ``embed_out`` head."""

from .base import TINY_SIZES, ArchAdapter, ConfigOption, P, TinyConfig, hf_size_keys, register_adapter

GPT_NEOX = register_adapter(
    ArchAdapter(
        name="gpt_neox",
        model_types=("gpt_neox",),
        layers_path="layers",
        params={
            "embed_in.weight": P("embed", None, "hidden.out"),
            "final_layer_norm.weight": P("final_norm", "hidden.gain"),
            "final_layer_norm.bias": P("final_norm", "hidden.shift"),
        },
        layer_params={
            "input_layernorm.weight": P("norm", "hidden.gain"),
            "input_layernorm.bias": P("norm", "hidden.shift"),
            "post_attention_layernorm.weight": P("norm", "hidden.gain"),
            "post_attention_layernorm.bias": P("norm", "hidden.shift"),
            "attention.query_key_value.weight": P("qkv", "qkv.out", "hidden.in"),
            "attention.query_key_value.bias": P("qkv", "qkv.out"),
            "attention.dense.weight": P("o", "hidden.out", "o.in"),
            "attention.dense.bias": P("o", "hidden.out"),
            "mlp.dense_h_to_4h.weight": P("up", "ffn.out", "hidden.in"),
            "mlp.dense_h_to_4h.bias": P("up", "ffn.out"),
            "mlp.dense_4h_to_h.weight": P("down", "hidden.out", "ffn.in"),
            "mlp.dense_4h_to_h.bias": P("down", "hidden.out"),
        },
        head_params={"embed_out.weight": P("head", None, "hidden.in"), "lm_head.weight": P("head", None, "hidden.in")},
        config_keys=hf_size_keys(kv_heads=None, head_dim=None, norm_eps="layer_norm_eps"),
        norm="layernorm",
        pre_norm=True,
        rotary=True,
        fused_qkv="per_head",
        config_options={
            "use_parallel_residual": ConfigOption(
                "x + attn(ln1 x) + mlp(ln2 x) or sequential blocks; both pre-norm, a block with zero "
                "output projections is the identity either way"
            ),
            "rope_parameters": ConfigOption(
                "rotary variant, base and partial_rotary_factor (rotary_pct): the rotary dims are "
                "int(head_dim * factor) and head_dim is kept fixed, so positions are unchanged"
            ),
            "attention_bias": ConfigOption("q|k|v and output projection biases, grown like their weights"),
            "hidden_act": ConfigOption(
                "any activation: new FFN units write through zero output columns, so f(0) never reaches "
                "the stream"
            ),
        },
        tiny_configs=(
            TinyConfig("parallel", dict(TINY_SIZES, use_parallel_residual=True)),
            TinyConfig("sequential-tied", dict(TINY_SIZES, use_parallel_residual=False, tie_word_embeddings=True)),
        ),
    )
)
