"""``gradmax``: new FFN units that start silent but with the largest possible gradient (GradMax,
Evci et al. 2022).

A new unit gets **zero fan-in** and a trained-looking **fan-out**. Its output ``act(0) = 0``
(GELU, and SwiGLU's ``silu(gate . x) * (up . x)`` with a zero ``up`` row), so the growth is exact.
For a unit with zero fan-in the gradient of its fan-in is ``act'(0) * w^T M`` with
``M = E[dL/dz_out h_in^T]`` (``z_out`` the FFN output, ``h_in`` the FFN input, averaged over tokens
of the calibration batches): the fan-out columns that maximise the new fan-in's gradient norm under
a spectral-norm bound are the top-k left singular vectors of ``M``. As in the paper's code, each
column is then normalised and scaled to ``fanout_scale`` times the mean L2 norm of the layer's
existing fan-out columns (``scale_method="mean_norm"``; ``"fixed"`` uses ``fanout_scale`` itself).

Gated FFNs: only the ``up`` rows (and bias) of new units are zero; their ``gate`` rows are drawn as
``function_preserving`` draws free entries, since a zero gate and a zero up row would leave both
without gradient. The fan-out then uses the same ``M`` (the paper's linear-unit correlation); each
new unit's actual fan-in gradient is additionally weighted by its own gate activation.

When a layer gains more units than ``min(d_out, d_in)`` singular vectors exist, the extra columns are
random unit vectors at the same scale (counted in the report). Exactness is checked on the first
calibration batch (the new units' activations must be exactly zero) and reported otherwise.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import torch
from torch import nn

from ..errors import ProgtrainConfigError
from .base import GrowthContext, option, register_strategy
from .function_preserving import FunctionPreserving, FunctionPreservingOptions
from .signed_split import (
    FFNLayer,
    LossFn,
    _ParamsRequireGrad,
    check_batches,
    default_loss,
    ffn_pass,
    find_ffn_layers,
)

logger = logging.getLogger(__name__)


def gradient_correlation(
    model: nn.Module, layers: Sequence[FFNLayer], batches: Sequence[Any], loss_fn: LossFn = default_loss
) -> list[torch.Tensor]:
    """Per FFN, ``M = mean over batches of sum_t dL/dz_t h_t^T`` (``d_out x d_in``): ``dL/dz`` the
    gradient of the batch loss at the FFN output, ``h`` the FFN input, summed over the batch's tokens."""
    Ms: list[torch.Tensor | None] = [None] * len(layers)
    with _ParamsRequireGrad(model):
        for batch in batches:
            fp = ffn_pass(model, layers, batch, loss_fn)
            for i, (dz, h) in enumerate(zip(fp.dz, fp.h)):
                m = dz.reshape(-1, dz.shape[-1]).T @ h.reshape(-1, h.shape[-1])
                Ms[i] = m if Ms[i] is None else Ms[i] + m
    return [m / len(batches) for m in Ms]


@torch.no_grad()
def zero_new_fan_in(layer: FFNLayer) -> None:
    """Zero the fan-in of the layer's new units (``up`` rows and biases; ``gate`` rows too unless the
    FFN is gated, where the gate keeps its values so the unit can learn)."""
    gated = layer.gated
    for _, p, ax, is_gate in layer.fan_in:
        if gated and is_gate:
            continue
        p.index_fill_(ax, layer.new_units, 0.0)


@torch.no_grad()
def gradmax_fan_out(
    layer: FFNLayer,
    M: torch.Tensor,
    *,
    fanout_scale: float = 1.0,
    scale_method: str = "mean_norm",
    generator: torch.Generator | None = None,
) -> dict:
    """Set the ``down`` columns of the layer's new units to the top-k left singular vectors of ``M``
    (k = number of new units), scaled as in the module docstring. Returns a small report."""
    new = layer.new_units
    k = int(new.numel())
    U, S, _ = torch.linalg.svd(M.to(torch.float64), full_matrices=False)
    r = min(k, U.shape[1])
    cols = [U[:, :r].T]
    if k > r:
        extra = torch.randn(k - r, U.shape[0], generator=generator, dtype=torch.float64)
        cols.append(extra / extra.norm(dim=1, keepdim=True))
    cols = torch.cat(cols)  # k x d_out, unit rows
    down = layer.down.detach()
    old = down.index_select(layer.down_axis, layer.old_units()).movedim(layer.down_axis, 0)
    if scale_method == "mean_norm":
        magnitude = float(old.reshape(old.shape[0], -1).norm(dim=1).mean()) * fanout_scale
    elif scale_method == "fixed":
        magnitude = fanout_scale
    else:
        raise ProgtrainConfigError(f"gradmax: scale_method must be 'mean_norm' or 'fixed', got {scale_method!r}")
    values = (cols * magnitude).to(down.dtype)  # k x d_out
    for j, unit in enumerate(new.tolist()):
        down.select(layer.down_axis, unit).copy_(values[j])
    return {
        "new_units": k,
        "singular_vectors": r,
        "random_columns": k - r,
        "top_singular_values": [float(f"{s:.6g}") for s in S[:r].tolist()[:8]],
        "fanout_norm": magnitude,
    }


@dataclass
class GradMaxOptions(FunctionPreservingOptions):
    fanout_scale: float = option(1.0, "magnitude of the new units' fan-out columns (see scale_method)")
    scale_method: Literal["mean_norm", "fixed"] = option(
        "mean_norm", "fan-out magnitude: fanout_scale x the old columns' mean norm, or fanout_scale itself"
    )
    seed: int = option(0, "seed of the random columns added when there are fewer singular vectors than units")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.require(self.fanout_scale > 0, "fanout_scale", "must be > 0")


@register_strategy("gradmax")
class GradMax(FunctionPreserving):
    """New FFN units with zero fan-in and fan-out from the top singular vectors of the gradient
    correlation ``M`` (GradMax, Evci et al. 2022; see the module docstring), on calibration
    batches (``grow(data=...)``).

    ``scale`` is the noise of other free blocks and of gated units' gate rows, as
    ``function_preserving``. Other growth (hidden, heads, depth) is done as by
    ``function_preserving``.
    """

    preserves_function = True
    needs_data = True
    Options = GradMaxOptions

    def before(self, ctx: GrowthContext) -> None:
        check_batches(ctx.data, self.name)

    def after(self, ctx: GrowthContext) -> None:
        o = self.options
        model = ctx.new_model
        batches = list(ctx.data)
        layers = [L for L in find_ffn_layers(model, ctx.param_maps) if L.new_units.numel() > 0]
        if not layers:
            return
        for L in layers:
            zero_new_fan_in(L)
        Ms = gradient_correlation(model, layers, batches)
        gen = torch.Generator().manual_seed(o.seed)
        report = {}
        for L, M in zip(layers, Ms):
            report[L.name] = gradmax_fan_out(
                L, M, fanout_scale=o.fanout_scale, scale_method=o.scale_method, generator=gen
            )
        with _ParamsRequireGrad(model):
            fp = ffn_pass(model, layers, batches[0])
        leak = max(float(a.index_select(-1, L.new_units).abs().max()) for L, a in zip(layers, fp.a))
        ctx.report["gradmax"] = {"layers": report, "max_abs_new_unit_activation": leak}
        if leak > 0:
            ctx.report.setdefault("notes", []).append(
                f"gradmax: the FFN activation is not zero at zero fan-in (new units output up to {leak:.3e}); "
                f"growth is approximate"
            )
