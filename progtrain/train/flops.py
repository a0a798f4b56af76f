"""Training-compute accounting.

Per token, one training step (forward + backward) of a transformer costs (Kaplan et al. 2020, eq. 2.2,
times 3 for forward + backward)::

    C_token = 6 * N + 6 * n_layers * seq_len * d_attn        [FLOPs per token]

* ``N`` — the parameters that take part in matrix products: every parameter except the embedding
  *lookup tables* (token, position, token-type embeddings), plus the LM head matrix when it is tied
  to the token embedding (the lookup is free, the head's d x V product is not). For tiny models the
  LM head dominates, so leaving it out would make the accounting meaningless.
* the attention term — scores q.k and the weighted sum of values, 2 x 2 x seq_len x d_attn per
  token per layer forward, with ``d_attn = num_heads * head_dim``.

A step costs ``C_token * batch_size * seq_len``; a run sums the steps of each stage at that stage's
sizes. Norms, softmax and activations (O(d) per token) are not counted.
"""

from __future__ import annotations

import logging
from typing import Any

from transformers import PretrainedConfig, PreTrainedModel

from ..text import text_table

LOOKUP_ROLES = frozenset({"embed", "pos_embed", "type_embed"})


def matmul_params(model: PreTrainedModel) -> int:
    """``N``: parameters that take part in matrix products (see the module docstring)."""
    from ..arch.base import base_prefix, get_adapter, has_tied_head, iter_params

    adapter = get_adapter(model)
    prefix = base_prefix(model)
    n = 0
    for name, p in iter_params(model):
        role = adapter.classify(name, prefix)[0].role
        if role not in LOOKUP_ROLES:
            n += p.numel()
    if has_tied_head(model):
        n += model.get_input_embeddings().weight.numel()
    return int(n)


def total_params(model: PreTrainedModel) -> int:
    """All distinct parameters (a tied head counted once)."""
    from ..arch.base import iter_params

    return int(sum(p.numel() for _, p in iter_params(model)))


def flops_per_token(model: PreTrainedModel, seq_len: int) -> float:
    """Training FLOPs per token of ``model`` at sequence length ``seq_len`` (module docstring)."""
    from ..arch.base import get_adapter

    s = get_adapter(model).read_sizes(model.config)
    return 6.0 * matmul_params(model) + 6.0 * s.layers * seq_len * s.heads * s.head_dim


def meta_model(config: PretrainedConfig, task: str) -> PreTrainedModel:
    """The model of ``config`` for ``task`` on the meta device (shapes only, no memory)."""
    from accelerate import init_empty_weights

    from ..io import model_class_for

    cls = model_class_for(config, task)
    with init_empty_weights():
        m = cls(config)
    if getattr(config, "tie_word_embeddings", False):
        m.tie_weights()
    return m


def stage_configs(cfg: Any, vocab_size: int | None = None) -> list[PretrainedConfig]:
    """HF config of every stage of a run (stage 0 = initial model), from the stages' growth plans
    (:func:`progtrain.train.config.stage_plans`)."""
    from .config import stage_plans

    hf, plans = stage_plans(cfg, vocab_size)
    return [hf] + [p.target_config for p in plans]


def plan(cfg: Any, vocab_size: int | None = None) -> list[dict]:
    """Per stage: sizes, parameters, steps, tokens and training FLOPs; a last row ``total`` and a
    row ``final size only`` (training the last stage's model for all the run's tokens)."""
    from ..arch import get_adapter

    if vocab_size is None and not cfg.model.checkpoint:
        vocab_size = _planned_vocab(cfg)
    confs = stage_configs(cfg, vocab_size)
    starts = cfg.stage_starts() + [cfg.train.max_steps]
    tps = cfg.tokens_per_step
    T = cfg.data.seq_len
    rows = []
    for i, c in enumerate(confs):
        m = meta_model(c, cfg.model.task)
        steps = starts[i + 1] - starts[i]
        tokens = steps * tps
        sizes = get_adapter(c).read_sizes(c).as_dict()
        rows.append(
            {
                "stage": i,
                "name": "initial" if i == 0 else cfg.stages[i - 1].name,
                "sizes": sizes,
                "params": total_params(m),
                "matmul_params": matmul_params(m),
                "start_step": starts[i],
                "steps": steps,
                "tokens": tokens,
                "flops": flops_per_token(m, T) * tokens,
                "init": "" if i == 0 else cfg.stages[i - 1].init,
            }
        )
    final = rows[-1]
    total_tokens = sum(r["tokens"] for r in rows)
    total_flops = sum(r["flops"] for r in rows)
    fixed = final["flops"] / max(final["tokens"], 1) * total_tokens
    rows.append({"stage": "total", "name": "progressive", "params": final["params"], "steps": cfg.train.max_steps,
                 "tokens": total_tokens, "flops": total_flops})
    rows.append({"stage": "-", "name": "final size only", "params": final["params"], "steps": cfg.train.max_steps,
                 "tokens": total_tokens, "flops": fixed})
    return rows


def _planned_vocab(cfg: Any) -> int:
    """Vocabulary size the run will use: the given tokenizer's, else the BPE size to train."""
    if cfg.data.tokenizer:
        from ..errors import ProgtrainConfigError
        from .data import load_tokenizer_from

        try:
            return len(load_tokenizer_from(cfg.data.tokenizer))
        except ProgtrainConfigError as e:  # offline planning of a hub tokenizer
            logging.getLogger(__name__).warning("%s; planning with data.vocab_size=%d", e, cfg.data.vocab_size)
    return int(cfg.data.vocab_size)


def format_plan(rows: list[dict]) -> str:
    """The plan as a text table (FLOPs in scientific notation, the last line the saving)."""
    head = ("stage", "name", "hidden", "heads", "ffn", "layers", "params", "steps", "tokens", "FLOPs")
    table = [head]
    for r in rows:
        s = r.get("sizes") or {}
        table.append(
            (
                str(r["stage"]), r["name"], str(s.get("hidden_size", "")), str(s.get("num_heads", "")),
                str(s.get("intermediate_size", "")), str(s.get("num_layers", "")), f"{r['params']:,}",
                str(r["steps"]), f"{r['tokens']:,}", f"{r['flops']:.3e}",
            )
        )
    lines = [text_table(table, rules_after=(0, len(table) - 3))]  # a rule above the two totals
    prog, fixed = rows[-2]["flops"], rows[-1]["flops"]
    lines.append(f"\nprogressive / final-size-only compute: {prog / fixed:.3f} ({100 * (1 - prog / fixed):.1f}% saved) "
                 f"for the same {rows[-2]['tokens']:,} tokens")
    return "\n".join(lines)


__all__ = ["flops_per_token", "format_plan", "matmul_params", "meta_model", "plan", "stage_configs", "total_params"]

