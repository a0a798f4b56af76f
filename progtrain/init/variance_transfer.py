r"""``variance_transfer``: grow under a fan-in scaled parameterisation (Yuan, Savarese & Maire 2023).

The weights of a layer follow ``std(W) = c * fan_in**(-p)`` with a per-tensor constant ``c`` (read
off the trained tensor: ``c = std(W_old) * n_old**p``). When a tensor's fan-in grows from ``n_old``
to ``n_new``:

* **old weights are rescaled** by ``(n_old / n_new)**p`` so the layer keeps the variance its new width
  calls for (``rescale="sqrt"``: ``p = 1/2``, default; ``"linear"``: ``p = 1``, the factor some
  accounts of the paper give; ``"none"``: no rescale, new draws still follow ``p = 1/2``). "Old"
  means every entry the growth operator built from old values (copied, split, averaged); under
  integer widening a reader's fan-in is already split over the ``k`` stream copies (``W/k`` each,
  function-preserving), and the rescale multiplies that too: in every case the layer's old
  contribution to its output is multiplied by the factor.
* **new free fan-in blocks** are drawn from ``N(0, (std(W_old) * (n_old/n_new)**p)**2)``, i.e. at the
  fan-in rule of the (rescaled) old block; free vectors (biases) are 0. A tensor whose fan-in does
  not grow (``n_old == n_new``, e.g. the ``up`` rows of new FFN units) draws at ``std(W_old)``.
* **new fan-out blocks** (the ``down`` columns of new FFN units, the ``o`` columns of new heads) are
  zero (``fan_out="zero"``, default) or, for FFN units, **paired**: new units are taken two by two in
  order, the second gets the first's fan-in (``[V; V]``: the same ``up``/``gate`` rows and biases)
  and the pair writes through ``[Z, -Z]`` with ``Z`` drawn at the fan-out tensor's fan-in rule, so
  the pair's outputs cancel exactly while their gradients differ. An odd last unit, new units of
  inserted layers and new attention heads keep zero fan-out (query heads share keys/values within a
  group, so a +/-Z head pair is not defined in general).

**Exactness.** A rescale ``f != 1`` of a reader changes what the following norm, softmax or residual
add sees, so the grown model is *not* function-preserving then. After the growth the strategy
measures, block by block, how far the logits move when only that block's rescale is applied (relative
to max |logits| of the grown model without any rescale, on the random tokens of
:func:`progtrain.verify.measure_deviation`) and reports it in
the growth notes, the record (``strategy_report["variance_transfer"]``) and the log. With
``rescale="none"`` and ``fan_out="zero"`` (or ``"paired"``) the growth is exact to the core's
tolerance.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Literal

import torch

from .base import GrowthContext, InitStrategy, StrategyOptions, TensorGrowth, option, reference_std, register_strategy

logger = logging.getLogger(__name__)

RESCALES = {"sqrt": 0.5, "linear": 1.0, "none": 0.5}


@dataclass
class VarianceTransferOptions(StrategyOptions):
    rescale: Literal["sqrt", "linear", "none"] = option(
        "sqrt", "rescale of old weights whose fan-in grows: (n_old/n_new)**p with p = 1/2 (sqrt), 1 (linear), or none"
    )
    fan_out: Literal["zero", "paired"] = option(
        "zero", "new FFN units' fan-out: zero, or paired (+Z/-Z pairs that cancel exactly)"
    )
    measure: bool = option(True, "measure the per-block logit deviation of the rescale after growth")


@register_strategy("variance_transfer")
class VarianceTransfer(InitStrategy):
    """Variance transfer (Yuan, Savarese & Maire 2023): old weights rescaled to their new fan-in, new
    blocks drawn at the fan-in rule (see the module docstring)."""

    preserves_function = True
    Options = VarianceTransferOptions

    def __init__(self, options: VarianceTransferOptions | None = None, **values: Any) -> None:
        super().__init__(options, **values)
        self._reset(None)

    def _reset(self, maps) -> None:
        self._maps = maps
        self._unscaled: dict[str, torch.Tensor] = {}  # name -> value before the rescale
        self._factors: dict[str, float] = {}
        self._pairs = 0
        self._unpaired = 0

    # ------------------------------------------------------------------ hooks
    def before(self, ctx: GrowthContext) -> None:
        self._reset(ctx.maps)

    @property
    def power(self) -> float:
        return RESCALES[self.options.rescale]

    @torch.no_grad()
    def init_tensor(self, t: TensorGrowth) -> None:
        if t.is_vector:
            if bool(t.free.any()):
                t.value[t.free] = 1.0 if "hidden.gain" in t.axes else 0.0
            return
        ratio = t.fan_in_old / t.fan_in_new
        std = reference_std(t) * ratio**self.power
        new = t.free
        if bool(t.free.any()):
            t.value.copy_(torch.where(t.free, torch.randn(t.value.shape, generator=t.generator) * std, t.value))
        if self.options.fan_out == "paired" and not t.new_layer and self._maps is not None:
            paired = self._pair(t, std)
            if paired is not None:
                new = new | paired
        if self.options.rescale != "none" and ratio != 1.0:  # rescale what was built from old values
            f = ratio**self.power
            if self.options.measure:
                self._unscaled[t.name] = t.value.clone()
            t.value.copy_(torch.where(new, t.value, t.value * f))
            self._factors[t.name] = f

    def _new_unit_pairs(self, tag: str, role: str) -> tuple[torch.Tensor, torch.Tensor, int]:
        new = (self._maps.plan(tag, role).src < 0).nonzero().flatten()
        n = new.numel() // 2
        return new[0 : 2 * n : 2], new[1 : 2 * n : 2], new.numel() - 2 * n

    def _pair(self, t: TensorGrowth, std: float) -> torch.Tensor | None:
        """Pair new FFN units in place; returns the mask of fan-out entries written (None if none)."""
        if "ffn.out" in t.axes:  # fan-in of units: the second of a pair copies the first
            ax = t.axes.index("ffn.out")
            a, b, _ = self._new_unit_pairs("ffn.out", t.role)
            if a.numel():
                copy = t.value.index_select(ax, a)
                keep = t.value.index_select(ax, b)
                t.value.index_copy_(ax, b, torch.where(t.free.index_select(ax, b), copy, keep))
        elif "ffn.in" in t.axes:  # fan-out of units: +Z / -Z
            ax = t.axes.index("ffn.in")
            a, b, odd = self._new_unit_pairs("ffn.in", t.role)
            if a.numel():
                shape = list(t.value.shape)
                shape[ax] = a.numel()
                z = torch.randn(shape, generator=t.generator) * std
                t.value.index_copy_(ax, a, z)
                t.value.index_copy_(ax, b, -z)
            self._pairs += a.numel()
            self._unpaired += odd
            if a.numel():
                shape = [1] * t.value.dim()
                shape[ax] = t.value.shape[ax]
                sel = torch.zeros(t.value.shape[ax], dtype=torch.bool)
                sel[a] = True
                sel[b] = True
                return sel.view(shape).expand_as(t.value)
        return None

    @torch.no_grad()
    def after(self, ctx: GrowthContext) -> None:
        rep: dict = {"rescale": self.options.rescale, "fan_out": self.options.fan_out}
        if self.options.fan_out == "paired":
            rep["unit_pairs"] = self._pairs
            rep["unpaired_units"] = self._unpaired
        if self._factors:
            rep["factors"] = {n: round(f, 6) for n, f in self._factors.items()}
            groups = self._group(ctx)
            fmin, fmax = min(self._factors.values()), max(self._factors.values())
            note = (
                f"variance_transfer rescale={self.options.rescale}: {len(self._factors)} tensors whose fan-in grew "
                f"were rescaled by {fmin:.4g}" + (f"..{fmax:.4g}" if fmax != fmin else "")
            )
            if self.options.measure and self._unscaled:
                dev = self._measure(ctx, groups)
                rep["block_deviation"] = dev
                worst = sorted(dev.items(), key=lambda kv: -kv[1])
                note += "; rel. logit deviation from each block's rescale alone: " + ", ".join(
                    f"{g} {d:.2e}" for g, d in worst
                )
            note += " (init option rescale=none keeps the growth exact)"
            ctx.report.setdefault("notes", []).append(note)
            for g, names in groups.items():
                logger.info("variance_transfer %s: %s", g, ", ".join(f"{n} x{self._factors[n]:.4g}" for n in names))
            logger.info(note)  # grow() warns with every note of an approximate growth
        ctx.report["variance_transfer"] = rep
        self._unscaled = {}

    def _group(self, ctx: GrowthContext) -> dict[str, list[str]]:
        from ..arch.base import base_prefix

        adapter, prefix = self._maps.adapter, base_prefix(ctx.new_model)
        groups: dict[str, list[str]] = defaultdict(list)
        for name in self._factors:
            _, layer, _ = adapter.classify(name, prefix)
            groups["non-layer" if layer is None else f"layer {layer}"].append(name)
        return dict(groups)

    def _measure(self, ctx: GrowthContext, groups: dict[str, list[str]]) -> dict[str, float]:
        """By group: max |delta outputs| when only that group's rescale is applied, relative to max
        |outputs| of the grown model with every rescale undone (the function-preserving growth), on
        the random tokens :func:`progtrain.verify.measure_deviation` uses."""
        from ..verify import model_outputs, random_inputs

        model = ctx.new_model
        ids = random_inputs(ctx.old_model)
        params = {n: model.get_parameter(n) for n in self._unscaled}
        held = dict(self._unscaled)  # tensors are swapped in and out: no copies of the weights are made

        def swap(names) -> None:
            for n in names:
                p = params[n]
                p.data, held[n] = held[n].to(p.dtype), p.data

        swap(list(held))  # every rescale undone
        out = {}
        try:
            _, base = model_outputs(model, ids)
            ref = float(base.abs().max()) or 1.0
            for g, names in groups.items():
                names = [n for n in names if n in params]
                swap(names)
                _, y = model_outputs(model, ids)
                out[g] = float((y - base).abs().max()) / ref
                swap(names)
        finally:
            swap(list(held))
        return out
