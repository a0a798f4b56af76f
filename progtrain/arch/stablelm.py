"""StableLM (``StableLmModel``, ``StableLmForCausalLM``): Llama's projections and SwiGLU FFN with
pre-LayerNorm (weight and bias), partial rotary positions (``partial_rotary_factor``, default 0.25),
optional q/k/v biases, an optional parallel residual (``x + attn(ln1 x) + mlp(ln1 x)``, no
``post_attention_layernorm``) and optional per-head q/k LayerNorms (``qk_layernorm``: one
``nn.LayerNorm(head_dim)`` module per query head and per kv head). head_dim = hidden_size /
num_attention_heads, kept fixed (rotary), so the head count follows the width.

With ``qk_layernorm`` the per-head norms are separate modules named by their head index
(``q_layernorm.norms.{h}``): the growth keeps them for FFN and depth growth and refuses a growth that
changes the head count (which any widening does, head_dim being fixed).
"""

from .base import TINY_SIZES, ArchAdapter, ConfigOption, P, TinyConfig, gqa_tiny_configs, hf_size_keys, register_adapter
from .llama import LLAMA_LIKE_OPTIONS

STABLELM = register_adapter(
    ArchAdapter(
        name="stablelm",
        model_types=("stablelm",),
        layers_path="layers",
        params={
            "embed_tokens.weight": P("embed", None, "hidden.out"),
            "norm.weight": P("final_norm", "hidden.gain"),
            "norm.bias": P("final_norm", "hidden.shift"),
        },
        layer_params={
            "input_layernorm.weight": P("norm", "hidden.gain"),
            "input_layernorm.bias": P("norm", "hidden.shift"),
            "post_attention_layernorm.weight": P("norm", "hidden.gain"),
            "post_attention_layernorm.bias": P("norm", "hidden.shift"),
            "self_attn.q_proj.weight": P("q", "q.out", "hidden.in"),
            "self_attn.q_proj.bias": P("q", "q.out"),
            "self_attn.k_proj.weight": P("k", "k.out", "hidden.in"),
            "self_attn.k_proj.bias": P("k", "k.out"),
            "self_attn.v_proj.weight": P("v", "v.out", "hidden.in"),
            "self_attn.v_proj.bias": P("v", "v.out"),
            "self_attn.o_proj.weight": P("o", "hidden.out", "o.in"),
            # (head_dim,) per head, one module per head: never grows (head_dim and heads are fixed)
            "self_attn.q_layernorm.norms.*.weight": P("q_norm", None),
            "self_attn.k_layernorm.norms.*.weight": P("k_norm", None),
            "mlp.gate_proj.weight": P("gate", "ffn.out", "hidden.in"),
            "mlp.up_proj.weight": P("up", "ffn.out", "hidden.in"),
            "mlp.down_proj.weight": P("down", "hidden.out", "ffn.in"),
        },
        head_params={"lm_head.weight": P("head", None, "hidden.in")},
        config_keys=hf_size_keys(head_dim=None, norm_eps="layer_norm_eps"),
        norm="layernorm",
        pre_norm=True,
        rotary=True,
        config_options={
            "rope_parameters": ConfigOption(
                "rotary variant, base and partial_rotary_factor: the rotary dims are "
                "int(head_dim * factor) and head_dim is kept fixed, so positions are unchanged"
            ),
            "use_qkv_bias": ConfigOption("q/k/v biases, grown like their weights"),
            "use_parallel_residual": ConfigOption(
                "x + attn(ln1 x) + mlp(ln1 x) or sequential blocks; both pre-norm, a block with zero "
                "output projections is the identity either way"
            ),
            "qk_layernorm": ConfigOption(
                "one LayerNorm module per query and kv head (self_attn.q_layernorm.norms.{h}), named by "
                "its head index, which progtrain does not renumber; grow intermediate_size or num_layers",
                fixes=("heads", "kv_heads"),
            ),
            "hidden_act": LLAMA_LIKE_OPTIONS["hidden_act"],
        },
        tiny_configs=(
            *gqa_tiny_configs(("use_qkv_bias",)),
            # per-head q/k LayerNorm modules (head growth refused) with the parallel residual
            TinyConfig("kv2-qk-layernorm-parallel", dict(TINY_SIZES, num_key_value_heads=2, qk_layernorm=True,
                                                        use_parallel_residual=True)),
        ),
    )
)
