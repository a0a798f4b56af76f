"""GPT-2 (``GPT2Model``, ``GPT2LMHeadModel``): Conv1D weights stored [in, out], fused [q|k|v] output,
pre-LayerNorm, learned positions, head_dim = n_embd / n_head, LM head tied to ``wte`` by default."""

from transformers import PretrainedConfig

from .base import ArchAdapter, ConfigOption, P, TinyConfig, register_adapter


_TINY = dict(n_embd=32, n_head=4, n_layer=2, vocab_size=101, n_positions=64, bos_token_id=1, eos_token_id=1)


def gpt2_attention_scale(config: PretrainedConfig, layer: int, head_dim: int) -> float:
    """``GPT2Attention.scaling``: 1/sqrt(head_dim) when ``scale_attn_weights``, else 1, and divided
    by ``layer + 1`` when ``scale_attn_by_inverse_layer_idx``."""
    s = head_dim**-0.5 if getattr(config, "scale_attn_weights", True) else 1.0
    if getattr(config, "scale_attn_by_inverse_layer_idx", False):
        s /= float(layer + 1)
    return s


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
        attention_scale=gpt2_attention_scale,
        config_options={
            "scale_attn_weights": ConfigOption(
                "q.k is scaled by 1/sqrt(head_dim) or not at all; modelled by attention_scale (query rows "
                "rescaled when head_dim widens)"
            ),
            "scale_attn_by_inverse_layer_idx": ConfigOption(
                "block i scales q.k by 1/(i+1); modelled by attention_scale: a block that moves from "
                "index j to i gets its query rows times (i+1)/(j+1)"
            ),
            "reorder_and_upcast_attn": ConfigOption("eager attention computed in fp32; same maths"),
            "activation_function": ConfigOption(
                "any activation: new FFN units write through zero down columns, so f(0) never reaches "
                "the stream"
            ),
            "add_cross_attention": ConfigOption(
                "cross-attention blocks (encoder-decoder use) are not described by the gpt2 adapter",
                allowed=(False,),
            ),
        },
        tiny_configs=(
            TinyConfig("tied", dict(_TINY, tie_word_embeddings=True)),
            TinyConfig("untied", dict(_TINY, tie_word_embeddings=False)),
            # a block's attention scale depends on its index: moved blocks must keep theirs
            TinyConfig("inverse-layer-idx", dict(_TINY, scale_attn_by_inverse_layer_idx=True)),
        ),
    )
)
