r"""Optimizer surgery: carry Adam's moments across a growth.

After :func:`progtrain.grow` every grown element either is *born* (did not exist before) or comes
from one old element ``w`` as ``w' = s * w``, possibly in ``k`` places (tiled stream copies, split
fan-in copies, a key/value head shared by several groups). ``s`` is the product of the axis plans'
scales (e.g. ``1/k`` for a reader whose fan-in is split over ``k`` copies of the stream,
old / new attention scale for query rows, e.g. ``sqrt(hd'/hd)`` when head_dim widens); ``k`` is
counted from the plans.

**Moment factors.** Function preservation means ``L'(phi(w)) = L(w)`` for the map ``phi`` that
places ``s * w`` at each of the ``k`` copies. At the symmetric point the copies have equal
gradients ``g'``, and the chain rule gives ``g = sum_copies s * g' = k * s * g'``, so

    g' = c * g   with   c = 1 / (k * s).

If the gradients keep this relation, Adam's moments of the grown element stay ``c`` times (first
moment) and ``c**2`` times (second moment) those of the small model, so the surgery writes

    exp_avg'    = c   * exp_avg[src]         (e.g. tiled writer copies, k=2, s=1: m/2)
    exp_avg_sq' = c^2 * exp_avg_sq[src]      (                                    v/4)

Born elements start at zero; the step count is kept. Examples: a writer of the residual stream
tiled k times (``s = 1``): ``m/k, v/k^2``; a reader with its fan-in split (``s = 1/k``): ``m, v``
unchanged; query rows rescaled by ``r = sqrt(hd'/hd)`` (``k = 1``): ``m/r, v/r^2``.

**Update scales.** Adam's update ``m_hat / (sqrt(v_hat) + eps)`` is invariant to ``c``, so every
copy moves by the small model's update ``u``, while keeping ``w' = s * w`` needs ``s * u``. Moments
alone cannot give that: :func:`update_scales` returns the per-element multiplier ``s`` (and 0 or a
ramp for born elements) for an update scaler (``progtrain.train.lr_scales.UpdateScaler``). With both,
one AdamW step (weight decay 0) of an exactly grown model with symmetric copies (no symmetry noise)
changes the loss as the small model's step does, up to Adam's ``eps`` (tests/test_surgery.py).
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
    c = torch.zeros_like(s)
    ok = k > 0
    c[ok] = 1.0 / (k[ok].double() * s[ok])
    return c


def grow_moments(
    moments: Mapping[str, Mapping[str, torch.Tensor]],
    param_maps: Mapping[str, ParamMap],
    *,
    factors: bool = True,
) -> dict[str, dict[str, torch.Tensor]]:
    """Map full Adam moments of the old model (``{param name: {"exp_avg", "exp_avg_sq"}}``) to the
    grown model's parameters (``param_maps`` from :class:`~progtrain.growth.GrowthResult`).

    Old elements take their source's moments times ``c`` (first) and ``c**2`` (second moment), see
    the module docstring; ``factors=False`` copies them unscaled. Born elements and parameters
    without old moments get zeros. Returns new tensors (fp32, CPU), one entry per grown parameter.
    """
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, pmap in param_maps.items():
        old = moments.get(pmap.old_name)
        if not old or any(key not in old for key in MOMENT_KEYS):
            out[name] = {key: torch.zeros(pmap.shape, dtype=torch.float32) for key in MOMENT_KEYS}
            continue
        m, v = old["exp_avg"].detach().float().cpu(), old["exp_avg_sq"].detach().float().cpu()
        src, s, k = element_sources(pmap, tuple(m.shape))
        born = src < 0
        gm = m.flatten()[src.clamp(min=0)].double()
        gv = v.flatten()[src.clamp(min=0)].double()
        if factors:
            c = torch.where(born, torch.zeros((), dtype=torch.float64), 1.0 / (k.clamp(min=1).double() * s.masked_fill(born, 1.0)))
            gm, gv = gm * c, gv * c * c
        out[name] = {
            "exp_avg": gm.masked_fill(born, 0.0).float(),
            "exp_avg_sq": gv.masked_fill(born, 0.0).float(),
        }
    return out


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


def born_masks(param_maps: Mapping[str, ParamMap]) -> dict[str, torch.Tensor]:
    """Boolean masks of the elements born in a growth, by grown parameter name."""
    return {name: pmap.born_mask() for name, pmap in param_maps.items()}
