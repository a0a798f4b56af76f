"""Phi-3 (``Phi3Model``, ``Phi3ForCausalLM``): Llama's block (pre-RMSNorm, rotary, SiLU-gated FFN)
with two fused projections: ``self_attn.qkv_proj`` laid out [q | k | v] along its output (q with
``num_attention_heads`` heads, k and v with ``num_key_value_heads``) and ``mlp.gate_up_proj`` laid
out [gate | up] (FFN units in each half; growth inserts new units at the end of both halves). No
``head_dim`` key: head_dim = hidden_size / num_attention_heads, kept fixed (rotary), so the head
count follows the width. No biases.
"""

from .base import ArchAdapter, ConfigOption, P, gqa_tiny_configs, hf_size_keys, register_adapter
from .llama import LLAMA_LIKE_OPTIONS

PHI3 = register_adapter(
    ArchAdapter(
        name="phi3",
        model_types=("phi3",),
        layers_path="layers",
        params={
            "embed_tokens.weight": P("embed", None, "hidden.out"),
            "norm.weight": P("final_norm", "hidden.gain"),
        },
        layer_params={
            "input_layernorm.weight": P("norm", "hidden.gain"),
            "self_attn.qkv_proj.weight": P("qkv", "qkv.out", "hidden.in"),
            "self_attn.o_proj.weight": P("o", "hidden.out", "o.in"),
            "post_attention_layernorm.weight": P("norm", "hidden.gain"),
            "mlp.gate_up_proj.weight": P("gate_up", "gate_up.out", "hidden.in"),
            "mlp.down_proj.weight": P("down", "hidden.out", "ffn.in"),
        },
        head_params={"lm_head.weight": P("head", None, "hidden.in")},
        config_keys=hf_size_keys(head_dim=None),
        norm="rmsnorm",
        pre_norm=True,
        rotary=True,
        fused_qkv="concat",
        config_options={
            "rope_parameters": ConfigOption(
                "rotary variant (default or longrope with short/long factors), base and "
                "partial_rotary_factor: frequencies depend on head_dim, which the growth keeps fixed"
            ),
            "original_max_position_embeddings": ConfigOption(
                "longrope switches from the short to the long factors past this length; unchanged by growth"
            ),
            "hidden_act": LLAMA_LIKE_OPTIONS["hidden_act"],
            "sliding_window": ConfigOption(
                "every layer attends to the same window of past tokens; new blocks are identities"
            ),
        },
        tiny_configs=gqa_tiny_configs(pad_token_id=0, bos_token_id=1, eos_token_id=2),
    )
)
