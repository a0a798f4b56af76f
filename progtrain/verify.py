"""Measure how far a grown model's outputs are from the source model's (function preservation).

:func:`measure_deviation` is the single measurement behind both ``grow()``'s exact/approximate label
and ``progtrain verify``; :func:`tolerance_for` states the tolerance per dtype.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from transformers import PreTrainedModel

#: Shapes ``(batch, seq_len)`` of the random-token inputs a growth is measured on: a small batch and
#: one longer sequence (positions and attention windows further out). Cheap: 96 tokens per model.
DEFAULT_PROBES: tuple[tuple[int, int], ...] = ((2, 16), (1, 64))


def models_tolerance(*models: PreTrainedModel) -> float:
    """The loosest :func:`tolerance_for` among the models' parameter dtypes (the comparison is only as
    precise as its least precise side)."""
    return tolerance_for(*(model_dtype(m) for m in models))


# Relative max |delta output| (see :func:`compare_outputs`) within which a growth counts as exact,
# by the dtype the weights are stored in; outputs are computed in fp32 (``compute_dtype``), so only
# the rounding of the stored weights counts, not the kernels' rounding at run time. Half precision:
# 2 eps of the dtype (bf16 eps = 2**-7, fp16 eps = 2**-10). Measured on every family (tiny models,
# real MiniLM-L6 384 -> 768, 8-layer 256-wide Llama / GPT-2 grown to 16 x 512; max over 3 input sets):
#   growth in the dtype, default symmetry noise: 0.04-0.12 eps (the cancelling noise pairs are
#     rounded separately); without noise 0-0.08 eps;
#   fp32 source saved as bf16 / fp16 (--dtype): 0.66-1.09 eps, the cost of the cast itself;
#   for scale: the same models *run* in bf16 / fp16 deviate from their fp32 runs by 1-2.2 eps.
# So 2 eps accepts rounding with >= 1.8x margin, and a growth that changes the function by more
# than 2 eps (1.6e-2 in bf16, 2e-3 in fp16) is reported approximate.
_TOLERANCE = {torch.float64: 1e-5, torch.float32: 1e-5, torch.bfloat16: 2.0 * 2**-7, torch.float16: 2.0 * 2**-10}


def tolerance_for(*dtypes: torch.dtype | str) -> float:
    """The relative deviation (max |delta output| / max |output|, outputs computed in fp32) within
    which a growth counts as exact when the weights compared are stored in ``dtypes`` (the coarsest
    one decides): 1e-5 for float32 (and float64), 1.5625e-2 (2 eps) for bfloat16, 1.953e-3 (2 eps) for float16;
    1e-5 when no dtype is given. Strings such as ``"bfloat16"`` or ``"torch.float16"`` are accepted.

    Raises:
        ValueError: a dtype other than float64, float32, bfloat16 and float16.
    """
    tol = _TOLERANCE[torch.float32]
    for dt in dtypes:
        if isinstance(dt, str):
            dt = getattr(torch, dt.removeprefix("torch."), None)
        if dt not in _TOLERANCE:
            raise ValueError(f"no tolerance for dtype {dt}: use float64, float32, bfloat16 or float16")
        tol = max(tol, _TOLERANCE[dt])
    return tol


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype ``model`` computes in: its first floating parameter's (as transformers' ``model.dtype``)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


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
    """For each old hidden coordinate, the first grown coordinate that carries it.

    Raises:
        ValueError: an old coordinate that no grown coordinate carries (not a map of this growth)."""
    src = torch.as_tensor(list(hidden_src))
    idx = torch.empty(old_hidden, dtype=torch.long)
    for i in range(old_hidden):
        hits = (src == i).nonzero()
        if not len(hits):
            raise ValueError(f"the hidden index map carries no coordinate for old hidden coordinate {i}")
        idx[i] = int(hits[0])
    return idx


def hidden_map_since(history: Sequence[dict], old_hidden: int, new_hidden: int) -> list[int] | None:
    """The grown-to-old hidden index map from a model of width ``old_hidden`` to its grown descendant of
    width ``new_hidden``, composed over the growth ``history`` (records with ``source`` / ``target`` sizes
    and ``hidden_index_map``, oldest first) from the last record back to the one that starts at
    ``old_hidden``: ``map[i]`` is the old coordinate grown coordinate ``i`` carries, -1 for a new one.
    None when the widths are equal (no map needed) or the history does not lead from one to the other."""
    if old_hidden == new_hidden:
        return None
    comp, width = list(range(new_hidden)), new_hidden
    for rec in reversed(list(history)):
        src, tgt = (rec.get("source") or {}).get("hidden_size"), (rec.get("target") or {}).get("hidden_size")
        if tgt != width or src is None:
            return None
        m = rec.get("hidden_index_map")
        if m is not None:
            comp = [int(m[c]) if c >= 0 else -1 for c in comp]
        width = src
        if width == old_hidden:
            return comp
    return None


@torch.no_grad()
def model_outputs(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    compute_dtype: torch.dtype | None = None,
    hidden: bool = False,
) -> tuple[str, torch.Tensor]:
    """``("logits", logits)`` for models with a head, else (or with ``hidden``: through the model's
    ``base_model``) ``("hidden", last_hidden_state)``; returned in fp32, computed in eval mode.

    With ``compute_dtype`` the forward pass runs on copies of every floating parameter and buffer
    cast to that dtype (``torch.func.functional_call``; ``model`` is left as it is), e.g. fp32 to
    evaluate a bf16 model's stored weights without bf16 rounding at run time. None: as the model is.
    """
    if hidden and model.base_model is not model:
        model = model.base_model
    was = model.training
    model.eval()
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask)
    try:
        tensors = dict(model.named_parameters())
        tensors.update(model.named_buffers())
        if compute_dtype is not None and any(t.is_floating_point() and t.dtype != compute_dtype for t in tensors.values()):
            cast = {n: t.to(compute_dtype) if t.is_floating_point() else t for n, t in tensors.items()}
            out = torch.func.functional_call(model, cast, (), kwargs)
        else:
            out = model(**kwargs)
    finally:
        model.train(was)
    if getattr(out, "logits", None) is not None and not hidden:
        return "logits", out.logits.float()
    return "hidden", out.last_hidden_state.float()


@torch.no_grad()
def compare_outputs(
    old: PreTrainedModel,
    new: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    hidden_src: Sequence[int] | None = None,
    compute_dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """Max |delta| between the two models' logits (or last hidden states folded back to the old width
    through ``hidden_src``, the grown-to-old hidden index map), absolute and relative to max |old|.
    When one model has a head and the other not (a ``BertModel`` grown into a ``BertForMaskedLM``), the
    last hidden states of their base models are compared. ``compute_dtype``: see :func:`model_outputs`.

    Raises:
        ValueError: outputs that cannot be lined up (hidden states of different widths without a map,
            logits of different shapes)."""
    kind, a = model_outputs(old, input_ids, attention_mask, compute_dtype)
    kind_b, b = model_outputs(new, input_ids, attention_mask, compute_dtype)
    if kind != kind_b:
        kind, a = model_outputs(old, input_ids, attention_mask, compute_dtype, hidden=True)
        _, b = model_outputs(new, input_ids, attention_mask, compute_dtype, hidden=True)
    if kind == "hidden" and b.shape[-1] != a.shape[-1]:
        if hidden_src is None:
            raise ValueError(f"hidden states of widths {a.shape[-1]} and {b.shape[-1]} need the grown-to-old hidden "
                             f"index map, and the growth history does not lead from one width to the other")
        b = b.index_select(-1, fold_index(hidden_src, a.shape[-1]))
    if a.shape != b.shape:
        raise ValueError(f"{kind} of shapes {tuple(a.shape)} and {tuple(b.shape)} cannot be compared")
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

    Both models are evaluated in fp32 on their weights as they are stored (a bf16 growth is judged
    by its bf16 weights, without bf16 rounding at run time; see :func:`model_outputs`).

    Args:
        tolerance: max relative deviation that counts as equal; default :func:`tolerance_for` the two
            models' storage dtypes (:func:`models_tolerance`).

    Returns:
        ``{"kind", "max_abs", "max_ref", "rel", "probes", "seed", "dtypes", "tolerance",
        "within_tolerance"}``
        (plus ``"min_cosine_mean_pooled"`` for hidden states): the numbers of the input with the
        largest relative deviation ``rel = max|delta| / max|old output|``; ``probes`` lists the
        ``[batch, seq_len]`` of every input; ``dtypes`` the two models' storage dtypes (old, new);
        ``within_tolerance`` is ``rel <= tolerance``.
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
        res = compare_outputs(old, new, ids, attention_mask=mask, hidden_src=hidden_src, compute_dtype=torch.float32)
        if "min_cosine_mean_pooled" in res:
            cosines.append(res["min_cosine_mean_pooled"])
        if worst is None or res["rel"] > worst["rel"] or math.isnan(res["rel"]):
            worst = res
    assert worst is not None
    tol = models_tolerance(old, new) if tolerance is None else float(tolerance)
    worst.update(
        dtypes=[str(model_dtype(m)).removeprefix("torch.") for m in (old, new)],
        probes=[[int(ids.shape[0]), int(ids.shape[1])] for ids, _ in inputs],
        seed=seed,
        tolerance=tol,
        within_tolerance=bool(worst["rel"] <= tol),  # False for NaN
    )
    if cosines:
        worst["min_cosine_mean_pooled"] = min(cosines)
    return worst
