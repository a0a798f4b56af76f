"""Measure how far a grown model's outputs are from the source model's (function preservation)."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from transformers import PreTrainedModel


def random_inputs(model: PreTrainedModel, batch: int = 2, seq_len: int = 16, seed: int = 0) -> torch.Tensor:
    """Random token ids (avoiding id 0, often padding), reproducible from ``seed``; ``[batch,
    min(seq_len, positions)]`` within the model's limits (``progtrain.grow.calibration.input_limits``)."""
    from .grow.calibration import input_limits

    g = torch.Generator().manual_seed(seed)
    limits = input_limits(model)
    vocab = limits.vocab_size
    if limits.max_positions:
        seq_len = min(seq_len, limits.max_positions)
    return torch.randint(1, vocab, (batch, seq_len), generator=g)


def fold_index(hidden_src: Sequence[int], old_hidden: int) -> torch.Tensor:
    """For each old hidden coordinate, the first grown coordinate that carries it."""
    src = torch.as_tensor(list(hidden_src))
    idx = torch.empty(old_hidden, dtype=torch.long)
    for i in range(old_hidden):
        idx[i] = int((src == i).nonzero()[0])
    return idx


@torch.no_grad()
def model_outputs(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> tuple[str, torch.Tensor]:
    """``("logits", logits)`` for models with a head, else ``("hidden", last_hidden_state)``; fp32, eval mode."""
    was = model.training
    model.eval()
    try:
        out = model(input_ids=input_ids, attention_mask=attention_mask)
    finally:
        model.train(was)
    if getattr(out, "logits", None) is not None:
        return "logits", out.logits.float()
    return "hidden", out.last_hidden_state.float()


@torch.no_grad()
def compare_outputs(
    old: PreTrainedModel,
    new: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    hidden_src: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Max |delta| between the two models' logits (or last hidden states folded back to the old width
    through ``hidden_src``, the grown-to-old hidden index map), absolute and relative to max |old|."""
    kind, a = model_outputs(old, input_ids, attention_mask)
    _, b = model_outputs(new, input_ids, attention_mask)
    if kind == "hidden" and b.shape[-1] != a.shape[-1]:
        if hidden_src is None:
            raise ValueError("comparing hidden states of different widths needs the hidden index map")
        b = b.index_select(-1, fold_index(hidden_src, a.shape[-1]))
    if attention_mask is not None:
        m = attention_mask.bool().unsqueeze(-1)
        a, b = a * m, b * m
    diff = (a - b).abs()
    max_abs = float(diff.max())
    ref = float(a.abs().max())
    res = {"kind": kind, "max_abs": max_abs, "max_ref": ref, "rel": max_abs / ref if ref > 0 else max_abs}
    if kind == "hidden":
        ma = a.mean(dim=1)
        mb = b.mean(dim=1)
        res["min_cosine_mean_pooled"] = float(torch.nn.functional.cosine_similarity(ma, mb, dim=-1).min())
    return res


def measure_deviation(
    old: PreTrainedModel,
    new: PreTrainedModel,
    maps: Any = None,
    input_ids: torch.Tensor | None = None,
    batch: int = 2,
    seq_len: int = 16,
    seed: int = 0,
) -> dict[str, Any]:
    """Deviation of ``new`` from ``old`` on random tokens (``seed``-reproducible) or ``input_ids``.

    Computed in fp32 (models in other dtypes are compared on fp32 copies' outputs as they run).
    Returns ``{"kind", "max_abs", "max_ref", "rel", "batch", "seq_len", "seed"}``.
    """
    if input_ids is None:
        input_ids = random_inputs(old, batch, seq_len, seed)
    hidden_src = None
    if maps is not None and maps.hidden_mode != "same":
        hidden_src = maps.plan("hidden.out", "").src.tolist()
    res = compare_outputs(old, new, input_ids, hidden_src=hidden_src)
    res.update(batch=int(input_ids.shape[0]), seq_len=int(input_ids.shape[1]), seed=seed)
    return res
