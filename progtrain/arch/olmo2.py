"""OLMo2 (``Olmo2Model``, ``Olmo2ForCausalLM``): Llama's projections and SwiGLU FFN, but the norms
sit *after* the sub-layers, inside the residual branch: ``h = x + post_attention_layernorm(attn(x))``,
``out = h + post_feedforward_layernorm(mlp(h))`` (no input norm), and queries and keys pass through an
RMSNorm over the whole projection (``q_norm`` over heads x head_dim, ``k_norm`` over kv_heads x
head_dim). ``Olmo2Config`` has no ``head_dim`` field (head_dim defaults to hidden_size /
num_attention_heads), but Olmo2's attention and rotary embedding read ``config.head_dim`` when it is
set, and it survives save and reload: the growth writes it, so that widening keeps the heads and
head_dim (rotary) and adds no head.

What is exact:

* The stream is never normalised in place (the norms only see a branch's output), so the pre-norm
  constructions hold: an RMSNorm of zero is zero, so a block with zero ``o`` and ``down`` is the
  identity; tiling or zero-padding the stream, with the norm gains and epsilon rescaled, keeps every
  branch norm's output on the old coordinates (``pre_norm=True``). The q/k norms share
  ``rms_norm_eps``: a non-integer widening scales the q/k rows by sqrt(d/D) to compensate
  (``qk_norm="projection"``).
* Head growth is *not* exact: new query (or key) heads enter the mean of the projection-wide q (k)
  norm and change every old head's normalisation. An exact construction exists only with zero
  rows for the new heads, which leaves new query and key heads with zero gradients for each other,
  so progtrain keeps them trainable and reports the head growth as approximate (measured). Copying
  every old kv head the same number of times (GQA regrouping with no new kv head) keeps the mean and
  is exact.
"""

import dataclasses

from .base import ConfigOption, P, gqa_tiny_configs, register_adapter
from .llama import llama_like

_BASE = llama_like(
    "olmo2",
    ("olmo2",),
    {
        "attention_bias": ConfigOption("q/k/v/o biases, grown like their weights"),
        "rms_norm_eps": ConfigOption(
            "epsilon of every RMSNorm, the q/k norms included; a non-integer widening scales it by d/D "
            "and the q/k rows by sqrt(d/D), which gives the q/k norms their old epsilon back"
        ),
    },
)
_BASE.config_options["head_dim"] = ConfigOption(
    "head_dim = hidden/heads unless config.head_dim is set (read by the attention and the rotary "
    "embedding); the grown config sets it to the kept head_dim"
)
_LAYER = {k: v for k, v in _BASE.layer_params.items() if not k.startswith(("input_layernorm", "mlp.gate_proj.b",
                                                                           "mlp.up_proj.b", "mlp.down_proj.b"))}

OLMO2 = register_adapter(
    dataclasses.replace(
        _BASE,
        layer_params={
            **_LAYER,
            "self_attn.q_norm.weight": P("q_norm", "q.out"),  # (heads * head_dim,)
            "self_attn.k_norm.weight": P("k_norm", "k.out"),  # (kv_heads * head_dim,)
            "post_feedforward_layernorm.weight": P("norm", "hidden.gain"),
        },
        qk_norm="projection",
        tiny_configs=gqa_tiny_configs(("attention_bias",), pad_token_id=0, eos_token_id=2),
    )
)
