"""GrowthSpec: the target sizes of one growth, validated against a model before anything is touched."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator, Sequence

from ..arch.base import ArchAdapter, Sizes
from ..errors import ProgtrainConfigError, UnsupportedArchitectureError

if TYPE_CHECKING:
    from transformers import PretrainedConfig

PLACEMENTS = ("interleave", "top")


@dataclass
class GrowthSpec:
    """Target sizes of a growth. ``None`` keeps a size.

    Attributes:
        hidden_size: residual-stream width D (>= the model's). Integer multiples are exact by tiling;
            other sizes are exact for pre-norm families by padding and approximate for post-norm ones.
        num_heads: query heads. head_dim stays fixed where it is its own config key (Llama family);
            where head_dim = hidden/heads (GPT-2, BERT, GPT-NeoX) it follows from hidden_size.
        num_kv_heads: key/value heads (GQA). Default: follows num_heads when the model is plain
            multi-head attention (kv_heads == heads), else unchanged.
        intermediate_size: FFN units.
        num_layers: number of blocks; new blocks are identity blocks placed by ``layer_placement``.
        layer_placement: ``"interleave"`` (new blocks spread evenly, each after an old block),
            ``"top"`` (appended at the end) or explicit 0-based indices of the new blocks in the
            grown model.
        symmetry_noise: std of the cancelling noise added to the split fan-in of tiled stream
            copies, relative to each tensor's std (0 disables; copies then only diverge by rounding).
    """

    hidden_size: int | None = None
    num_heads: int | None = None
    num_kv_heads: int | None = None
    intermediate_size: int | None = None
    num_layers: int | None = None
    layer_placement: str | Sequence[int] = "interleave"
    symmetry_noise: float = 1e-2
    _extra: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, d: dict) -> "GrowthSpec":
        """Build from a dict using either the spec's own keys or HF-style aliases."""
        aliases = {
            "num_attention_heads": "num_heads",
            "num_key_value_heads": "num_kv_heads",
            "num_hidden_layers": "num_layers",
            "n_embd": "hidden_size",
            "n_head": "num_heads",
            "n_layer": "num_layers",
            "n_inner": "intermediate_size",
        }
        known = {f for f in cls.__dataclass_fields__ if not f.startswith("_")}
        kwargs = {}
        for k, v in d.items():
            k = aliases.get(k, k)
            if k not in known:
                raise ProgtrainConfigError(
                    f"unknown growth key {k!r}; valid keys: {', '.join(sorted(known))}"
                )
            kwargs[k] = v
        return cls(**kwargs)

    def is_empty(self) -> bool:
        return all(
            v is None
            for v in (self.hidden_size, self.num_heads, self.num_kv_heads, self.intermediate_size, self.num_layers)
        )

    # ------------------------------------------------------------------ resolution + validation
    def resolve(self, src: Sizes, adapter: ArchAdapter) -> Sizes:
        """Validate against the source sizes and return the target sizes (sizes only:
        :meth:`resolve_config` also builds the grown config and validates it as transformers will).

        Raises :class:`ProgtrainConfigError` naming the problem and the fix.
        """
        fam = adapter.name
        for key, val in (
            ("hidden_size", self.hidden_size),
            ("num_heads", self.num_heads),
            ("num_kv_heads", self.num_kv_heads),
            ("intermediate_size", self.intermediate_size),
            ("num_layers", self.num_layers),
        ):
            if val is not None and (isinstance(val, bool) or not isinstance(val, int) or val < 1):
                raise ProgtrainConfigError(f"{key} must be a positive integer, got {val!r}")
        noise = self.symmetry_noise
        if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not 0.0 <= noise <= 1.0:
            # above 1 the noise outweighs the weights and its cancellation is lost to rounding
            raise ProgtrainConfigError(
                f"symmetry_noise must be a number in [0, 1] (std relative to each tensor's std), got {noise!r}; "
                f"use e.g. 0.01, or 0 to disable it"
            )

        def no_shrink(key: str, new: int | None, old: int) -> int:
            if new is None:
                return old
            if new < old:
                raise ProgtrainConfigError(
                    f"{key}={new} is smaller than the model's {old}: progtrain only grows models; "
                    f"pass a value >= {old} or leave it unset"
                )
            return new

        hidden = no_shrink("hidden_size", self.hidden_size, src.hidden)
        ffn = no_shrink("intermediate_size", self.intermediate_size, src.ffn)
        layers = no_shrink("num_layers", self.num_layers, src.layers)

        if adapter.head_dim_is_free():
            heads = no_shrink("num_heads", self.num_heads, src.heads)
            head_dim = src.head_dim
        else:
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
                heads = no_shrink("num_heads", self.num_heads, src.heads)
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

        if adapter.config_keys.get("kv_heads"):
            if self.num_kv_heads is None:
                kv = heads if src.kv_heads == src.heads else src.kv_heads
            else:
                kv = no_shrink("num_kv_heads", self.num_kv_heads, src.kv_heads)
            if heads % kv:
                raise ProgtrainConfigError(
                    f"num_kv_heads={kv} does not divide num_heads={heads}: grouped-query attention "
                    f"needs num_heads % num_kv_heads == 0; choose num_kv_heads among the divisors of {heads}"
                )
            _check_gqa_regroup(src.heads, src.kv_heads, heads, kv)
        else:
            if self.num_kv_heads is not None and self.num_kv_heads != heads:
                raise ProgtrainConfigError(
                    f"{fam} has no grouped-query attention: num_kv_heads must equal num_heads ({heads}) "
                    f"or be left unset"
                )
            kv = heads

        tgt = Sizes(hidden, heads, kv, head_dim, ffn, layers)
        if tgt == src:
            raise ProgtrainConfigError(
                "nothing to grow: every target size equals the model's; pass at least one larger size "
                "(--hidden-size, --num-heads, --num-kv-heads, --intermediate-size or --num-layers)"
            )
        new_layer_positions(src.layers, layers, self.layer_placement)  # validates the placement
        return tgt

    def resolve_config(self, config: "PretrainedConfig", adapter: ArchAdapter) -> tuple[Sizes, "PretrainedConfig"]:
        """Validate this growth of a model with config ``config``: the sizes (:meth:`resolve`) and
        the grown model's config, built and checked with the family's config class
        (:meth:`ArchAdapter.target_config`), before any tensor is touched.

        Returns:
            ``(target sizes, grown config)``; the config is the one :func:`~progtrain.growth.grow`
            writes, except the norm epsilon of a non-integer widening.

        Raises:
            ProgtrainConfigError: naming the problem and, for a config the family's class rejects,
                the nearest growth sizes it accepts.
        """
        src = adapter.read_sizes(config)
        tgt = self.resolve(src, adapter)
        sources = layer_sources(src.layers, new_layer_positions(src.layers, tgt.layers, self.layer_placement))
        try:
            return tgt, adapter.target_config(config, tgt, layer_sources=sources)
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
                sources = layer_sources(src.layers, new_layer_positions(src.layers, t.layers, spec.layer_placement))
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


def layer_sources(old_layers: int, new_positions: Sequence[int]) -> list[int]:
    """For each layer of the grown model, the old layer it comes from: an old layer itself, or for a
    new layer (index in ``new_positions``) the old layer just below it (layer 0 when it is first)."""
    new_set = set(new_positions)
    out, old_i = [], 0
    for i in range(old_layers + len(new_set)):
        if i in new_set:
            out.append(max(old_i - 1, 0))
        else:
            out.append(old_i)
            old_i += 1
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
            f"unknown layer_placement {placement!r}: use 'interleave', 'top' or comma-separated indices "
            f"of the new layers in the grown model (e.g. 2,5)"
        )
    try:
        pos = sorted(int(p) for p in placement)
    except (TypeError, ValueError):
        raise ProgtrainConfigError(f"layer_placement must be 'interleave', 'top' or a list of integers, got {placement!r}")
    if len(pos) != n_new or len(set(pos)) != len(pos) or any(p < 0 or p >= new for p in pos):
        raise ProgtrainConfigError(
            f"layer_placement {list(placement)} must list {n_new} distinct indices in [0, {new - 1}] "
            f"(the positions of the new layers in the grown {new}-layer model)"
        )
    return pos
