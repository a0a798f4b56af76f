"""GrowthSpec, the request of one growth, and GrowthPlan, that request resolved and validated against
a model's config before anything is touched (:func:`plan_growth`, the one place that computes target
sizes, layer sources and the grown config)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator, Sequence

from ..errors import ProgtrainConfigError, UnsupportedArchitectureError

if TYPE_CHECKING:  # arch.base imports torch and transformers: imported where used, so the CLI's flags stay light
    from transformers import PretrainedConfig

    from ..arch.base import ArchAdapter, Sizes

    from ..init.base import InitStrategy

PLACEMENTS = ("interleave", "top", "stack", "middle")
DEPTH_INITS = ("copy_zero_out", "copy", "zero_out")
NEW = "new"  # a ``layer_sources`` entry: a layer made fresh (``zero_out``), copied from no trained layer
# the sizes a growth can change, in the order messages list them
SIZE_FIELDS = ("hidden_size", "num_heads", "num_kv_heads", "intermediate_size", "num_layers")


def parse_layer_placement(value: str | Sequence[int]) -> str | list[int]:
    """``"interleave"``, ``"top"``, ``"stack"``, ``"middle"`` or 0-based indices of the new layers,
    given as a list or as comma-separated text (``"2,5"``)."""
    if not isinstance(value, str):
        return value
    if value in PLACEMENTS:
        return value
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise ProgtrainConfigError(
            f"invalid layer_placement {value!r}: use {', '.join(PLACEMENTS)} or comma-separated 0-based "
            f"indices of the new layers like 2,5"
        ) from None


def parse_layer_sources(value: str | Sequence[int | str]) -> list[int | str]:
    """One entry per grown layer: a source layer index or ``"new"``, given as a list or as
    comma-separated text (``"0,1,1,new"``)."""
    items = value.split(",") if isinstance(value, str) else list(value)
    out: list[int | str] = []
    for v in items:
        v = v.strip() if isinstance(v, str) else v
        if v == NEW:
            out.append(NEW)
            continue
        try:
            if isinstance(v, bool) or float(v) != int(v):
                raise ValueError
            out.append(int(v))
        except (TypeError, ValueError):
            raise ProgtrainConfigError(
                f"invalid layer_sources entry {v!r} in {value!r}: each entry is a 0-based layer index of the "
                f"trained model or {NEW!r}, e.g. 0,1,1,2"
            ) from None
    return out


def _no_shrink(key: str, new: int | None, old: int) -> int:
    """``new`` (``old`` when None); a size below ``old`` is refused: progtrain only grows."""
    if new is None:
        return old
    if new < old:
        raise ProgtrainConfigError(
            f"{key}={new} is smaller than the model's {old}: progtrain only grows models; "
            f"pass a value >= {old} or leave it unset"
        )
    return new


@dataclass
class GrowthSpec:
    """What one growth asks for. ``None`` keeps a size. A stage's ``grow:`` block, the keyword
    arguments of :func:`~progtrain.growth.grow` and the ``progtrain grow`` flags (generated from these
    fields: ``--hidden-size`` ...) are this dataclass; each field's ``help`` is its documentation."""

    hidden_size: int | None = field(default=None, metadata={"help": (
        "new residual-stream width D (>= the model's): integer multiples are exact by tiling; other sizes "
        "are exact for pre-norm families by padding and approximate for post-norm ones")})
    num_heads: int | None = field(default=None, metadata={"help": (
        "new number of query heads; head_dim stays fixed where it is its own config key (Llama family), "
        "else (GPT-2, BERT, GPT-NeoX) head_dim = hidden_size / num_heads")})
    num_kv_heads: int | None = field(default=None, metadata={"help": (
        "new number of key/value heads (GQA families); default: follows num_heads for plain multi-head "
        "attention, else unchanged")})
    intermediate_size: int | None = field(default=None, metadata={"help": "new number of FFN units"})
    num_layers: int | None = field(default=None, metadata={"help": (
        "new number of layers; where each comes from: layer_placement or layer_sources; how a new one "
        "is made: depth_init")})
    layer_placement: str | Sequence[int] | None = field(default=None, metadata={
        "parse": parse_layer_placement, "metavar": "|".join(PLACEMENTS) + "|IDX,...", "help": (
            "where the new layers go and which trained layer each copies (default interleave): interleave "
            "(spread evenly, each right after an old layer and a copy of it), top (appended, copies of the last "
            "layer), stack (grown layer i is a copy of trained layer i mod L: the whole stack repeated, a "
            "target that is not a multiple of L ends with a copy of the bottom layers 0..r-1; G_stack), middle "
            "(copies of the middle layers, inserted right after them; MIDAS), or 0-based indices of the new "
            "layers in the grown model (each a copy of the layer below it, layer 0 when first)")})
    layer_sources: Sequence[int | str] | None = field(default=None, metadata={
        "parse": parse_layer_sources, "metavar": "SRC,...", "help": (
            "the source of every grown layer, instead of layer_placement: a trained layer index or 'new' per "
            "grown layer, e.g. 0,1,1,2; the first occurrence of each index is the trained layer itself (all "
            "trained layers must occur, first occurrences in order), later ones are new copies")})
    depth_init: str | None = field(default=None, metadata={
        "choices": DEPTH_INITS, "help": (
            "how a new layer is made: copy_zero_out (a copy of its source with the output projections "
            "o/down and their biases zeroed: exact in pre-norm families; LLaMA-Pro), copy (the source as it "
            "is: not exact, the deviation is measured; SOLAR), zero_out (fresh weights drawn by the init "
            "strategy, norms copied, output projections zeroed: exact). Default: copy_zero_out with a "
            "function-preserving init strategy; with the others (random) the strategy draws the whole layer")})
    symmetry_noise: float = field(default=1e-2, metadata={"help": (
        "std of the cancelling noise added to the split fan-in of tiled stream copies, relative to each "
        "tensor's std (0 disables it; copies then only diverge by rounding)")})

    @classmethod
    def from_dict(cls, d: dict) -> "GrowthSpec":
        """Build from a dict using either the spec's own keys or HF-style aliases."""
        if isinstance(d, GrowthSpec):
            return d
        if not isinstance(d, dict):
            raise ProgtrainConfigError(
                f"a growth must be a mapping of sizes (e.g. {{hidden_size: 128}}), got {type(d).__name__}: {d!r}"
            )
        aliases = {
            "num_attention_heads": "num_heads",
            "num_key_value_heads": "num_kv_heads",
            "num_hidden_layers": "num_layers",
            "n_embd": "hidden_size",
            "n_head": "num_heads",
            "n_layer": "num_layers",
            "n_inner": "intermediate_size",
        }
        known = [f.name for f in dataclasses.fields(cls)]
        kwargs = {}
        for k, v in d.items():
            k = aliases.get(k, k)
            if k not in known:
                raise ProgtrainConfigError(
                    f"unknown growth key {k!r}; valid keys: {', '.join(sorted(known))}"
                )
            kwargs[k] = v
        return cls(**kwargs)

    # ------------------------------------------------------------------ resolution + validation
    def resolve(self, src: Sizes, adapter: ArchAdapter) -> Sizes:
        """Validate against the source sizes and return the target sizes (sizes only:
        :meth:`resolve_config` also builds the grown config and validates it as transformers will).

        Raises :class:`ProgtrainConfigError` naming the problem and the fix.
        """
        self._check_values()
        hidden = _no_shrink("hidden_size", self.hidden_size, src.hidden)
        ffn = _no_shrink("intermediate_size", self.intermediate_size, src.ffn)
        layers = self._resolve_layers(src)
        heads, head_dim = self._resolve_heads(src, adapter, hidden)
        kv = self._resolve_kv_heads(src, adapter, heads)
        from ..arch.base import Sizes  # torch-importing module, kept off the CLI's start-up

        tgt = Sizes(hidden, heads, kv, head_dim, ffn, layers)
        if tgt == src:
            raise ProgtrainConfigError(
                f"nothing to grow: every target size equals the model's; pass at least one larger size "
                f"({', '.join(SIZE_FIELDS)})"
            )
        self.source_list(src.layers, layers)  # validates the placement / layer sources
        return tgt

    def _check_values(self) -> None:
        """Sizes are positive integers; ``symmetry_noise`` is in [0, 1]."""
        for key in SIZE_FIELDS:
            val = getattr(self, key)
            if val is not None and (isinstance(val, bool) or not isinstance(val, int) or val < 1):
                raise ProgtrainConfigError(f"{key} must be a positive integer, got {val!r}")
        noise = self.symmetry_noise
        if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not 0.0 <= noise <= 1.0:
            # above 1 the noise outweighs the weights and its cancellation is lost to rounding
            raise ProgtrainConfigError(
                f"symmetry_noise must be a number in [0, 1] (std relative to each tensor's std), got {noise!r}; "
                f"use e.g. 0.01, or 0 to disable it"
            )

    def _resolve_layers(self, src: Sizes) -> int:
        """The grown layer count (``num_layers``, else the length of ``layer_sources``, else the
        source's); ``depth_init`` checked."""
        layers = self.num_layers
        if self.layer_sources is not None:
            n = len(parse_layer_sources(self.layer_sources))
            if layers is not None and layers != n:
                raise ProgtrainConfigError(
                    f"layer_sources has {n} entries but num_layers={layers}: give one entry per grown layer, "
                    f"or leave num_layers unset (it is then the number of entries)"
                )
            layers = n
        layers = _no_shrink("num_layers", layers, src.layers)
        if self.depth_init is not None and self.depth_init not in DEPTH_INITS:
            raise ProgtrainConfigError(f"unknown depth_init {self.depth_init!r}: use {', '.join(DEPTH_INITS)}")
        return layers

    def _resolve_heads(self, src: Sizes, adapter: ArchAdapter, hidden: int) -> tuple[int, int]:
        """``(num_heads, head_dim)`` of the grown model: head_dim kept where the family sets it freely
        or positions are rotary (the head count then follows the width when not given), else
        ``hidden / heads``, which may widen but never shrink."""
        fam = adapter.name
        if adapter.head_dim_is_free():
            return _no_shrink("num_heads", self.num_heads, src.heads), src.head_dim
        if self.num_heads is None and adapter.rotary and hidden != src.hidden:
            # rotary positions fix head_dim: keep it by scaling the head count with the width
            if hidden % src.head_dim:
                raise ProgtrainConfigError(
                    f"hidden_size={hidden} is not a multiple of head_dim={src.head_dim}: {fam} ties "
                    f"head_dim to hidden_size/num_heads and its rotary positions need head_dim fixed; "
                    f"use a multiple of {src.head_dim}"
                )
            heads = hidden // src.head_dim
        else:
            heads = _no_shrink("num_heads", self.num_heads, src.heads)
        if hidden % heads:
            raise ProgtrainConfigError(
                f"num_heads={heads} does not divide hidden_size={hidden} ({fam} sets head_dim = "
                f"hidden_size / num_heads): choose num_heads among the divisors of {hidden}"
            )
        head_dim = hidden // heads
        if head_dim < src.head_dim:
            raise ProgtrainConfigError(
                f"num_heads={heads} with hidden_size={hidden} would shrink head_dim from "
                f"{src.head_dim} to {head_dim}: grow hidden_size to at least {heads * src.head_dim} "
                f"or use at most {hidden // src.head_dim} heads"
            )
        if head_dim != src.head_dim and adapter.rotary:
            raise ProgtrainConfigError(
                f"{fam} uses rotary positions, so head_dim must stay {src.head_dim}; with "
                f"hidden_size={hidden} use num_heads={hidden // src.head_dim}"
                if hidden % src.head_dim == 0
                else f"{fam} uses rotary positions, so head_dim must stay {src.head_dim}: "
                f"choose hidden_size as a multiple of {src.head_dim}"
            )
        if heads < src.heads:
            raise ProgtrainConfigError(
                f"num_heads={heads} is smaller than the model's {src.heads}: progtrain only grows models"
            )
        return heads, head_dim

    def _resolve_kv_heads(self, src: Sizes, adapter: ArchAdapter, heads: int) -> int:
        """The grown key/value head count: with grouped-query attention the given one (else kept, or
        following ``heads`` for a model without grouping), dividing ``heads`` and regrouping the old
        heads validly; without it, ``heads``."""
        if not adapter.config_keys.get("kv_heads"):
            if self.num_kv_heads is not None and self.num_kv_heads != heads:
                raise ProgtrainConfigError(
                    f"{adapter.name} has no grouped-query attention: num_kv_heads must equal num_heads ({heads}) "
                    f"or be left unset"
                )
            return heads
        if self.num_kv_heads is None:
            kv = heads if src.kv_heads == src.heads else src.kv_heads
        else:
            kv = _no_shrink("num_kv_heads", self.num_kv_heads, src.kv_heads)
        if heads % kv:
            raise ProgtrainConfigError(
                f"num_kv_heads={kv} does not divide num_heads={heads}: grouped-query attention "
                f"needs num_heads % num_kv_heads == 0; choose num_kv_heads among the divisors of {heads}"
            )
        _check_gqa_regroup(src.heads, src.kv_heads, heads, kv)
        return kv

    def source_list(self, old: int, new: int) -> tuple[list[int | str], list[bool]]:
        """``(sources, is_new)`` for every layer of the grown ``new``-layer model: its source (a trained
        layer index or ``"new"``) and whether it is a new layer.

        From ``layer_sources`` when given (validated; the first occurrence of each trained index is
        that trained layer itself, every later occurrence and every ``"new"`` is a new layer), else
        built by ``layer_placement`` (default ``interleave``, see :func:`placement_sources`).

        Raises:
            ProgtrainConfigError: both options given, an unknown placement, or layer sources of the
                wrong length, with an index out of range, missing a trained layer or reordering them.
        """
        if self.layer_sources is None:
            placement = "interleave" if self.layer_placement is None else parse_layer_placement(self.layer_placement)
            return placement_sources(old, new, placement)
        if self.layer_placement is not None:
            raise ProgtrainConfigError(
                "give layer_placement or layer_sources, not both: layer_sources already says where every layer "
                "comes from"
            )
        srcs = parse_layer_sources(self.layer_sources)
        given = ",".join(map(str, srcs))
        if len(srcs) != new:
            raise ProgtrainConfigError(f"layer_sources {given} has {len(srcs)} entries for a {new}-layer model: "
                                       f"give one entry per grown layer")
        bad = [s for s in srcs if s != NEW and not 0 <= s < old]
        if bad:
            raise ProgtrainConfigError(f"layer_sources {given}: index {bad[0]} is out of range; the trained model "
                                       f"has layers 0..{old - 1}")
        firsts = list(dict.fromkeys(s for s in srcs if s != NEW))
        if firsts != list(range(old)):
            missing = sorted(set(range(old)) - set(firsts))
            why = (f"trained layer(s) {missing} are missing (progtrain only grows: every trained layer must "
                   f"occur)" if missing else f"the trained layers first occur in the order {firsts} (the first "
                   f"occurrence of each is the trained layer itself and must keep its order)")
            raise ProgtrainConfigError(f"layer_sources {given}: {why}; e.g. {','.join(map(str, range(old)))},"
                                       f"{old - 1} appends a copy of the top layer")
        seen: set = set()
        is_new = []
        for x in srcs:
            is_new.append(x == NEW or x in seen)
            seen.add(x)
        return srcs, is_new

    def resolve_config(
        self, config: "PretrainedConfig", adapter: ArchAdapter, eps_scale: float = 1.0
    ) -> tuple[Sizes, "PretrainedConfig"]:
        """Validate this growth of a model with config ``config``: the sizes (:meth:`resolve`) and
        the grown model's config, built and checked with the family's config class
        (:meth:`ArchAdapter.target_config`), before any tensor is touched. :func:`plan_growth` is the
        whole plan (with the init strategy's effect on the config: ``eps_scale``).

        Returns:
            ``(target sizes, grown config)``; the config is the one :func:`~progtrain.growth.grow`
            writes when ``eps_scale`` is the plan's (1 unless a function-preserving non-integer widening).

        Raises:
            ProgtrainConfigError: naming the problem and, for a config the family's class rejects,
                the nearest growth sizes it accepts.
        """
        src = adapter.read_sizes(config)
        tgt = self.resolve(src, adapter)
        sources = layer_templates(self.source_list(src.layers, tgt.layers)[0])
        return tgt, self._grown_config(config, adapter, src, tgt, eps_scale, sources)

    def _grown_config(
        self, config: "PretrainedConfig", adapter: ArchAdapter, src: Sizes, tgt: Sizes, eps_scale: float,
        sources: list[int],
    ) -> "PretrainedConfig":
        """:meth:`ArchAdapter.target_config`, its error completed with the nearest accepted sizes."""
        try:
            return adapter.target_config(config, tgt, eps_scale, layer_sources=sources)
        except UnsupportedArchitectureError:
            raise  # the family cannot grow these sizes at all (ConfigOption.fixes): no size to suggest
        except ProgtrainConfigError as e:
            raise ProgtrainConfigError(f"{e}; {self._suggest(config, adapter, src, tgt)}") from None

    def _suggest(self, config: "PretrainedConfig", adapter: ArchAdapter, src: Sizes, tgt: Sizes) -> str:
        """The fix for a rejected grown config: the fewest query heads (with the kv-head count nearest
        the requested ratio) valid at this width, and the smallest width valid with these heads.
        Each search builds at most ``_SUGGEST_BUDGET`` candidate configs."""
        has_kv = bool(adapter.config_keys.get("kv_heads"))

        def first_valid(candidates: Iterator[tuple[str, "GrowthSpec"]]) -> str | None:
            built = 0
            for text, spec in candidates:
                try:
                    t = spec.resolve(src, adapter)
                except ProgtrainConfigError:
                    continue
                if built >= _SUGGEST_BUDGET:
                    return None
                built += 1
                sources = layer_templates(spec.source_list(src.layers, t.layers)[0])
                try:
                    adapter.target_config(config, t, layer_sources=sources)
                except ProgtrainConfigError:
                    continue
                return text
            return None

        def more_heads() -> Iterator[tuple[str, GrowthSpec]]:
            for heads in range(tgt.heads + 1, 4 * tgt.heads + 1):
                if not has_kv:
                    yield f"num_heads={heads}", dataclasses.replace(self, hidden_size=tgt.hidden, num_heads=heads)
                    continue
                kvs = sorted((kv for kv in range(1, heads + 1) if heads % kv == 0),
                             key=lambda kv: (abs(kv * tgt.heads - tgt.kv_heads * heads), kv))
                for kv in kvs:
                    yield (f"num_heads={heads} with num_kv_heads={kv}",
                           dataclasses.replace(self, hidden_size=tgt.hidden, num_heads=heads, num_kv_heads=kv))

        def more_width() -> Iterator[tuple[str, GrowthSpec]]:
            for hidden in range(tgt.hidden + 1, 4 * tgt.hidden + 1):
                yield f"hidden_size={hidden}", dataclasses.replace(
                    self, hidden_size=hidden, num_heads=tgt.heads, num_kv_heads=tgt.kv_heads if has_kv else None
                )

        fixes = [f for f in (first_valid(more_heads()), first_valid(more_width())) if f]
        if not fixes:
            return "choose other growth sizes"
        return f"use {', or '.join(fixes)} (other sizes as given)"


# most candidate configs one search of GrowthSpec._suggest builds (each a deep copy, validation and
# JSON round trip of the config: about a millisecond)
_SUGGEST_BUDGET = 64


def layer_templates(sources: Sequence[int | str]) -> list[int]:
    """Per grown layer, the trained layer whose tensors and per-layer config entries it starts from:
    its source, or for a ``"new"`` entry the source of the nearest layer below with one (of the first
    such layer when none is below)."""
    ints = [s for s in sources if s != NEW]
    out, below = [], ints[0] if ints else 0
    for s in sources:
        below = below if s == NEW else s
        out.append(below)
    return out


def _check_gqa_regroup(h: int, kv: int, h2: int, kv2: int) -> None:
    """Raise when the old query heads cannot keep their key/value heads in the grown layout."""
    g2 = h2 // kv2
    g = h // kv
    needed = kv * -(-g // g2)
    if needed > kv2:
        raise ProgtrainConfigError(
            f"cannot grow attention from {h} heads / {kv} kv-heads to {h2} / {kv2} and keep every old "
            f"query head with its key/value head (needs at least {needed} kv-heads); grow num_heads "
            f"and num_kv_heads by the same factor, or keep num_kv_heads"
        )


def placement_sources(old: int, new: int, placement: str | Sequence[int]) -> tuple[list[int], list[bool]]:
    """``(sources, is_new)``: the source layer of every layer of the grown ``new``-layer model under a
    named placement, and whether it is a new layer (a copy) or the trained layer itself.

    * ``interleave``, ``top``, indices: the new layers at :func:`new_layer_positions`, each a copy of
      the layer just below it (layer 0 when it is first).
    * ``stack`` (G_stack, Du et al. 2024): grown layer ``i`` comes from trained layer ``i mod old``, the
      whole trained stack repeated; when ``new`` is not a multiple of ``old`` the last, partial repeat
      is the bottom ``new mod old`` layers (e.g. 3 -> 8: ``0,1,2,0,1,2,0,1``).
    * ``middle`` (MIDAS, Saunshi et al. 2024): the ``b = min(new - old, old)`` middle trained layers
      ``s .. s+b-1`` with ``s = (old - b) // 2`` (the lower middle when ``old - b`` is odd) are copied, the
      block repeated until there are ``new - old`` copies, and the copies inserted right after the block
      (4 -> 6: ``0,1,2,1,2,3``; 4 -> 5: ``0,1,1,2,3``; 2 -> 6: ``0,1,0,1,0,1``).
    """
    if isinstance(placement, str) and placement == "stack":
        return [i % old for i in range(new)], [i >= old for i in range(new)]
    if isinstance(placement, str) and placement == "middle":
        n_new = new - old
        b = min(n_new, old)
        start = (old - b) // 2
        copies = [start + j % b for j in range(n_new)] if b else []
        sources = list(range(start + b)) + copies + list(range(start + b, old))
        return sources, [False] * (start + b) + [True] * n_new + [False] * (old - start - b)
    new_set = set(new_layer_positions(old, new, placement))
    out, old_i = [], 0
    for i in range(new):
        if i in new_set:
            out.append(max(old_i - 1, 0))
        else:
            out.append(old_i)
            old_i += 1
    return out, [i in new_set for i in range(new)]


def new_layer_positions(old: int, new: int, placement: str | Sequence[int]) -> list[int]:
    """0-based indices, in the grown model, of the ``new - old`` inserted blocks.

    ``interleave`` spreads them evenly, each right after an old block (for new = 2*old every old
    block is followed by a new one); ``top`` appends them; a sequence gives the indices directly.
    """
    n_new = new - old
    if isinstance(placement, str):
        if placement == "top":
            return list(range(old, new))
        if placement == "interleave":
            if n_new == 0:
                return []
            # new block j goes after old block ceil((j+1)*old/n_new)-1: after every k-th block when
            # old = k*n_new, after each block when n_new = old, several after each when n_new > old
            counts = [0] * old
            for j in range(n_new):
                counts[-(-((j + 1) * old) // n_new) - 1] += 1
            pos, idx = [], 0
            for i in range(old):
                idx += 1  # the old block itself
                for _ in range(counts[i]):
                    pos.append(idx)
                    idx += 1
            return pos
        raise ProgtrainConfigError(
            f"unknown layer_placement {placement!r}: use {', '.join(PLACEMENTS)} or comma-separated indices "
            f"of the new layers in the grown model (e.g. 2,5)"
        )
    try:
        pos = sorted(int(p) for p in placement)
    except (TypeError, ValueError):
        raise ProgtrainConfigError(
            f"layer_placement must be one of {', '.join(PLACEMENTS)} or a list of integers, got {placement!r}"
        ) from None
    if len(pos) != n_new or len(set(pos)) != len(pos) or any(p < 0 or p >= new for p in pos):
        raise ProgtrainConfigError(
            f"layer_placement {list(placement)} must list {n_new} distinct indices in [0, {new - 1}] "
            f"(the positions of the new layers in the grown {new}-layer model)"
        )
    return pos


# ---------------------------------------------------------------------- the plan
# how a grown layer is made (GrowthPlan.layer_init): None for a trained layer itself, a DEPTH_INITS
# value for a new layer, or INIT_DRAWS: drawn whole by a strategy that does not keep the function
INIT_DRAWS = "init"


@dataclass(frozen=True)
class GrowthPlan:
    """One growth, resolved and validated against a config before any tensor exists: what
    :func:`~progtrain.growth.grow` builds, what the CLI and a run config check, what FLOPs planning
    and optimizer-state surgery follow. Made by :func:`plan_growth` only.

    Attributes:
        spec: the request.
        adapter: the family's adapter.
        strategy: the init strategy instance (filled the free blocks; its ``preserves_function``
            decides tiling vs padding and the default ``depth_init``).
        source_config / target_config: the HF configs before and after; the target is validated with
            the family's config class (:meth:`ArchAdapter.target_config`).
        source_sizes / target_sizes: the sizes before and after.
        layer_sources: per grown layer, the trained layer it starts from (tensors, per-layer config
            entries, attention-scale law).
        layer_init: per grown layer, None for a trained layer itself, else how the new layer is made:
            ``copy_zero_out``, ``copy``, ``zero_out`` or ``"init"`` (drawn whole by a strategy that does
            not keep the function).
        placement: ``interleave``, ``top``, ``stack``, ``middle``, ``"indices"`` or ``"layer_sources"``.
        hidden_mode: ``"same"``, ``"tile"`` (integer factor, function-preserving) or ``"pad"``.
        eps_scale: multiplier of the norm epsilon (a function-preserving non-integer widening: d/D).
    """

    spec: GrowthSpec
    adapter: ArchAdapter
    strategy: "InitStrategy"
    source_config: "PretrainedConfig"
    target_config: "PretrainedConfig"
    source_sizes: Sizes
    target_sizes: Sizes
    layer_sources: tuple[int, ...]
    layer_init: tuple[str | None, ...]
    placement: str
    hidden_mode: str
    eps_scale: float

    @property
    def layer_new(self) -> tuple[bool, ...]:
        """Per grown layer: True for a new layer."""
        return tuple(m is not None for m in self.layer_init)

    @property
    def new_layer_positions(self) -> list[int]:
        """0-based indices of the new layers in the grown model."""
        return [i for i, m in enumerate(self.layer_init) if m is not None]

    @property
    def depth_init(self) -> str:
        """How new copies are made (the resolved ``spec.depth_init``)."""
        if self.spec.depth_init is not None:
            return self.spec.depth_init
        return "copy_zero_out" if self.strategy.preserves_function else INIT_DRAWS

    def record(self) -> dict:
        """The growth-history fields of this plan (JSON-serialisable)."""
        return {
            "family": self.adapter.name,
            "source": self.source_sizes.as_dict(),
            "target": self.target_sizes.as_dict(),
            "layer_placement": (self.placement if self.placement != "indices"
                                else parse_layer_placement(self.spec.layer_placement)),
            "layer_sources": list(self.layer_sources),
            "layer_init": list(self.layer_init),
            "new_layer_positions": self.new_layer_positions,
            "depth_init": self.depth_init,
            "hidden_mode": self.hidden_mode,
        }


def plan_growth(
    config: "PretrainedConfig",
    spec: GrowthSpec | dict,
    init: "str | InitStrategy" = "function_preserving",
    init_kwargs: dict | None = None,
) -> GrowthPlan:
    """Resolve and validate one growth of a model with config ``config``: the one place where target
    sizes, layer sources and the grown config are computed (for :func:`~progtrain.growth.grow`, the
    CLI, run-config validation and FLOPs planning). Builds no tensor, loads no weight.

    Args:
        config: the source model's HF config.
        spec: a :class:`GrowthSpec` or a dict of its fields (HF-style aliases accepted).
        init: a registered init strategy name or an :class:`~progtrain.init.InitStrategy` instance.
        init_kwargs: the strategy's options (with a name only).

    Raises:
        ProgtrainConfigError: an unsupported family or config option, bad sizes or layer sources, an
            unknown strategy or option, or a grown config the family's config class rejects (with the
            nearest sizes it accepts).
    """
    from ..arch import get_adapter
    from ..init import get_strategy

    spec = GrowthSpec.from_dict(spec)
    adapter = get_adapter(config)
    adapter.check_options(config)
    src = adapter.read_sizes(config)
    tgt = spec.resolve(src, adapter)
    if init_kwargs and not isinstance(init, str):
        raise ProgtrainConfigError("init_kwargs go with an init strategy name, not with a strategy instance")
    strategy = get_strategy(init, **(init_kwargs or {}))
    preserve = strategy.preserves_function
    if tgt.hidden == src.hidden:
        mode = "same"
    elif preserve and tgt.hidden % src.hidden == 0:
        mode = "tile"
    else:
        mode = "pad"
    eps_scale = src.hidden / tgt.hidden if (mode == "pad" and preserve) else 1.0
    sources, new = spec.source_list(src.layers, tgt.layers)
    templates = layer_templates(sources)
    depth_init = spec.depth_init if spec.depth_init is not None else ("copy_zero_out" if preserve else INIT_DRAWS)
    layer_init = tuple(
        None if not is_new else ("zero_out" if s == NEW and depth_init != INIT_DRAWS else depth_init)
        for s, is_new in zip(sources, new)
    )
    target = spec._grown_config(config, adapter, src, tgt, eps_scale, templates)
    named = "interleave" if spec.layer_placement is None else parse_layer_placement(spec.layer_placement)
    if spec.layer_sources is not None:
        placement = "layer_sources"
    else:
        placement = named if isinstance(named, str) else "indices"
    return GrowthPlan(spec, adapter, strategy, config, target, src, tgt, tuple(templates), layer_init, placement,
                      mode, eps_scale)
