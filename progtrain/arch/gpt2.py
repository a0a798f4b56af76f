"""GPT-2 (``GPT2Model``, ``GPT2LMHeadModel``): Conv1D weights stored [in, out], fused [q|k|v] output,
pre-LayerNorm, learned positions, head_dim = n_embd / n_head, LM head tied to ``wte`` by default."""

from .base import ArchAdapter, P, register_adapter

GPT2 = register_adapter(
    ArchAdapter(
        name="gpt2",
        model_types=("gpt2",),
        layers_path="h",
        params={
            "wte.weight": P("embed", None, "hidden.out"),
            "wpe.weight": P("pos_embed", None, "hidden.out"),
            "ln_f.weight": P("final_norm", "hidden.gain"),
            "ln_f.bias": P("final_norm", "hidden.shift"),
        },
        layer_params={
            "ln_1.weight": P("norm", "hidden.gain"),
            "ln_1.bias": P("norm", "hidden.shift"),
            "attn.c_attn.weight": P("qkv", "hidden.in", "qkv.out"),
            "attn.c_attn.bias": P("qkv", "qkv.out"),
            "attn.c_proj.weight": P("o", "o.in", "hidden.out"),
            "attn.c_proj.bias": P("o", "hidden.out"),
            "ln_2.weight": P("norm", "hidden.gain"),
            "ln_2.bias": P("norm", "hidden.shift"),
            "mlp.c_fc.weight": P("up", "hidden.in", "ffn.out"),
            "mlp.c_fc.bias": P("up", "ffn.out"),
            "mlp.c_proj.weight": P("down", "ffn.in", "hidden.out"),
            "mlp.c_proj.bias": P("down", "hidden.out"),
        },
        head_params={"lm_head.weight": P("head", None, "hidden.in")},
        config_keys={
            "hidden": "n_embd",
            "heads": "n_head",
            "kv_heads": None,
            "ffn": "n_inner",
            "layers": "n_layer",
            "head_dim": None,
            "norm_eps": "layer_norm_epsilon",
        },
        norm="layernorm",
        pre_norm=True,
        fused_qkv="concat",
        default_ffn=lambda c: 4 * c.n_embd,
    )
)
