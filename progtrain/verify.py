"""Measure how far a grown model's outputs are from the source model's (function preservation).

:func:`measure_deviation` is the single measurement behind both ``grow()``'s exact/approximate label
and ``progtrain verify``; :func:`tolerance_for` states the tolerance per dtype.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from transformers import PreTrainedModel

#: Max relative deviation (max |delta output| / max |source output|) at which two models count as
#: computing the same function, per parameter dtype. The one place tolerances are stated.
TOLERANCES: dict[torch.dtype, float] = {torch.float32: 1e-5, torch.float64: 1e-5}
#: Used for a dtype without its own entry: strict, so such growths are reported approximate rather
#: than wrongly exact.
DEFAULT_TOLERANCE = 1e-5

#: Shapes ``(batch, seq_len)`` of the random-token inputs a growth is measured on: a small batch and
#: one longer sequence (positions and attention windows further out). Cheap: 96 tokens per model.
DEFAULT_PROBES: tuple[tuple[int, int], ...] = ((2, 16), (1, 64))


def tolerance_for(dtype: torch.dtype) -> float:
    """The relative tolerance at which outputs of models in ``dtype`` count as equal (1e-5 in fp32)."""
    return TOLERANCES.get(dtype, DEFAULT_TOLERANCE)


def models_tolerance(*models: PreTrainedModel) -> float:
    """The loosest :func:`tolerance_for` among the models' parameter dtypes (the comparison is only as
    precise as its least precise side)."""
    dtypes = {p.dtype for m in models for p in m.parameters() if p.is_floating_point()}
    return max((tolerance_for(d) for d in dtypes), default=DEFAULT_TOLERANCE)


def random_inputs(model: PreTrainedModel, batch: int = 2, seq_len: int = 16, seed: int = 0) -> torch.Tensor:
    """Random token ids (avoiding id 0, often padding), reproducible from ``seed``; ``[batch,
    min(seq_len, positions)]`` within the model's limits (``progtrain.growth.calibration.input_limits``)."""
    from .growth.calibration import input_limits

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
    batch: int | None = None,
    seq_len: int | None = None,
    seed: int = 0,
    *,
    attention_mask: torch.Tensor | None = None,
    probes: Sequence[tuple[int, int]] | None = None,
    hidden_src: Sequence[int] | None = None,
    tolerance: float | None = None,
) -> dict[str, Any]:
    """Deviation of ``new`` from ``old``, judged against a tolerance: the one measurement behind
    ``grow()``'s exact/approximate label and ``progtrain verify``.

    Inputs: ``input_ids`` (with ``attention_mask``) when given; else one batch of random tokens of
    shape ``batch x seq_len`` when either is given; else every shape in :data:`DEFAULT_PROBES`. Random
    tokens are reproducible from ``seed`` (probe ``i`` uses ``seed + i``). Headless models compare last
    hidden states folded back to the old width through ``hidden_src`` or ``maps``.

    Args:
        tolerance: max relative deviation that counts as equal; default :func:`models_tolerance`.

    Returns:
        ``{"kind", "max_abs", "max_ref", "rel", "probes", "seed", "tolerance", "within_tolerance"}``
        (plus ``"min_cosine_mean_pooled"`` for hidden states): the numbers of the input with the
        largest relative deviation ``rel = max|delta| / max|old output|``; ``probes`` lists the
        ``[batch, seq_len]`` of every input; ``within_tolerance`` is ``rel <= tolerance``.
    """
    if hidden_src is None and maps is not None and maps.hidden_mode != "same":
        hidden_src = maps.plan("hidden.out", "").src.tolist()
    if input_ids is not None:
        inputs = [(input_ids, attention_mask)]
    else:
        shapes = [(batch or 2, seq_len or 16)] if (batch or seq_len) else list(probes or DEFAULT_PROBES)
        inputs = [(random_inputs(old, b, n, seed + i), None) for i, (b, n) in enumerate(shapes)]
    worst: dict[str, Any] | None = None
    cosines = []
    for ids, mask in inputs:
        res = compare_outputs(old, new, ids, attention_mask=mask, hidden_src=hidden_src)
        if "min_cosine_mean_pooled" in res:
            cosines.append(res["min_cosine_mean_pooled"])
        if worst is None or res["rel"] > worst["rel"] or math.isnan(res["rel"]):
            worst = res
    assert worst is not None
    tol = models_tolerance(old, new) if tolerance is None else float(tolerance)
    worst.update(
        probes=[[int(ids.shape[0]), int(ids.shape[1])] for ids, _ in inputs],
        seed=seed,
        tolerance=tol,
        within_tolerance=bool(worst["rel"] <= tol),  # False for NaN
    )
    if cosines:
        worst["min_cosine_mean_pooled"] = min(cosines)
    return worst
