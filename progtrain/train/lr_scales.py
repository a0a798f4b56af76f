r"""Birth-stage bookkeeping and learning-rate adaptation for grown models (variance transfer, Yuan,
Savarese & Maire 2023).

Every parameter element records the **stage** at which it was born: 0 for the initial model; after
growth ``t`` the elements that did not exist before get ``t`` and old elements keep theirs (carried
to their grown positions by :meth:`~progtrain.growth.plan.ParamMap.map_tensor`).

**LR adaptation.** Elements born at stage ``t`` train with

    lr_t = lr_0 * ||W_born_t||_F / ||W_born_0||_F

where ``W_born_t`` are the elements born at stage ``t`` of one *group* (by default one role, e.g.
all ``down`` projections together) and ``W_born_0`` the group's stage-0 elements. Sub-networks grown
later are smaller in norm, so they start with a smaller step and speed up as they grow ("fade in").
Secondary accounts of the paper disagree on which way the ratio points, so ``mode`` picks it:
``"norm_ratio"`` (born / stage-0, the formula above, default), ``"inverse_norm_ratio"``
(stage-0 / born) or ``"off"`` (every scale 1). Ratios are clamped to ``clamp``; a born block whose
norm is 0 (zero fan-out at birth) takes the lower clamp under ``norm_ratio``.

**Applied to the update, not the gradient.** Adam's update ``m_hat / (sqrt(v_hat) + eps)`` does not
change when a gradient is multiplied by a constant, so per-element learning rates cannot be
gradient scales. :class:`UpdateScaler` runs the optimizer's own step and then moves every element
only ``s`` times as far: ``p <- p_before + s * (p_after - p_before)``. This works for any optimizer
(AdamW, SGD with or without momentum; decoupled weight decay is part of the update and is scaled
too). Under data parallelism the wrapper acts on the local, replicated parameters (every rank
applies the same scales to the same update, so replicas stay identical). An engine whose optimizer
updates its own fp32 copies rather than the module's parameters passes ``get_param`` / ``set_param``
that read and write those copies, and an engine that steps inside ``backward`` calls
:meth:`UpdateScaler.snapshot` before it and :meth:`UpdateScaler.apply` after it: both live in
:class:`progtrain.train.distributed.Engine`, the one place that knows the engines.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Mapping

import torch

from ..errors import ProgtrainConfigError

logger = logging.getLogger(__name__)

MODES = ("norm_ratio", "inverse_norm_ratio", "off")
GROUPS = ("role", "param", "global")
_MAX_STAGE = torch.iinfo(torch.int8).max


def _plain_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    from ..bake import plain_named_parameters

    return dict(plain_named_parameters(model))


def update_birth_stages(
    births: Mapping[str, torch.Tensor] | None,
    model: torch.nn.Module,
    param_maps: Mapping[str, Any] | None,
    stage: int,
) -> dict[str, torch.Tensor]:
    """Birth stage (int8) of every element of ``model``'s parameters, by plain HF parameter name.

    Args:
        births: the stages before the growth (by the old model's names), or None when none were kept
            (all old elements are then stage 0).
        model: the model the result describes (the grown model after a growth).
        param_maps: ``GrowthResult.param_maps`` of the growth that produced ``model``; None for the
            initial model (every element gets ``stage``, normally 0).
        stage: the stage index of this growth (0 for the initial model, at most 127).

    Returns:
        ``{name: int8 tensor of the parameter's shape}`` on the CPU.

    Raises:
        ProgtrainConfigError: a stage outside 0..127, or ``births``/``param_maps`` that do not match
            ``model`` (e.g. stages of another model).
    """
    if not 0 <= int(stage) <= _MAX_STAGE:
        raise ProgtrainConfigError(f"birth stage {stage} is outside 0..{_MAX_STAGE}: use fewer growth stages")
    stage = int(stage)
    params = _plain_params(model)
    out: dict[str, torch.Tensor] = {}
    for name, p in params.items():
        shape = tuple(p.shape)
        if param_maps is None:
            b = torch.full(shape, stage, dtype=torch.int8)
        else:
            pmap = param_maps.get(name)
            if pmap is None:
                raise ProgtrainConfigError(
                    f"parameter {name!r} has no entry in param_maps: pass the GrowthResult.param_maps of the "
                    f"growth that produced this model"
                )
            old = None if births is None else births.get(pmap.old_name)
            if old is None:
                b = torch.where(pmap.born_mask(), torch.tensor(stage, dtype=torch.int8), torch.tensor(0, dtype=torch.int8))
            else:
                b = pmap.map_tensor(old.to(torch.int8).cpu(), fill=stage)
        if tuple(b.shape) != shape:
            raise ProgtrainConfigError(
                f"birth stages for {name!r} have shape {tuple(b.shape)} but the parameter is {shape}: the stages "
                f"belong to another model; rebuild them with update_birth_stages(None, model, None, 0)"
            )
        out[name] = b.to(torch.int8)
    return out


def _group_keys(model: torch.nn.Module, names: list[str], group: str) -> dict[str, str]:
    if group == "global":
        return {n: "all" for n in names}
    if group == "param":
        return {n: n for n in names}
    from ..arch.base import base_prefix, get_adapter

    adapter = get_adapter(model)
    prefix = base_prefix(model)
    return {n: adapter.classify(n, prefix)[0].role for n in names}


@torch.no_grad()
def compute_lr_scales(
    model: torch.nn.Module,
    births: Mapping[str, torch.Tensor],
    *,
    mode: str = "norm_ratio",
    clamp: tuple[float, float] = (0.1, 10.0),
    group: str = "role",
) -> dict[str, torch.Tensor]:
    """Per-element update multipliers from the birth stages (see the module docstring).

    For each group (``"role"``: all parameters of one role, e.g. every layer's ``q``; ``"param"``:
    each tensor alone; ``"global"``: the whole model) and each stage ``t > 0`` present in it, the
    scale of the group's stage-``t`` elements is ``||W_t||_F / ||W_0||_F`` (``mode="norm_ratio"``)
    or its inverse (``"inverse_norm_ratio"``), clamped to ``clamp``; stage-0 elements get 1.0.
    With ``mode="off"`` every scale is 1.0. A group with no stage-0 elements uses 1.0.

    Returns:
        ``{name: float32 tensor of the parameter's shape}`` for every name in ``births`` (CPU);
        multiply the learning rate of each element by it through :class:`UpdateScaler`.

    Raises:
        ProgtrainConfigError: unknown ``mode``/``group``, a bad clamp range, or stages that do not
            match the model's parameters.
    """
    if mode not in MODES:
        raise ProgtrainConfigError(f"lr_scales mode {mode!r} is not one of {', '.join(MODES)}: pick one of those")
    if group not in GROUPS:
        raise ProgtrainConfigError(f"lr_scales group {group!r} is not one of {', '.join(GROUPS)}: pick one of those")
    lo, hi = (float(c) for c in clamp)
    if not 0.0 <= lo <= hi:
        raise ProgtrainConfigError(f"lr_scales clamp {tuple(clamp)} must be (low, high) with 0 <= low <= high")
    params = _plain_params(model)
    missing = [n for n in births if n not in params]
    bad_shape = [n for n in births if n in params and tuple(births[n].shape) != tuple(params[n].shape)]
    if missing or bad_shape:
        raise ProgtrainConfigError(
            f"birth stages do not match the model (unknown: {missing[:3]}, wrong shape: {bad_shape[:3]}): "
            f"recompute them with update_birth_stages for this model"
        )
    names = list(births)
    scales = {n: torch.ones(tuple(births[n].shape), dtype=torch.float32) for n in names}
    if mode == "off":
        return scales
    keys = _group_keys(model, names, group)
    # squared Frobenius norm per (group, stage), accumulated in float64
    sq: dict[tuple[str, int], float] = {}
    for n in names:
        b = births[n].cpu()
        w = params[n].detach().to("cpu", torch.float64)
        for t in torch.unique(b).tolist():
            sq[(keys[n], t)] = sq.get((keys[n], t), 0.0) + float(w[b == t].pow(2).sum())
    ratio: dict[tuple[str, int], float] = {}
    for (g, t), s in sq.items():
        if t == 0:
            continue
        n0 = sq.get((g, 0))
        if n0 is None:
            ratio[(g, t)] = 1.0
            continue
        num, den = (s, n0) if mode == "norm_ratio" else (n0, s)
        r = 1.0 if (num == 0.0 and den == 0.0) else (float("inf") if den == 0.0 else (num / den) ** 0.5)
        ratio[(g, t)] = min(max(r, lo), hi)
    for n in names:
        b = births[n].cpu()
        for t in torch.unique(b).tolist():
            if t != 0:
                scales[n][b == t] = ratio[(keys[n], t)]
    summary = {f"{g}@{t}": round(r, 6) for (g, t), r in sorted(ratio.items())}
    logger.info("lr scales (%s, group=%s, clamp=%s): %s", mode, group, (lo, hi), summary)
    return scales


def _direct_get(p: torch.Tensor) -> torch.Tensor:
    return p.detach()


def _direct_set(p: torch.Tensor, value: torch.Tensor) -> None:
    p.data.copy_(value)


class UpdateScaler:
    """Run ``optimizer.step()`` and scale each element's update: ``p <- p_before + s * (p_after - p_before)``.

    Args:
        optimizer: any ``torch.optim.Optimizer`` (or a wrapper with ``step``/``zero_grad``).
        named_params: ``{plain name: parameter}`` of the model the optimizer updates.
        scales: ``{name: per-element multiplier}`` (e.g. :func:`compute_lr_scales`); names missing
            here take the plain update; tensors that are all 1.0 are skipped (no copy kept).
        get_param: returns the full value the optimizer updates for a parameter (default: the
            parameter itself).
        set_param: writes a full value back (default: ``p.data.copy_``).
            :meth:`progtrain.train.distributed.Engine.update_scaler` passes the pair its engine needs.

    Raises:
        ProgtrainConfigError: a scale for a name not in ``named_params`` or with another shape.
    """

    def __init__(
        self,
        optimizer: Any,
        named_params: Mapping[str, torch.nn.Parameter],
        scales: Mapping[str, torch.Tensor],
        *,
        get_param: Callable[[torch.nn.Parameter], torch.Tensor] | None = None,
        set_param: Callable[[torch.nn.Parameter, torch.Tensor], None] | None = None,
    ) -> None:
        unknown = [n for n in scales if n not in named_params]
        if unknown:
            raise ProgtrainConfigError(
                f"update scales for unknown parameters {unknown[:3]}: key the scales by the names in named_params "
                f"(plain HF parameter names of the unwrapped model)"
            )
        self.optimizer = optimizer
        self.get_param = get_param or _direct_get
        self.set_param = set_param or _direct_set
        self._items: list[tuple[str, torch.nn.Parameter, torch.Tensor]] = []
        for name, s in scales.items():
            p = named_params[name]
            if tuple(s.shape) != tuple(p.shape):
                raise ProgtrainConfigError(
                    f"update scale for {name!r} has shape {tuple(s.shape)}, the parameter {tuple(p.shape)}: "
                    f"recompute the scales for this model"
                )
            if bool((s == 1).all()):
                continue
            self._items.append((name, p, s.detach()))

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def snapshot(self) -> None:
        """Record the scaled parameters' values before an update made elsewhere (an engine that steps
        its optimizer inside ``backward``: snapshot before it, :meth:`apply` after it)."""
        self._before = [self.get_param(p).detach().clone() for _, p, _ in self._items]

    @torch.no_grad()
    def apply(self) -> None:
        """Scale the update made since :meth:`snapshot`: ``p <- p_before + s * (p_now - p_before)``."""
        before = getattr(self, "_before", None)
        if before is None:
            raise RuntimeError("UpdateScaler.apply() without a snapshot() before the update")
        for (_, p, s), b in zip(self._items, before):
            after = self.get_param(p)
            s = s.to(device=after.device, dtype=after.dtype)
            self.set_param(p, b.add_((after.detach() - b) * s))
        self._before = None

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimizer step with every element's update multiplied by its scale; returns what
        ``optimizer.step`` returns."""
        self.snapshot()
        if closure is None:
            loss = self.optimizer.step()
        else:
            with torch.enable_grad():
                loss = self.optimizer.step(closure)
        self.apply()
        return loss
