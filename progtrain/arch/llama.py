"""Llama (``LlamaModel``, ``LlamaForCausalLM``): pre-RMSNorm, rotary positions, SwiGLU FFN
(gate/up/down), grouped-query attention with an explicit ``head_dim``, tied or untied LM head,
optional attention/MLP biases.

:func:`llama_like` builds the adapter for any family with Llama's module layout (Mistral, Qwen2 ...):
their modules only import it and register their ``model_type``.
"""

from .base import ArchAdapter, ConfigOption, P, TinyConfig, gqa_tiny_configs, hf_size_keys, register_adapter

#: Options that change the maths, shared by the families laid out like Llama; each family adds its own.
LLAMA_LIKE_OPTIONS = {
    "rope_parameters": ConfigOption(
        "rotary variant (default, linear, dynamic, yarn, llama3, longrope ...), base and "
        "partial_rotary_factor: frequencies depend on head_dim, which the growth keeps fixed"
    ),
    "head_dim": ConfigOption("an explicit head_dim (may differ from hidden/heads); kept fixed"),
    "hidden_act": ConfigOption(
        "any gate activation: new FFN units write through zero down columns, so f(0) never reaches "
        "the stream"
    ),
}



def llama_like(
    name: str,
    model_types: tuple[str, ...],
    config_options: dict[str, ConfigOption] | None = None,
    tiny_configs: tuple[TinyConfig, ...] = (),
) -> ArchAdapter:
    """An adapter for a family laid out like ``LlamaModel`` (``model.layers.{i}.self_attn.q_proj`` ...);
    ``config_options`` are added to :data:`LLAMA_LIKE_OPTIONS`; ``tiny_configs`` are the family's test
    configs (``ArchAdapter.tiny_configs``)."""
    return ArchAdapter(
        name=name,
        model_types=model_types,
        layers_path="layers",
        params={
            "embed_tokens.weight": P("embed", None, "hidden.out"),
            "norm.weight": P("final_norm", "hidden.gain"),
        },
        layer_params={
            "input_layernorm.weight": P("norm", "hidden.gain"),
            "self_attn.q_proj.weight": P("q", "q.out", "hidden.in"),
            "self_attn.q_proj.bias": P("q", "q.out"),
            "self_attn.k_proj.weight": P("k", "k.out", "hidden.in"),
            "self_attn.k_proj.bias": P("k", "k.out"),
            "self_attn.v_proj.weight": P("v", "v.out", "hidden.in"),
            "self_attn.v_proj.bias": P("v", "v.out"),
            "self_attn.o_proj.weight": P("o", "hidden.out", "o.in"),
            "self_attn.o_proj.bias": P("o", "hidden.out"),
            "post_attention_layernorm.weight": P("norm", "hidden.gain"),
            "mlp.gate_proj.weight": P("gate", "ffn.out", "hidden.in"),
            "mlp.gate_proj.bias": P("gate", "ffn.out"),
            "mlp.up_proj.weight": P("up", "ffn.out", "hidden.in"),
            "mlp.up_proj.bias": P("up", "ffn.out"),
            "mlp.down_proj.weight": P("down", "hidden.out", "ffn.in"),
            "mlp.down_proj.bias": P("down", "hidden.out"),
        },
        head_params={"lm_head.weight": P("head", None, "hidden.in")},
        config_keys=hf_size_keys(),
        norm="rmsnorm",
        pre_norm=True,
        rotary=True,
        config_options={**LLAMA_LIKE_OPTIONS, **(config_options or {})},
        tiny_configs=tiny_configs,
    )


LLAMA = register_adapter(
    llama_like(
        "llama",
        ("llama",),
        {
            "attention_bias": ConfigOption("q/k/v/o biases, grown like their weights"),
            "mlp_bias": ConfigOption("gate/up/down biases, grown like their weights"),
        },
        gqa_tiny_configs(("attention_bias", "mlp_bias")),
    )
)
