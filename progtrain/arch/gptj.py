"""GPT-J (``GPTJModel``, ``GPTJForCausalLM``): one LayerNorm per block read by attention and MLP in
parallel (x + attn(ln_1 x) + mlp(ln_1 x): zero ``out_proj`` and ``fc_out`` make a block the identity),
separate bias-free q/k/v/out projections, rotary positions on the first ``rotary_dim`` dims of each
head (head_dim = n_embd / n_head is kept fixed), an untied LM head with a bias."""

from __future__ import annotations

from .base import ArchAdapter, ConfigOption, P, TinyConfig, register_adapter

# rotary on 4 of the 8 dims of each head
_TINY = dict(n_embd=32, n_head=4, n_layer=2, rotary_dim=4, vocab_size=101, n_positions=64, bos_token_id=1,
             eos_token_id=1)

GPTJ = register_adapter(
    ArchAdapter(
        name="gptj",
        model_types=("gptj",),
        layers_path="h",
        params={
            "wte.weight": P("embed", None, "hidden.out"),
            "ln_f.weight": P("final_norm", "hidden.gain"),
            "ln_f.bias": P("final_norm", "hidden.shift"),
        },
        layer_params={
            "ln_1.weight": P("norm", "hidden.gain"),
            "ln_1.bias": P("norm", "hidden.shift"),
            "attn.q_proj.weight": P("q", "q.out", "hidden.in"),
            "attn.k_proj.weight": P("k", "k.out", "hidden.in"),
            "attn.v_proj.weight": P("v", "v.out", "hidden.in"),
            "attn.out_proj.weight": P("o", "hidden.out", "o.in"),
            "mlp.fc_in.weight": P("up", "ffn.out", "hidden.in"),
            "mlp.fc_in.bias": P("up", "ffn.out"),
            "mlp.fc_out.weight": P("down", "hidden.out", "ffn.in"),
            "mlp.fc_out.bias": P("down", "hidden.out"),
        },
        head_params={"lm_head.weight": P("head", None, "hidden.in"), "lm_head.bias": P("head_bias", None)},
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
        rotary=True,
        default_ffn=lambda c: 4 * c.n_embd,
        config_options={
            "rotary_dim": ConfigOption(
                "rotary positions on the first rotary_dim dims of each head; head_dim "
                "is kept fixed, so positions are unchanged"
            ),
            "activation_function": ConfigOption(
                "any activation: new FFN units write through zero fc_out columns, so f(0) never reaches the "
                "stream"
            ),
        },
        tiny_configs=(
            TinyConfig("untied", dict(_TINY, tie_word_embeddings=False)),
            TinyConfig("tied", dict(_TINY, tie_word_embeddings=True)),
        ),
    )
)
