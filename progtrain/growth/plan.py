"""Space maps and per-axis plans: how each grown tensor is built from its old tensor.

A growth changes *spaces* (hidden, heads, kv-heads, head_dim, ffn, layers). For every axis tag
(see :mod:`progtrain.arch.base`) the :class:`SpaceMaps` give an :class:`AxisPlan`: for each index of
the grown axis, the old index it comes from (or -1 when it is new), a multiplier for the old value,
and how a new index is filled:

* ``OLD``   — taken from the old tensor (copied or split), times ``scale``;
* ``FREE``  — not constrained by function preservation: the init strategy fills it;
* ``ZERO``  — must be zero to keep the function (new heads' ``o`` columns, new units' ``down``
  columns, padded stream rows under RMSNorm);
* ``MEAN``  — the mean of the old entries along the axis (padded stream rows under LayerNorm).

Applying the plans of a tensor's axes one after the other builds the grown tensor together with a
status tensor; a ZERO on any axis wins over FREE. Axis plans are 1-D, so the same plans also map
optimizer state (:class:`ParamMap`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..arch.base import EMBED_ROLE, HEAD_INPUT_NORM_ROLE, ArchAdapter, Sizes

if TYPE_CHECKING:
    from .spec import GrowthPlan

OLD, FREE, ZERO, MEAN = 0, 1, 2, 3


@dataclass
class AxisPlan:
    """How one axis grows. ``src[j]`` is the old index of new index ``j`` (-1 = new), ``scale[j]`` the
    multiplier of the old value, ``fill[j]`` the fill code of a new index, and ``group`` (optional)
    the ids of copies whose symmetry-breaking noise must cancel."""

    src: torch.Tensor
    scale: torch.Tensor
    fill: torch.Tensor
    group: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return int(self.src.numel())


def _plan(src: list[int] | torch.Tensor, scale=1.0, new_fill: int = FREE, group=None) -> AxisPlan:
    src = torch.as_tensor(src, dtype=torch.long)
    n = src.numel()
    scale_t = torch.full((n,), float(scale)) if not torch.is_tensor(scale) else scale.float()
    fill = torch.where(src >= 0, torch.tensor(OLD), torch.tensor(new_fill)).to(torch.int8)
    return AxisPlan(src, scale_t, fill, group)


def _pad(old: int, new: int) -> list[int]:
    return list(range(old)) + [-1] * (new - old)


def _gqa_head_maps(h: int, kv: int, h2: int, kv2: int) -> tuple[list[int], list[int]]:
    """Place old query heads so each keeps its key/value head in the grown grouping.

    Returns ``(q_src, kv_src)``: for each grown query head its old head (-1 new) and for each grown
    kv head its old kv head (-1 new; an old kv head may be copied into several groups when the group
    size shrinks).
    """
    g, g2 = h // kv, h2 // kv2
    q_src, kv_src = [-1] * h2, [-1] * kv2
    nxt = 0  # next free grown group
    for old_kv in range(kv):
        heads = list(range(old_kv * g, (old_kv + 1) * g))
        while heads:
            chunk, heads = heads[:g2], heads[g2:]
            if nxt >= kv2:  # validated in GrowthSpec.resolve; kept as a guard
                raise RuntimeError(f"cannot regroup {h}/{kv} heads into {h2}/{kv2} (GrowthSpec.resolve should have refused it)")
            kv_src[nxt] = old_kv
            for i, oh in enumerate(chunk):
                q_src[nxt * g2 + i] = oh
            nxt += 1
    # with plain MHA growth (g == g2 == 1) this keeps old heads first and appends new ones
    return q_src, kv_src


def _concat_plans(parts: list[AxisPlan], old_sizes: list[int]) -> AxisPlan:
    """The plan of an axis that concatenates several spaces (fused [q|k|v], [gate|up]): part ``i``'s
    plan, its old indices shifted by the old sizes of the parts before it."""
    src, offset = [], 0
    for p, n in zip(parts, old_sizes):
        src.append(torch.where(p.src >= 0, p.src + offset, p.src))
        offset += n
    return AxisPlan(
        torch.cat(src), torch.cat([p.scale for p in parts]), torch.cat([p.fill for p in parts])
    )


def _changes_projection_statistics(heads_src: list[int]) -> bool:
    """True when a norm over a whole attention projection sees other statistics after a head growth:
    some grown head is new, or the old heads are copied unequally often (equal copies keep the mean)."""
    if any(h < 0 for h in heads_src):
        return True
    counts = {h: heads_src.count(h) for h in set(heads_src)}
    return len(set(counts.values())) > 1


@dataclass
class SpaceMaps:
    """Everything the operators need to know about one growth, independent of any tensor.

    Built by :meth:`build`; ``preserve`` is False for strategies that do not keep the function
    (then new entries are all FREE and nothing is tiled or rescaled).
    """

    adapter: ArchAdapter
    src: Sizes
    tgt: Sizes
    preserve: bool
    tied_head: bool
    hidden_mode: str  # "same", "tile" or "pad"
    q_src: list[int]
    kv_src: list[int]
    layer_src: list[int]  # old layer each grown layer comes from
    layer_new: list[bool]
    eps_scale: float = 1.0
    q_scale: list[float] | None = None  # per grown layer: multiplier of the old query rows
    embed_mult: float = 1.0  # multiplier of the embedding rows: old / new adapter.embed_scale
    _cache: dict = field(default_factory=dict, repr=False)

    layer_init: list[str | None] = field(default_factory=list)  # per grown layer: GrowthPlan.layer_init

    @classmethod
    def build(cls, plan: "GrowthPlan", tied_head: bool) -> "SpaceMaps":
        """The maps of one planned growth (:func:`~progtrain.growth.spec.plan_growth`): sizes, hidden
        mode, layer sources and epsilon scale come from the plan; the head maps and each block's query
        scale (the adapter's attention-scale law, evaluated on the source config) are derived here.
        ``tied_head``: the model's LM head shares the token embedding."""
        src, tgt, adapter = plan.source_sizes, plan.target_sizes, plan.adapter
        preserve = plan.strategy.preserves_function
        q_src, kv_src = _gqa_head_maps(src.heads, src.kv_heads, tgt.heads, tgt.kv_heads)
        layer_src = list(plan.layer_sources)
        # keep q.k * scale of every block: old scale (source layer, old head_dim) / new scale, so a block
        # that moves, or a copy of it, scores attention as its source did
        cfg = plan.source_config
        law = adapter.attention_scale
        q_scale = [
            law(cfg, j, src.head_dim) / law(cfg, i, tgt.head_dim) if preserve else 1.0
            for i, j in enumerate(layer_src)
        ]
        # keep the stream when the model multiplies the embedding by a width-dependent factor
        embed_mult = 1.0
        if preserve and adapter.embed_scale is not None:
            embed_mult = adapter.embed_scale(cfg, src.hidden) / adapter.embed_scale(cfg, tgt.hidden)
        return cls(
            adapter, src, tgt, preserve, tied_head, plan.hidden_mode, q_src, kv_src, layer_src,
            list(plan.layer_new), plan.eps_scale, q_scale, embed_mult=embed_mult, layer_init=list(plan.layer_init),
        )

    # ------------------------------------------------------------------ exactness
    def exactness_notes(self) -> list[str]:
        """Why this growth is expected not to preserve the function, known before any tensor is built
        (empty when the construction is exact in exact arithmetic). Whether a growth *is* exact is
        measured: see :func:`progtrain.growth.grow`."""
        notes = []
        if not self.preserve:
            notes.append("the init strategy does not preserve the function")
        if self.preserve and self.hidden_mode == "pad" and not self.adapter.config_keys.get("norm_eps"):
            notes.append(
                f"{self.adapter.name} norms have a fixed epsilon (not a config option), which non-integer "
                f"widening ({self.src.hidden}->{self.tgt.hidden}) would have to scale by "
                f"{self.src.hidden}/{self.tgt.hidden}: approximate by about eps / (stream variance); integer "
                f"multiples are exact"
            )
        if not self.adapter.pre_norm:
            if self.hidden_mode == "pad":
                notes.append(
                    f"{self.adapter.name} is post-norm: widening by a non-integer factor "
                    f"({self.src.hidden}->{self.tgt.hidden}) is approximate"
                )
            if any(self.layer_new):
                notes.append(
                    f"{self.adapter.name} is post-norm: a new block renormalises the stream, so depth "
                    f"growth is approximate without training (copy_zero_out is not the identity there); to "
                    f"keep the function exactly, grow in a `progtrain train` stage with `fade_in_steps: N` "
                    f"(each new block starts as h + m*(block(h) - h) at m = 0 and is faded in over N steps)"
                )
        copies = [i for i, m in enumerate(self.layer_init) if m == "copy"]
        if copies:
            notes.append(
                f"depth_init=copy: new layer(s) {copies} are copies of trained layers with their outputs kept, "
                f"so they change the function (use copy_zero_out or zero_out to keep it)"
            )
        qk_norm = self.adapter.qk_norm
        if qk_norm and self.preserve and any(abs(q - 1.0) > 1e-12 for q in self.q_scale or ()):
            notes.append(
                f"{self.adapter.name} normalises queries before the dot product: the attention-scale "
                f"change of this growth cannot be carried by the query rows, so it is approximate"
            )
        if qk_norm == "projection" and self.preserve:
            for what, heads_src in (("query", self.q_src), ("key/value", self.kv_src)):
                if _changes_projection_statistics(heads_src):
                    notes.append(
                        f"{self.adapter.name} normalises its {what} projection over all heads together: "
                        f"new {what} heads change that norm's statistics, so growing them is approximate "
                        f"(grow hidden size, FFN or depth for an exact growth)"
                    )
        return notes

    # ------------------------------------------------------------------ axis plans
    def plan(self, tag: str, role: str, layer: int | None = None) -> AxisPlan:
        """The plan for an axis tag; ``role`` matters only for the norm feeding a tied head, ``layer``
        (the grown block's index) only for query rows, whose scale follows the attention-scale law."""
        qs = 1.0
        if tag in ("q.out", "qkv.out") and layer is not None and self.q_scale is not None:
            qs = self.q_scale[layer]
        # q/k rows read by a q/k norm sharing the stream norms' epsilon (scaled by d/D on a non-integer
        # widening): scaling the rows by sqrt(d/D) gives the norm its old epsilon back
        rs = math.sqrt(self.eps_scale) if (self.adapter.qk_norm and role in ("q", "k")) else 1.0
        key = (tag, role == HEAD_INPUT_NORM_ROLE, role == EMBED_ROLE, qs, rs)
        if key not in self._cache:
            self._cache[key] = self._make_plan(tag, role, qs, rs)
        return self._cache[key]

    def _make_plan(self, tag: str, role: str, q_scale: float = 1.0, row_scale: float = 1.0) -> AxisPlan:
        s, t, keep = self.src, self.tgt, self.preserve
        space, _, kind = tag.partition(".")
        if space == "hidden":
            return self._hidden_plan(kind, role)
        if space == "ffn":
            return _plan(_pad(s.ffn, t.ffn), new_fill=FREE if (kind == "out" or not keep) else ZERO)
        if tag == "qkv.out":
            return self._fused_qkv_plan(q_scale)
        if tag == "gate_up.out":  # [gate | up]: the FFN plan in each half
            ffn = self._make_plan("ffn.out", role)
            return _concat_plans([ffn, ffn], [s.ffn, s.ffn])
        if space in ("q", "k", "v", "o"):
            return self._head_plan(space, q_scale, row_scale)
        raise ValueError(f"no plan for axis tag {tag!r}")

    def _hidden_plan(self, kind: str, role: str) -> AxisPlan:
        d, D = self.src.hidden, self.tgt.hidden
        if self.hidden_mode == "same":
            return _plan(list(range(d)))
        # the embedding rows times embed_mult keep the stream; a tied head reads them, so the norm
        # before it takes the inverse
        m = 1.0
        if self.preserve and kind != "in":
            if role == EMBED_ROLE and kind == "out":
                m = self.embed_mult
            elif role == HEAD_INPUT_NORM_ROLE and self.tied_head:
                m = 1.0 / self.embed_mult
        if self.hidden_mode == "tile":
            k = D // d
            src = torch.arange(D) % d
            if kind == "in":
                return _plan(src, scale=1.0 / k, group=src)
            scale = 1.0 / k if (role == HEAD_INPUT_NORM_ROLE and self.tied_head) else 1.0
            return _plan(src, scale=scale * m)
        # pad: exact for pre-norm families with the norm-gain/eps compensation, (docs/design.md, padding)
        if not self.preserve:
            return _plan(_pad(d, D), new_fill=FREE)
        if kind == "out":
            return _plan(_pad(d, D), scale=m, new_fill=MEAN if self.adapter.norm == "layernorm" else ZERO)
        if kind == "in":
            return _plan(_pad(d, D), new_fill=FREE)
        if kind == "gain":
            return _plan(_pad(d, D), scale=math.sqrt(d / D) * m, new_fill=MEAN)
        return _plan(_pad(d, D), scale=m, new_fill=ZERO)  # shift

    def _head_plan(self, part: str, q_scale: float = 1.0, row_scale: float = 1.0) -> AxisPlan:
        s, t, keep = self.src, self.tgt, self.preserve
        heads_src = self.kv_src if part in ("k", "v") else self.q_src
        hd, hd2 = s.head_dim, t.head_dim
        src, fill = [], []
        for h_old in heads_src:
            for e in range(hd2):
                if h_old >= 0 and e < hd:
                    src.append(h_old * hd + e)
                    fill.append(OLD)
                else:
                    src.append(-1)
                    new_head = h_old < 0
                    if not keep:
                        fill.append(FREE)
                    elif part == "o":
                        fill.append(ZERO)  # new heads / new value dims write nothing
                    elif part == "k" and not new_head:
                        fill.append(ZERO)  # new q.k dims of an old head contribute 0
                    else:
                        fill.append(FREE)
        # q_scale (attention-scale law: sqrt(hd2/hd) for a wider head under 1/sqrt(head_dim)) keeps q.k * scale
        scale = q_scale if (keep and part == "q") else 1.0
        if part in ("q", "k"):
            scale *= row_scale  # 1 unless a q/k norm needs its epsilon compensated (see plan())
        p = _plan(src, scale=scale)
        p.fill = torch.tensor(fill, dtype=torch.int8)
        return p

    def _fused_qkv_plan(self, q_scale: float = 1.0) -> AxisPlan:
        s, t = self.src, self.tgt
        parts = [self._head_plan(x, q_scale) for x in ("q", "k", "v")]
        hd, hd2 = s.head_dim, t.head_dim
        layout = self.adapter.fused_qkv
        if layout == "concat":  # [q | k | v], k and v with kv_heads heads (GQA) or heads
            kv_old = s.kv_heads * hd
            return _concat_plans(parts, [s.heads * hd, kv_old, kv_old])
        if s.kv_heads != s.heads or t.kv_heads != t.heads:
            raise ValueError("a per-head fused q|k|v layout has one k and one v per query head (no GQA)")
        src, scale, fill = [], [], []
        for n in range(3 * t.heads * hd2):
            # per_head: (heads, 3, head_dim)
            h2, rem = divmod(n, 3 * hd2)
            p, e = divmod(rem, hd2)
            r = h2 * hd2 + e
            plan = parts[p]
            o = int(plan.src[r])
            if o >= 0:
                o = (o // hd) * 3 * hd + p * hd + o % hd
            src.append(o)
            scale.append(float(plan.scale[r]))
            fill.append(int(plan.fill[r]))
        return AxisPlan(
            torch.tensor(src, dtype=torch.long), torch.tensor(scale), torch.tensor(fill, dtype=torch.int8)
        )


# ---------------------------------------------------------------------- tensor transform
def apply_plans(
    old: torch.Tensor,
    plans: list[AxisPlan | None],
    noise: float,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Build a grown tensor from ``old`` axis by axis.

    Returns ``(value, status)``: ``status`` holds OLD/FREE/ZERO per element (MEAN entries take the
    status of the entries they average). FREE entries are zero in ``value`` and left to the init
    strategy; ZERO entries are zero. ``noise`` is the std, relative to ``old.std()``, of the
    cancelling noise added to split (grouped) axes.
    """
    value = old.detach().float().clone()
    status = torch.zeros(old.shape, dtype=torch.int8)
    ref_std = float(value.std()) if value.numel() > 1 else 0.0
    for axis, plan in enumerate(plans):
        if plan is None:
            continue
        idx = plan.src.clamp(min=0)
        value = value.index_select(axis, idx)
        status = status.index_select(axis, idx)
        shape = [1] * value.dim()
        shape[axis] = plan.size
        value = value * plan.scale.view(shape)
        is_new = (plan.src < 0).view(shape)
        if bool(is_new.any()):
            fill = plan.fill.view(shape).expand_as(status)
            is_new_b = is_new.expand_as(status)
            value = torch.where(is_new_b, torch.zeros((), dtype=value.dtype), value)
            mean_sel = (plan.fill == MEAN) & (plan.src < 0)
            if bool(mean_sel.any()):
                old_sel = plan.src >= 0
                mean_val = value.index_select(axis, old_sel.nonzero().flatten()).mean(dim=axis, keepdim=True)
                mean_stat = status.index_select(axis, old_sel.nonzero().flatten()).amax(dim=axis, keepdim=True)
                msk = mean_sel.view(shape).expand_as(status)
                value = torch.where(msk, mean_val.expand_as(value), value)
                status = torch.where(msk, mean_stat.expand_as(status), status)
            code = torch.where(fill == MEAN, torch.zeros((), dtype=torch.int8), fill)
            status = torch.where(is_new_b, torch.maximum(status, code), status)
        if plan.group is not None and noise > 0 and ref_std > 0:
            n = torch.randn(value.shape, generator=generator) * (noise * ref_std)
            # subtract each group's mean so the copies' noise sums to zero
            groups = plan.group
            n_groups = int(groups.max()) + 1
            gshape = list(value.shape)
            gshape[axis] = n_groups
            sums = torch.zeros(gshape).index_add_(axis, groups, n)
            counts = torch.bincount(groups, minlength=n_groups).float().view(shape[:axis] + [n_groups] + shape[axis + 1 :])
            n = n - (sums / counts).index_select(axis, groups)
            value = value + torch.where(status == OLD, n, torch.zeros(()))
    value = torch.where(status == ZERO, torch.zeros(()), value)
    value = torch.where(status == FREE, torch.zeros(()), value)
    return value, status


@dataclass
class ParamMap:
    """Where each element of a grown parameter came from, for optimizer-state surgery.

    ``old_name`` is the source parameter (for a new layer: the layer it was copied from),
    ``plans[axis]`` the axis plan (None = axis unchanged), ``new_layer`` True for inserted blocks.
    """

    old_name: str
    plans: list[AxisPlan | None]
    new_layer: bool
    shape: tuple[int, ...]

    def born_mask(self) -> torch.Tensor:
        """Boolean tensor of the grown shape: True for elements that did not exist before."""
        if self.new_layer:
            return torch.ones(self.shape, dtype=torch.bool)
        mask = torch.zeros(self.shape, dtype=torch.bool)
        for axis, plan in enumerate(self.plans):
            if plan is None:
                continue
            shape = [1] * len(self.shape)
            shape[axis] = plan.size
            mask = mask | (plan.src < 0).view(shape)
        return mask

    def map_tensor(self, old: torch.Tensor, fill: float = 0.0, scale_power: float = 0.0) -> torch.Tensor:
        """Carry a tensor shaped like the old parameter (e.g. Adam's ``exp_avg``) to the grown shape.

        Old elements go to every position they were copied to, multiplied by ``scale**scale_power``
        (the weight's own multiplier, e.g. 1/k for split fan-in); born elements are ``fill``.
        """
        if self.new_layer:
            return torch.full(self.shape, fill, dtype=old.dtype)
        out = old
        for axis, plan in enumerate(self.plans):
            if plan is None:
                continue
            out = out.index_select(axis, plan.src.clamp(min=0))
            shape = [1] * out.dim()
            shape[axis] = plan.size
            if scale_power:
                out = out * plan.scale.view(shape).to(out.dtype) ** scale_power
            out = torch.where((plan.src < 0).view(shape), torch.full((), fill, dtype=out.dtype), out)
        return out
