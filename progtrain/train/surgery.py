r"""Optimizer surgery: Adam's moments across a growth (stage option ``moments``).

After :func:`progtrain.grow` every grown element either is *born* (did not exist before: new FFN
units, new heads, new layers) or comes from one old element ``w`` as ``w' = s * w``, possibly in
``k`` places (tiled stream copies, split fan-in copies, a key/value head shared by several groups).
``s`` is the product of the axis plans' scales (``1/k`` for a reader whose fan-in is split over
``k`` copies of the stream; old / new attention scale for query rows, e.g. ``sqrt(hd'/hd)`` when
head_dim widens); ``k`` is counted from the plans. Three modes (:data:`MOMENT_MODES`):

* ``carry``: every copy takes its source's moments as they are (``c = 1``); born elements 0.
* ``split`` (default; what the training loop always did, ``factors=True`` before the modes had
  names): Staged Training's mapping (Shen et al. 2022, arXiv 2203.06211), "an element duplicated
  ``k`` times gets ``m/k`` and ``v/k^2``", derived for progtrain's own construction below: first
  moment times ``c``, second times ``c^2``, with ``c = 1/(k s)``; born elements 0.
* ``reset`` (SPARKLING, arXiv 2602.02472: optimizer state reset for the new channels only): born
  elements *and* every copy of a duplicated element (``k > 1``) start at 0; old elements that were
  not duplicated (``k = 1``) keep their moments unchanged.

The step count is kept in every mode (it sets Adam's bias correction of the old elements).

**Derivation of the split factors for progtrain's tiling.** Adam's step for an element is
``m_hat / (sqrt(v_hat) + eps)``; after the growth the new moments are ``b1 m' + (1-b1) g'`` and
``b2 v' + (1-b2) g'^2``. If each copy's gradient is ``g' = c g`` (``g``: the small model's gradient
of the source element at the same point), then ``m' = c m, v' = c^2 v`` make every later moment
exactly ``c`` (``c^2``) times the small model's, so each copy's Adam update equals the small model's
update ``u`` of its source (up to ``eps``). The factor comes from the chain rule at the growth point:

* writer of the residual stream tiled ``k`` times (rows copied, ``s = 1``; ``embed``, ``o``,
  ``down`` and their biases): the stream is ``[y, ..., y]`` and its readers' fan-in is split as
  ``[W/k + N_1, ..., W/k + N_k]`` with cancelling noise ``sum_j N_j = 0``. The gradient reaching
  copy ``j`` is ``dL/dy_j = (W/k + N_j)^T delta = g/k + e_j`` with ``e_j = N_j^T delta`` and
  ``sum_j e_j = 0`` (the norms between a writer and its readers are exact on a tiled vector and pass
  the split through). With ``symmetry_noise = 0``: ``g' = g/k``, ``c = 1/k``: ``m/k, v/k^2``, Staged
  Training's factors. With noise the copies' gradients differ by ``+-e_j``, which no factor on the
  old moments can represent; the factors map the symmetric part. Measured on a tiny GPT-2 grown x2
  (tests/test_moments_option.py): every copy's first post-growth Adam update equals its source's
  within 1.2e-4 * lr without noise, and the tiled writers' copies are off by up to 5.5e-2 * lr with
  the default ``symmetry_noise = 1e-2``; the loss change is unaffected (the ``+-e_j`` cancel to
  first order over the copies).
* reader with its fan-in split (``s = 1/k``; ``q``, ``k``, ``v``, ``up``, ``gate``, untied head):
  copy ``j`` multiplies the stream copy ``x_j = x``, so its gradient is ``delta x^T = g``, whatever
  the noise ``N_j``: ``c = 1 = 1/(k s)``: the moments stay as they are. (Staged Training's literal
  ``m/k, v/k^2`` would be wrong here: the copy's gradient is not ``g/k``, and the first step's new
  gradient would enter moments of the wrong scale.)
* query rows rescaled by ``r`` (``k = 1``, ``s = r``): ``g' = g/r``, ``c = 1/r``.
* general element: ``sum over copies of s * g' = g`` with equal copies gives ``g' = g/(k s)``.

**What moments cannot do.** With the split factors every copy moves by the small model's update
``u``; keeping ``w' = s w`` on the small model's path needs ``s u`` (a reader copy ``W/k`` must move
by ``u/k``, else the copies together move the function ``k`` times as far). No moment mapping gives
that, because Adam's update is invariant to the moments' scale: :func:`update_scales` returns the
per-element multiplier ``s`` (stage option ``match_dynamics``). Measured on a tiny GPT-2 grown x2 in
width (hidden, heads, FFN; tests/test_moments_option.py), the first post-growth AdamW step's loss
change against the small model's same step, relative difference: ``split`` + ``match_dynamics``
2.8e-5 (``symmetry_noise = 0``) and 0 (default noise; both at the float32 resolution of the loss);
``split`` alone 0.77 (the readers' copies move twice as far); ``carry`` + ``match_dynamics`` 0.060
(the tiled writers' copies take too small a step: unscaled ``v``); ``reset`` + ``match_dynamics``
0.078.
"""

from __future__ import annotations

from typing import Mapping

import torch

from ..growth.plan import ParamMap

MOMENT_KEYS = ("exp_avg", "exp_avg_sq")


def element_sources(pmap: ParamMap, old_shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each grown element: the flat index of its old element (-1 when born), its scale ``s`` and
    its copy count ``k`` (0 when born). Shapes are the grown parameter's."""
    n_old = 1
    for d in old_shape:
        n_old *= d
    ids = torch.arange(n_old, dtype=torch.float64).view(old_shape)
    src = pmap.map_tensor(ids, fill=-1.0).round().long()
    born = src < 0
    s = pmap.map_tensor(torch.ones(old_shape, dtype=torch.float64), fill=0.0, scale_power=1.0)
    counts = torch.bincount(src[~born].flatten(), minlength=n_old)
    k = torch.where(born, torch.zeros((), dtype=torch.long), counts[src.clamp(min=0)])
    return src, s.masked_fill(born, 0.0), k


def moment_factor(pmap: ParamMap, old_shape: tuple[int, ...]) -> torch.Tensor:
    """``c = 1 / (k * s)`` per grown element (0 for born elements), float64."""
    _, s, k = element_sources(pmap, old_shape)
    return _split_factor(s, k)


def _split_factor(s: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``1 / (k * s)`` where an element has a source (``k > 0``), 0 for born elements; float64."""
    c = torch.zeros(s.shape, dtype=torch.float64)
    ok = k > 0
    c[ok] = 1.0 / (k[ok].double() * s[ok].double())
    return c


MOMENT_MODES = ("carry", "split", "reset")


def grow_moments(
    moments: Mapping[str, Mapping[str, torch.Tensor]],
    param_maps: Mapping[str, ParamMap],
    *,
    mode: str = "split",
    factors: bool | None = None,
) -> dict[str, dict[str, torch.Tensor]]:
    """Map full Adam moments of the old model (``{param name: {"exp_avg", "exp_avg_sq"}}``) to the
    grown model's parameters (``param_maps`` from :class:`~progtrain.growth.GrowthResult`).

    ``mode`` (see the module docstring): ``"carry"`` copies the source's moments unscaled,
    ``"split"`` multiplies them by ``c = 1/(k s)`` (first moment) and ``c**2`` (second),
    ``"reset"`` zeroes every copy of a duplicated element (``k > 1``) and keeps the others.
    ``factors`` is the older spelling: True = ``"split"``, False = ``"carry"``. Born elements and
    parameters without old moments get zeros in every mode. Returns new tensors (fp32, CPU), one
    entry per grown parameter.

    Raises:
        ValueError: an unknown ``mode``.
    """
    if factors is not None:
        mode = "split" if factors else "carry"
    if mode not in MOMENT_MODES:
        raise ValueError(f"unknown moments mode {mode!r}; choose one of {', '.join(MOMENT_MODES)}")
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, pmap in param_maps.items():
        old = moments.get(pmap.old_name)
        if not old or any(key not in old for key in MOMENT_KEYS):
            out[name] = {key: torch.zeros(pmap.shape, dtype=torch.float32) for key in MOMENT_KEYS}
            continue
        m, v = old["exp_avg"].detach().float().cpu(), old["exp_avg_sq"].detach().float().cpu()
        out[name] = _grow_moment_pair(pmap, m, v, mode)
    return out


#: grown elements mapped at once by :func:`_grow_moment_pair` (its float64 temporaries: ~40 bytes each)
_CHUNK_ELEMENTS = 1 << 20


def _grow_moment_pair(pmap: ParamMap, m: torch.Tensor, v: torch.Tensor, mode: str) -> dict[str, torch.Tensor]:
    """``exp_avg``/``exp_avg_sq`` of one grown parameter from its source's ``m``/``v`` (fp32), the values
    :func:`element_sources` and :func:`_split_factor` give, computed from the axis plans (an element's
    source, scale ``s`` and copy count ``k`` are products over the axes) a block of rows at a time: the
    memory beyond the two fp32 results is bounded by :data:`_CHUNK_ELEMENTS`, not by the parameter."""
    if pmap.new_layer:
        return {key: torch.zeros(pmap.shape, dtype=torch.float32) for key in MOMENT_KEYS}
    ndim = len(pmap.shape)
    axes = []  # per axis: (source index clamped, copy count k_a (0 = born), scale s_a float64) or None
    for axis in range(ndim):
        plan = pmap.plans[axis] if axis < len(pmap.plans) else None
        if plan is None:
            axes.append(None)
            continue
        counts = torch.bincount(plan.src[plan.src >= 0], minlength=m.shape[axis])
        k = torch.where(plan.src < 0, torch.zeros((), dtype=torch.long), counts[plan.src.clamp(min=0)])
        axes.append((plan.src.clamp(min=0), k, plan.scale.double()))
    gm_out, gv_out = torch.empty(pmap.shape, dtype=torch.float32), torch.empty(pmap.shape, dtype=torch.float32)
    if ndim == 0:
        gm_out.copy_(m), gv_out.copy_(v)
        return {"exp_avg": gm_out, "exp_avg_sq": gv_out}
    row = max(1, gm_out[0].numel())
    step = max(1, _CHUNK_ELEMENTS // row)
    for r0 in range(0, pmap.shape[0], step):
        rows = slice(r0, min(r0 + step, pmap.shape[0]))
        gm, gv = m, v
        k = torch.ones((), dtype=torch.long)
        s = torch.ones((), dtype=torch.float64)
        for axis, a in enumerate(axes):
            if axis == 0:
                idx = a[0][rows] if a is not None else torch.arange(rows.start, rows.stop)
                gm, gv = gm.index_select(0, idx), gv.index_select(0, idx)
            elif a is not None:
                gm, gv = gm.index_select(axis, a[0]), gv.index_select(axis, a[0])
            if a is None:
                continue
            shape = [1] * ndim
            shape[axis] = -1
            k_a, s_a = (a[1][rows], a[2][rows]) if axis == 0 else (a[1], a[2])
            k, s = k * k_a.view(shape), s * s_a.view(shape)
        born = (k == 0).expand(gm.shape)
        gm, gv = gm.double(), gv.double()
        if mode == "split":
            c = torch.where(born, torch.zeros((), dtype=torch.float64), 1.0 / (k.double() * s))
            gm, gv = gm * c, gv * c * c
        elif mode == "reset":
            born = born | (k > 1)
        gm_out[rows] = gm.masked_fill(born, 0.0).float()
        gv_out[rows] = gv.masked_fill(born, 0.0).float()
    return {"exp_avg": gm_out, "exp_avg_sq": gv_out}


def update_scales(param_maps: Mapping[str, ParamMap], old_shapes: Mapping[str, tuple[int, ...]],
                  born_scale: float = 1.0) -> dict[str, torch.Tensor]:
    """Per-element update multipliers that keep a grown model's step on the small model's path:
    ``s`` (the element's weight multiplier) for old elements, ``born_scale`` for born ones.
    ``old_shapes`` maps the old parameter names to their shapes."""
    out = {}
    for name, pmap in param_maps.items():
        if pmap.new_layer or pmap.old_name not in old_shapes:
            out[name] = torch.full(pmap.shape, float(born_scale))
            continue
        src, s, _ = element_sources(pmap, tuple(old_shapes[pmap.old_name]))
        out[name] = torch.where(src < 0, torch.full((), float(born_scale), dtype=torch.float64), s).float()
    return out
