r"""MixtureGrowth (Pham et al. 2023): linear layers as mixtures of templates, grown by new mixtures.

**Template parameterisation.** :func:`templatize` registers a ``torch.nn.utils.parametrize``
parametrisation (:class:`TemplateMixture`) on the weight of every linear layer of the chosen roles,
leaving the Hugging Face module classes intact: the layer's weight is computed as

    W = sum_k c_k T_k

from a per-layer bank of ``K`` templates ``T`` (``K x`` the weight's shape, trainable) and a
coefficient vector ``c`` (``K``, trainable, no weight decay: put :func:`coefficient_parameters` in a
param group with ``weight_decay=0``). Initialisation keeps the current weight exactly: ``c`` is a
unit vector from an orthogonal init and, with ``R_k ~ N(0, (noise * std(W))^2)``,

    T_k = R_k + c_k (W - sum_j c_j R_j) / ||c||^2

so ``sum_k c_k T_k = W``: the templates carry ``W`` along ``c`` plus random components orthogonal to
``c`` in template space (fresh directions new coefficient vectors can pick up). Saving always bakes
(:func:`bake` is :func:`progtrain.bake.bake_`; ``progtrain.io.save_checkpoint`` and ``grow()`` read
the computed weights), so checkpoints are plain HF models.

**Growth (the ``mixture`` init strategy).** In ``before`` the strategy reads the trained template
banks of the old model (a plain model has none: each bank is then derived from its weight as above,
with ``num_templates`` templates, and the report says so). Every *free* entry of a grown weight of a
templated role is filled with a new combination of that layer's trained templates:

* the grown weight is cut into blocks of the template's shape, tiled from the top-left corner
  (block ``(i, j)`` covers rows ``i*d0 ..`` and columns ``j*d1 ..`` for a ``d0 x d1`` template);
  the last block along an axis that grew by a non-integer factor (e.g. x1.5) is smaller and uses the
  top-left corner of each template (templates are cut, never interpolated or resampled);
* every block that has free entries gets its own coefficient vector, and its free entries take
  ``sum_k c_k T_k`` (cut to the block); constrained entries (copied, split, zero) are left as the
  growth operator built them;
* coefficient vectors (``coefficients="alternate"``, as in the paper) alternate between a fresh
  orthogonal init and the direction least covered by the stacked existing coefficients (the last
  right-singular vector of the matrix of the old vector(s) and those chosen so far); ``"orthogonal"``
  or ``"least_covered"`` use one rule for all. New vectors are scaled to the mean norm of the old
  ones (times ``coef_scale``).

With ``exact=True`` (default) fan-out blocks stay zero, so the growth is function-preserving; with
``exact=False`` every new entry (fan-out included) is a template mixture. Tensors of other roles
(embeddings, norms, biases) are filled as ``function_preserving`` fills them (free matrix entries
``N(0, std_old^2)``, free vectors 0, or 1 for norm gains).

**Training templates after growth.** :func:`templatize_grown` re-templatises the grown model from
the old model's banks: each grown weight gets a bank of grown-shape templates, the old templates
tiled and cut to the grown shape as above, with the layer's old coefficient vector ``c``; the part of
the grown weight they do not explain is added along ``c`` (``T' = R + c (W - c.R)/||c||^2``, ``R``
the tiled templates), so the grown function is kept exactly and, on the old block, ``T' = T``
(the trained templates are unchanged there). The paper's per-block coefficients are *not* kept as
separate parameters: after re-templatising, one coefficient vector drives the whole grown layer.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Iterable, Literal, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..bake import bake_ as bake  # noqa: F401  (re-exported: the one way to bake templates)
from ..bake import plain_named_parameters
from ..errors import ProgtrainConfigError
from ..arch.base import ROLES
from .base import GrowthContext, InitStrategy, StrategyOptions, TensorGrowth, option, reference_std, register_strategy

logger = logging.getLogger(__name__)

DEFAULT_ROLES = ("q", "k", "v", "qkv", "o", "up", "gate", "down")
COEFFICIENT_RULES = ("alternate", "orthogonal", "least_covered")


# ---------------------------------------------------------------------- the parametrisation
def _orthonormal_rows(n: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` random orthonormal vectors of length ``k`` (``n > k`` repeats fresh orthogonal sets), float64."""
    rows = []
    while len(rows) < n:
        q, r = torch.linalg.qr(torch.randn(k, k, generator=generator, dtype=torch.float64))
        q = q * torch.sign(torch.diagonal(r))  # uniform (Haar) orthogonal matrix
        rows.extend(q.T[: n - len(rows)])
    return torch.stack(rows) if rows else torch.zeros(0, k, dtype=torch.float64)


def _templates_for(weight: torch.Tensor, coefficients: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """``T = base + c (W - c.base) / ||c||^2`` (float64), so that ``sum_k c_k T_k = W``."""
    w, c, r = weight.double(), coefficients.double(), base.double()
    resid = w - torch.tensordot(c, r, dims=1)
    return r + c.view(-1, *[1] * w.dim()) * resid.unsqueeze(0) / float(c.dot(c))


class TemplateMixture(nn.Module):
    """``torch.nn.utils.parametrize`` parametrisation ``W = sum_k c_k T_k`` (see the module docstring).

    Registered with :func:`templatize`; its original tensors are ``original0`` (templates, ``K x``
    weight shape) and ``original1`` (coefficients, ``K``). ``right_inverse`` builds templates that
    reproduce the weight: from a seeded random bank (``seed``, ``noise`` relative to std(W)) and a
    unit coefficient vector, or once from a given ``base`` bank and ``coefficients``.
    """

    def __init__(
        self,
        num_templates: int,
        seed: int = 0,
        noise: float = 1.0,
        base: torch.Tensor | None = None,
        coefficients: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.num_templates = int(num_templates)
        self.seed = int(seed)
        self.noise = float(noise)
        self._base = base
        self._coefficients = coefficients

    def forward(self, templates: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
        return torch.tensordot(coefficients, templates, dims=1)

    @torch.no_grad()
    def right_inverse(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._base is not None:
            base, c = self._base, self._coefficients
            self._base = self._coefficients = None  # one-shot: later assignments use the seeded rule
        else:
            g = torch.Generator().manual_seed(self.seed)
            c = _orthonormal_rows(1, self.num_templates, g)[0]
            std = float(weight.detach().double().std()) if weight.numel() > 1 else 1.0
            base = torch.randn((self.num_templates, *weight.shape), generator=g, dtype=torch.float64) * (self.noise * std)
        t = _templates_for(weight.detach(), c, base)
        return t.to(weight.dtype), c.to(weight.dtype)


def _role_of(model: nn.Module):
    from ..arch.base import base_prefix, get_adapter

    adapter, prefix = get_adapter(model), base_prefix(model)
    return lambda name: adapter.classify(name, prefix)[0].role, adapter


def _check_roles(roles: Iterable[str]) -> tuple[str, ...]:
    """``roles`` as a tuple; each must be one of the declared roles (:data:`progtrain.arch.ROLES`)."""
    roles = tuple(roles)
    bad = [r for r in roles if r not in ROLES]
    if bad:
        raise ProgtrainConfigError(f"unknown role(s) {bad} for templates; valid: {', '.join(ROLES)}")
    return roles


def _split(name: str) -> tuple[str, str]:
    mod, _, attr = name.rpartition(".")
    return mod, attr


def templatize(
    model: nn.Module,
    num_templates: int = 4,
    roles: Sequence[str] = DEFAULT_ROLES,
    seed: int = 0,
    noise: float = 1.0,
) -> list[str]:
    """Parametrise the weights of ``model``'s linear layers of ``roles`` as template mixtures, in place.

    Args:
        model: a supported HF model (not already templatised).
        num_templates: ``K``, templates per layer (>= 2).
        roles: layer roles to templatise (default: attention and FFN projections).
        seed: seeds each layer's coefficient vector and random template components (layer ``i`` of the
            list uses ``seed + i``).
        noise: std of the random template components, relative to std(W).

    Returns:
        The plain names of the templatised weights. The forward is unchanged (up to fp rounding).

    Raises:
        ProgtrainConfigError: ``num_templates < 2``, unknown roles, or an already parametrised model.
    """
    from ..bake import is_parametrized

    if int(num_templates) < 2:
        raise ProgtrainConfigError(f"num_templates={num_templates}: MixtureGrowth needs at least 2 templates per layer")
    if is_parametrized(model):
        raise ProgtrainConfigError("the model is already parametrised: bake it first (progtrain.init.mixture.bake)")
    role_of, adapter = _role_of(model)
    roles = _check_roles(roles)
    names = []
    for name, p in list(plain_named_parameters(model)):
        if p.dim() != 2 or role_of(name) not in roles:
            continue
        mod, attr = _split(name)
        parametrize.register_parametrization(
            model.get_submodule(mod), attr, TemplateMixture(num_templates, seed=seed + len(names), noise=noise)
        )
        names.append(name)
    if not names:
        raise ProgtrainConfigError(f"no 2-D weights with roles {list(roles)} in this model: choose other roles")
    logger.info("templatised %d weights with %d templates each", len(names), num_templates)
    return names


def template_banks(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{plain weight name: (templates (K, *shape), coefficients (K,))}`` of a templatised model (the
    live parameters, not copies)."""
    out = {}
    for mname, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for attr, plist in module.parametrizations.items():
            if len(plist) == 1 and isinstance(plist[0], TemplateMixture):
                out[f"{mname}.{attr}" if mname else attr] = (plist.original0, plist.original1)
    return out


def coefficient_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The coefficient vectors of every template bank: put them in a param group with no weight decay."""
    return [c for _, c in template_banks(model).values()]


def template_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The template tensors of every bank."""
    return [t for t, _ in template_banks(model).values()]


def tile_to(t: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Tile a template bank ``(K, d0, d1, ...)`` from the top-left to ``(K, *shape)``, cutting the last
    partial copy along each axis (index ``i`` of an axis takes template index ``i mod d``)."""
    out = t
    for ax, n in enumerate(shape, start=1):
        out = out.index_select(ax, torch.arange(n) % t.shape[ax])
    return out


def templatize_grown(
    grown_model: nn.Module,
    templates_from: nn.Module,
    param_maps: dict,
) -> list[str]:
    """Give a grown (plain) model template banks built from the old model's trained banks, in place,
    keeping its function (see the module docstring): each grown weight whose source weight had a bank
    gets ``T' = R + c (W - c.R)/||c||^2`` with ``R`` the old templates tiled/cut to the grown shape and
    ``c`` the old coefficient vector. ``param_maps`` is ``GrowthResult.param_maps``. Returns the
    templatised names.

    Raises:
        ProgtrainConfigError: ``templates_from`` has no template banks or ``grown_model`` is parametrised.
    """
    from ..bake import is_parametrized

    banks = template_banks(templates_from)
    if not banks:
        raise ProgtrainConfigError("templates_from has no template banks: templatize() the old model before training it")
    if is_parametrized(grown_model):
        raise ProgtrainConfigError("the grown model is already parametrised: pass the plain model grow() returned")
    names = []
    for name, p in list(plain_named_parameters(grown_model)):
        pmap = param_maps.get(name)
        if pmap is None or pmap.old_name not in banks or p.dim() != 2:
            continue
        t_old, c_old = (x.detach().double() for x in banks[pmap.old_name])
        mod, attr = _split(name)
        parametrize.register_parametrization(
            grown_model.get_submodule(mod), attr,
            TemplateMixture(t_old.shape[0], base=tile_to(t_old, p.shape), coefficients=c_old),
        )
        names.append(name)
    return names


# ---------------------------------------------------------------------- the init strategy
@dataclass
class MixtureOptions(StrategyOptions):
    exact: bool = option(True, "keep the new units' fan-out zero and the function exact")
    coefficients: Literal["alternate", "orthogonal", "least_covered"] = option(
        "alternate", "rule for the new blocks' template coefficients"
    )
    coef_scale: float = option(1.0, "norm of new coefficient vectors relative to the old ones' mean norm")
    num_templates: int = option(4, "templates per layer when the bank is derived from a plain model")
    noise: float = option(1.0, "noise of the templates derived from a plain model")
    roles: list[str] = option(list(DEFAULT_ROLES), "roles of the templated weights (progtrain.arch.ROLES)")

    def __post_init__(self) -> None:
        self.require(self.coef_scale > 0, "coef_scale", "must be > 0")
        self.require(self.num_templates >= 2, "num_templates", "use at least 2")
        self.require(self.noise >= 0, "noise", "must be >= 0")
        bad = [r for r in self.roles if r not in ROLES]
        self.require(not bad, "roles", f"unknown role(s) {bad}; roles are {', '.join(ROLES)}")


@register_strategy("mixture")
class MixtureInit(InitStrategy):
    """MixtureGrowth init (see the module docstring): new blocks of templated weights are new
    mixtures of the layer's trained templates."""

    Options = MixtureOptions

    def __init__(self, options: MixtureOptions | None = None, **values: Any) -> None:
        super().__init__(options, **values)
        self.preserves_function = bool(self.options.exact)
        self._banks: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.new_coefficients: dict[str, list[list[float]]] = {}

    def before(self, ctx: GrowthContext) -> None:
        from ..arch.base import base_prefix

        role_of, adapter = _role_of(ctx.old_model)
        self._roles = set(_check_roles(self.options.roles))
        self._adapter, self._maps = adapter, ctx.maps
        self._prefix = base_prefix(ctx.old_model)
        trained = {n: (t.detach().double().clone(), c.detach().double().clone().view(1, -1))
                   for n, (t, c) in template_banks(ctx.old_model).items()}
        derived = 0
        self._banks = {}
        for i, (name, w) in enumerate(plain_named_parameters(ctx.old_model)):
            if w.dim() != 2 or role_of(name) not in self._roles:
                continue
            if name in trained:
                self._banks[name] = trained[name]
            else:  # a plain model: derive the bank from the weight as templatize() would
                k = int(self.options.num_templates)
                tm = TemplateMixture(k, seed=i, noise=float(self.options.noise))
                t, c = tm.right_inverse(w.detach().double())
                self._banks[name] = (t, c.view(1, -1))
                derived += 1
        self.new_coefficients = {}
        self._source = "trained" if derived == 0 else ("derived" if not trained else "mixed")
        if derived:
            logger.info("mixture: %d of %d template banks derived from plain weights (%d templates each)",
                        derived, len(self._banks), self.options.num_templates)

    def _old_name(self, name: str) -> str:
        _, layer, suffix = self._adapter.classify(name, self._prefix)
        if layer is None:
            return name
        return self._adapter.layer_param_name(self._prefix, self._maps.layer_src[layer], suffix)

    @torch.no_grad()
    def init_tensor(self, t: TensorGrowth) -> None:
        if not bool(t.free.any()):
            return
        bank = self._banks.get(self._old_name(t.name)) if (t.role in self._roles and t.value.dim() == 2) else None
        if bank is None:  # not templated: as function_preserving / random fill it
            if t.is_vector:
                t.value[t.free] = 1.0 if "hidden.gain" in t.axes else 0.0
            else:
                noise = torch.randn(t.value.shape, generator=t.generator) * reference_std(t)
                t.value.copy_(torch.where(t.free, noise, t.value))
            return
        templates, old_c = bank
        (d0, d1), (D0, D1) = templates.shape[1:], t.value.shape
        blocks = []
        for i in range(math.ceil(D0 / d0)):
            for j in range(math.ceil(D1 / d1)):
                rs, cs = slice(i * d0, min((i + 1) * d0, D0)), slice(j * d1, min((j + 1) * d1, D1))
                if bool(t.free[rs, cs].any()):
                    blocks.append((rs, cs))
        coeffs = self._coefficients(old_c, len(blocks), t.generator)
        for (rs, cs), c in zip(blocks, coeffs):
            r, k = rs.stop - rs.start, cs.stop - cs.start
            mix = torch.tensordot(c, templates[:, :r, :k], dims=1).to(t.value.dtype)
            t.value[rs, cs] = torch.where(t.free[rs, cs], mix, t.value[rs, cs])
        self.new_coefficients[t.name] = [c.tolist() for c in coeffs]

    def _coefficients(self, old: torch.Tensor, n: int, generator: torch.Generator) -> list[torch.Tensor]:
        """``n`` new coefficient vectors following the configured rule, scaled to the old vectors' mean norm."""
        rule = self.options.coefficients
        k = old.shape[1]
        fresh = iter(_orthonormal_rows(n, k, generator))
        stack = old.clone()
        scale = float(old.norm(dim=1).mean()) * float(self.options.coef_scale)
        out = []
        for m in range(n):
            if rule == "orthogonal" or (rule == "alternate" and m % 2 == 0):
                v = next(fresh)
            else:  # the direction least covered by the stacked coefficients
                v = torch.linalg.svd(stack, full_matrices=True).Vh[-1]
            stack = torch.cat([stack, v.view(1, -1) * scale])
            out.append(v * scale)
        return out

    def after(self, ctx: GrowthContext) -> None:
        ctx.report["mixture"] = {
            "templates": self._source,
            "num_templates": int(next(iter(self._banks.values()))[0].shape[0]) if self._banks else 0,
            "coefficients": self.options.coefficients,
            "new_blocks": sum(len(v) for v in self.new_coefficients.values()),
        }
        self._banks = {}
