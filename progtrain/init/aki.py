r"""``aki``: advanced knowledge initialization for width growth (bert2BERT, Chen et al. 2021,
arXiv 2110.07143): new units borrow the trained units of the *next* layer.

Exact copies of a layer's own units are symmetric with them and stay so under training unless
something breaks the tie; bert2BERT's AKI takes the new units of layer ``l`` from layer ``l + 1``
instead, which brings trained, different weights into the new capacity. Here the growth operator
builds every constrained block as for ``function_preserving`` (old entries copied or split,
fan-out of new units zero) and AKI fills only the *free* entries, so the growth keeps the function
exactly (measured by :func:`progtrain.grow` like any growth, ``GrowthResult.deviation``).

What is copied from where. Grown layer ``l`` is built from old layer ``j`` (``j = l`` for pure width
growth; for a layer added by depth growth, its source layer); its *donor* is old layer
``n = j + 1``, or ``j`` itself for the top layer (``j = L - 1``). New units are numbered in order
of appearance, ``m = 0, 1, ...``; the ``m``-th new unit of a space takes unit ``m mod N_old`` of the
donor (``N_old``: the old number of units of that space), cycling when more units are added than
existed.

* **FFN units** (``ffn.out``): the new rows of ``up`` and ``gate`` and their biases are the donor's
  rows/bias entries of unit ``m mod ffn_old``. Their fan-out (``down`` columns, ``ffn.in``) is zero
  -> exact for any fan-in.
* **Attention heads** (``q.out``, ``k.out``, ``v.out``, fused ``qkv.out``): the ``m``-th new query
  head takes the donor's query head ``m mod heads_old`` (its ``head_dim`` rows and bias entries);
  the ``m``-th new key/value head takes the donor's key/value head ``m mod kv_heads_old``; in a
  fused projection each part (q, k, v) is taken from its own part of the donor's, in the
  adapter's layout. The new heads' ``o`` columns (``o.in``) are zero -> exact. Query rows get the
  multiplier the growth applies to layer ``l``'s own query rows (the attention-scale law; 1 unless
  ``head_dim`` or the layer's scale changes).
* **Fan-in of the copies**: the copied rows read the grown residual stream through the same hidden
  plan as layer ``l``'s own rows: under integer widening (tiling) a donor row ``w`` becomes
  ``[w/k, ..., w/k]`` (no noise: the copies already differ from layer ``l``'s units).
* **Hidden coordinates**: under integer widening the new stream coordinates are tiled copies, all
  constrained (writers tiled, readers split with cancelling noise): nothing is free and AKI changes
  nothing there. Under non-integer widening (padding, pre-norm families) the readers' columns for
  the new coordinates are free (every norm outputs zero there): column ``c >= d_old`` of layer ``l``'s
  ``q/k/v/up/gate`` is the donor's column ``c mod d_old`` of the same row. Writers' new rows stay as
  the construction requires (zero, or the mean under LayerNorm).
* **Everything else free** -- entries with no counterpart in the donor (new ``head_dim`` entries of
  a widened head, free entries of tensors outside the blocks such as an untied LM head's new
  columns) -- is filled as ``function_preserving`` does (matrix entries ``N(0, (scale * std_old)^2)``,
  vector entries 0); the count is in the growth record (``strategy_report["aki"]``).

Differences from the paper: bert2BERT also fills the new units' fan-out from the donor (and
divides the split fan-out), so its AKI changes the function slightly; here the fan-out stays zero
(the construction in :mod:`progtrain.growth.plan`), so the growth is exact and the new units'
fan-out is learned from its first gradient on. The top layer borrows from itself, as in the paper.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch

from ..arch.base import base_prefix, iter_params
from ..growth.plan import OLD, AxisPlan, apply_plans
from .base import GrowthContext, TensorGrowth, register_strategy
from .function_preserving import FunctionPreserving, FunctionPreservingOptions

logger = logging.getLogger(__name__)

#: Axis tags whose new entries are attention heads: planned with the donor's head maps.
HEAD_TAGS = frozenset({"q.out", "k.out", "v.out", "qkv.out"})
#: Axis tags whose new entries are cycled over the donor's old indices (FFN units, padded stream).
CYCLED_TAGS = frozenset({"ffn.out", "hidden.in"})


@dataclass
class AKIOptions(FunctionPreservingOptions):
    """``scale``: std, relative to the trained tensor's, of free entries the donor layer has no
    counterpart for (filled as ``function_preserving``)."""


def cycle_new(src: list[int], n_old: int) -> list[int]:
    """``src`` with its ``m``-th new entry (``-1``) replaced by ``m mod n_old``."""
    out, m = [], 0
    for s in src:
        if s < 0:
            out.append(m % n_old)
            m += 1
        else:
            out.append(s)
    return out


@register_strategy("aki")
class AKI(FunctionPreserving):
    """Advanced knowledge initialization (bert2BERT, Chen et al. 2021): new FFN units and heads of
    layer l copy the units of layer l+1 (the top layer: its own), fan-out zero, exact (see the module
    docstring)."""

    preserves_function = True
    Options = AKIOptions

    def before(self, ctx: GrowthContext) -> None:
        maps = ctx.maps
        self._maps = maps
        self._adapter = maps.adapter
        self._prefix = base_prefix(ctx.old_model)
        self._old = {n: p for n, p in iter_params(ctx.old_model)}
        # the same maps with every new head given a donor head: m-th new head <- old head m mod N
        self._donor_maps = dataclasses.replace(
            maps,
            q_src=cycle_new(maps.q_src, maps.src.heads),
            kv_src=cycle_new(maps.kv_src, maps.src.kv_heads),
            _cache={},
        )
        self._from_next = 0
        self._fallback = 0
        self._donors: dict[int, int] = {}

    def donor_layer(self, layer: int) -> int:
        """Old layer whose units fill grown layer ``layer``'s new units: the one above its source
        layer, or the source itself at the top."""
        j = self._maps.layer_src[layer]
        return min(j + 1, self._maps.src.layers - 1)

    def _donor_value(self, t: TensorGrowth) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(value, ok)``: the donor layer's tensor laid out like ``t`` and where it has a value."""
        _, layer, suffix = self._adapter.classify(t.name, self._prefix)
        if layer is None:
            return None
        n = self.donor_layer(layer)
        self._donors[layer] = n
        old = self._old[self._adapter.layer_param_name(self._prefix, n, suffix)].detach().float()
        plans: list[AxisPlan | None] = []
        for dim, tag in enumerate(t.axes):
            if tag is None:
                plans.append(None)
            elif tag in HEAD_TAGS:
                plans.append(self._donor_maps.plan(tag, t.role, layer))
            else:
                p = self._maps.plan(tag, t.role, layer)
                if tag in CYCLED_TAGS and bool((p.src < 0).any()):
                    src = torch.tensor(cycle_new(p.src.tolist(), old.shape[dim]), dtype=torch.long)
                    p = AxisPlan(src, p.scale, p.fill, p.group)
                plans.append(p)
        value, status = apply_plans(old, plans, 0.0, None)
        return value, status == OLD

    @torch.no_grad()
    def init_tensor(self, t: TensorGrowth) -> None:
        if not bool(t.free.any()):
            return
        rest = t.free
        donor = self._donor_value(t)
        if donor is not None:
            value, ok = donor
            take = t.free & ok
            t.value[take] = value[take]
            self._from_next += int(take.sum())
            rest = t.free & ~ok
        if bool(rest.any()):
            self._fallback += int(rest.sum())
            super().init_tensor(dataclasses.replace(t, free=rest))  # writes into the shared t.value

    def after(self, ctx: GrowthContext) -> None:
        ctx.report["aki"] = {
            "entries_from_next_layer": self._from_next,
            "entries_as_function_preserving": self._fallback,
            "donor_layer": {str(k): v for k, v in sorted(self._donors.items())},
        }
        logger.info(
            "aki: %d free entries copied from the next layer, %d drawn as function_preserving",
            self._from_next, self._fallback,
        )
