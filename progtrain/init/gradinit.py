"""``gradinit``: learn one scale per parameter tensor by the GradInit objective (Zhu et al. 2021),
then bake the scales into the weights.

With scales ``m_i`` the model's parameters are ``theta_m = {m_i W_i}``. GradInit minimises the loss
after one optimiser step, on a second batch that overlaps the first::

    min_m  L(S~; theta_m - eta * A[g(S; theta_m)])   s.t.  ||g(S; theta_m)|| <= gamma,  m_i >= alpha

with ``A[g] = sign(g)`` and the L1 norm for Adam, ``A[g] = g / ||g||_2`` and the L2 norm for SGD.
Each iteration takes one Adam step on ``m``: on ``||g||`` when the constraint is violated, else on
the look-ahead loss divided by ``eta`` (as the reference code does); then ``m`` is clipped to
``alpha``. ``S~`` is the second half of ``S`` followed by the first half of the next batch.

Units: ``eta`` is the look-ahead learning rate of the real optimiser (parameter units per step; 1e-3
is the paper's value for post-LN transformers); ``lr`` the Adam learning rate of the scales; ``gamma``
a gradient norm in loss units per parameter unit (default: the largest norm over the batches at
``m = 1``, so the start is feasible and tuning may not raise it). After the iterations, constraint
steps continue (at most ``iters // 10 + 10``) until ``||g|| <= gamma`` holds on every batch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal, Sequence

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..arch.base import iter_params
from ..errors import ProgtrainConfigError
from .base import GrowthContext, option, register_strategy
from .function_preserving import FunctionPreserving, FunctionPreservingOptions
from .signed_split import LossFn, check_batches, default_loss

logger = logging.getLogger(__name__)

ALGORITHMS = ("adam", "sgd")


@dataclass
class GradInitResult:
    """What :func:`gradinit_` returns: the learned scale per tuned tensor, the mean look-ahead loss
    over the batch pairs with all scales 1 and with the learned scales, the gradient-norm bound and
    the largest gradient norm over the batches at the learned scales, and the step counts."""

    scales: dict[str, float]
    lookahead_before: float
    lookahead_after: float
    gamma: float
    gnorm_after: float
    constraint_steps: int
    objective_steps: int
    baked: bool
    history: list[float] = field(default_factory=list)

    def as_report(self) -> dict:
        vals = list(self.scales.values())
        return {
            "tensors": len(vals),
            "scale_min": min(vals) if vals else None,
            "scale_max": max(vals) if vals else None,
            "lookahead_before": self.lookahead_before,
            "lookahead_after": self.lookahead_after,
            "gamma": self.gamma,
            "gnorm_after": self.gnorm_after,
            "constraint_steps": self.constraint_steps,
            "objective_steps": self.objective_steps,
        }


def batch_pairs(batches: Sequence[dict]) -> list[tuple[dict, dict]]:
    """``(S, S~)`` pairs: ``S~`` = second half of ``S`` + first half of the next batch (cyclic) when
    their tensors line up, else the next batch; with a single batch ``S~ = S``."""
    pairs = []
    n = len(batches)
    for i, s in enumerate(batches):
        nxt = batches[(i + 1) % n]
        if n == 1:
            pairs.append((s, s))
            continue
        try:
            half = {}
            for k, v in s.items():
                b = v.shape[0] // 2
                half[k] = torch.cat([v[b:], nxt[k][: v.shape[0] - b]])
            pairs.append((s, half))
        except (RuntimeError, KeyError, AttributeError, IndexError):
            pairs.append((s, nxt))
    return pairs


def _call(model: nn.Module, params: dict[str, torch.Tensor], batch: Any, loss_fn: LossFn) -> torch.Tensor:
    """``loss_fn`` on ``model`` with ``params`` substituted; attention runs on the math SDPA kernel,
    whose backward is itself differentiable (GradInit differentiates through a gradient)."""

    class _Bound:  # lets loss_fn call the model with functional parameters
        def __call__(self, *a: Any, **k: Any) -> Any:
            return functional_call(model, params, args=a, kwargs=k)

    with sdpa_kernel(SDPBackend.MATH):
        return loss_fn(_Bound(), batch)


class _Objective:
    """Scaled parameters, their gradient, its norm and the look-ahead loss for one batch pair."""

    def __init__(self, model: nn.Module, names: Sequence[str], algorithm: str, eta: float, loss_fn: LossFn) -> None:
        if algorithm not in ALGORITHMS:
            raise ProgtrainConfigError(f"gradinit: optimizer must be one of {ALGORITHMS}, got {algorithm!r}")
        self.model, self.algorithm, self.eta, self.loss_fn = model, algorithm, eta, loss_fn
        self.base = {n: p.detach().requires_grad_(True) for n, p in iter_params(model)}
        unknown = [n for n in names if n not in self.base]
        if unknown:
            raise ProgtrainConfigError(f"gradinit: no parameter(s) {unknown[:5]} in {type(model).__name__}")
        # float64 scales: the bound m >= alpha holds exactly for the reported values
        self.scales = {n: torch.ones((), dtype=torch.float64, requires_grad=True) for n in names}

    def theta(self) -> dict[str, torch.Tensor]:
        return {n: (self.scales[n].to(w.dtype) * w if n in self.scales else w) for n, w in self.base.items()}

    def grad_and_norm(
        self, S: Any, create_graph: bool
    ) -> tuple[dict[str, torch.Tensor], tuple[torch.Tensor, ...], torch.Tensor]:
        theta = self.theta()
        loss = _call(self.model, theta, S, self.loss_fn)
        grads = torch.autograd.grad(loss, list(theta.values()), create_graph=create_graph, allow_unused=True)
        grads = tuple(torch.zeros_like(t) if g is None else g for g, t in zip(grads, theta.values()))
        if self.algorithm == "adam":
            gnorm = sum(g.abs().sum() for g in grads)
        else:
            gnorm = torch.sqrt(sum(g.square().sum() for g in grads))
        return theta, grads, gnorm

    def lookahead(
        self, theta: dict[str, torch.Tensor], grads: Sequence[torch.Tensor], gnorm: torch.Tensor, S2: Any
    ) -> torch.Tensor:
        if self.algorithm == "adam":
            steps = [g.detach().sign() for g in grads]
        else:
            steps = [g / gnorm.clamp_min(1e-30) for g in grads]
        moved = {n: t - self.eta * s for (n, t), s in zip(theta.items(), steps)}
        return _call(self.model, moved, S2, self.loss_fn)

    def evaluate(self, pairs: Sequence[tuple[Any, Any]]) -> tuple[float, float, int]:
        """Mean look-ahead loss, max gradient norm and the index of the pair with the largest norm."""
        losses, norms = [], []
        for S, S2 in pairs:
            theta, grads, gnorm = self.grad_and_norm(S, create_graph=self.algorithm == "sgd")
            with torch.no_grad() if self.algorithm == "adam" else torch.enable_grad():
                losses.append(float(self.lookahead(theta, grads, gnorm, S2).detach()))
            norms.append(float(gnorm.detach()))
        worst = max(range(len(norms)), key=norms.__getitem__)
        return sum(losses) / len(losses), norms[worst], worst


def _is_main_process() -> bool:
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def lookahead_loss(
    model: nn.Module,
    batches: Sequence[dict],
    scales: dict[str, float] | None = None,
    *,
    eta: float = 1e-3,
    optimizer: str = "adam",
    loss_fn: LossFn = default_loss,
) -> tuple[float, float]:
    """The GradInit quantities of ``model`` with the given scales (missing = 1): the mean look-ahead
    loss over :func:`batch_pairs` of ``batches`` and the largest gradient norm (L1 for Adam, L2 for SGD)."""
    obj = _Objective(model, list(scales or {}), optimizer, eta, loss_fn)
    with torch.no_grad():
        for n, v in (scales or {}).items():
            obj.scales[n].fill_(v)
    was = model.training
    model.eval()
    try:
        with torch.enable_grad():
            loss, gmax, _ = obj.evaluate(batch_pairs(list(batches)))
    finally:
        model.train(was)
    return loss, gmax


@torch.no_grad()
def bake_scales_(model: nn.Module, scales: dict[str, float]) -> nn.Module:
    """Multiply each named parameter by its scale in place (a tied weight is scaled once)."""
    params = dict(iter_params(model))
    for n, s in scales.items():
        params[n].mul_(s)
    return model


def gradinit_(
    model: nn.Module,
    batches: Iterable[dict],
    *,
    names: Sequence[str] | None = None,
    iters: int = 300,
    lr: float = 5e-3,
    eta: float = 1e-3,
    alpha: float = 0.01,
    gamma: float | None = None,
    optimizer: str = "adam",
    bake: bool = True,
    loss_fn: LossFn = default_loss,
    progress: bool = True,
) -> GradInitResult:
    """Run GradInit on ``model`` (see the module docstring) and, with ``bake``, multiply the weights
    by the learned scales in place.

    Args:
        model: a model whose ``loss_fn(model, batch)`` is a scalar loss (default: ``model(**batch).loss``).
        batches: calibration batches (at least one; pairs are formed by :func:`batch_pairs`).
        names: parameter names to scale (plain HF names, see ``progtrain.arch.base.iter_params``);
            None = every parameter tensor.
        iters: GradInit iterations (one Adam step on the scales each).
        lr: Adam learning rate of the scales.
        eta: look-ahead step of the simulated optimiser.
        alpha: lower bound of every scale.
        gamma: gradient-norm bound (None = the largest norm over the batches at scales 1).
        optimizer: ``"adam"`` (sign step, L1 norm) or ``"sgd"`` (normalised step, L2 norm).
        bake: write ``m_i W_i`` into the weights at the end.
        progress: show a tqdm bar (main process only).

    Raises:
        ProgtrainConfigError: bad options or no batches, before any work.
    """
    batches = check_batches(batches, "gradinit")
    _check_options(model, iters, lr, eta, alpha, gamma, optimizer)
    pairs = batch_pairs(batches)
    names = [n for n, _ in iter_params(model)] if names is None else list(names)
    obj = _Objective(model, names, optimizer, eta, loss_fn)
    was = model.training
    model.eval()
    try:
        with torch.enable_grad():
            before, g0, _ = obj.evaluate(pairs)
            gamma = g0 if gamma is None else float(gamma)
            step = _ScaleStep(list(obj.scales.values()), lr, alpha)
            n_con, n_obj, history = _iterate(obj, pairs, step, iters, gamma, optimizer == "sgd", progress)
            after, gmax, n_end = _end_within_bound(obj, pairs, step, gamma, iters // 10 + 10)
            n_con += n_end
    finally:
        model.train(was)
    scales = {n: float(m.detach()) for n, m in obj.scales.items()}
    if gmax > gamma:
        logger.warning("gradinit: gradient norm %.4g still above gamma %.4g after the constraint steps", gmax, gamma)
    if bake:
        bake_scales_(model, scales)
    logger.info(
        "gradinit: %d tensors, look-ahead loss %.4f -> %.4f, scales in [%.3g, %.3g]",
        len(scales), before, after, min(scales.values(), default=1.0), max(scales.values(), default=1.0),
    )
    return GradInitResult(scales, before, after, gamma, gmax, n_con, n_obj, bake, history)


def _check_options(model: nn.Module, iters: int, lr: float, eta: float, alpha: float, gamma: float | None,
                   optimizer: str) -> None:
    """:func:`gradinit_`'s options, before any work (raises ProgtrainConfigError)."""
    from ..bake import is_parametrized

    if iters < 0 or lr <= 0 or eta <= 0 or alpha < 0 or (gamma is not None and gamma <= 0):
        raise ProgtrainConfigError(
            f"gradinit: need iters >= 0, lr > 0, eta > 0, alpha >= 0, gamma > 0 (got iters={iters}, lr={lr}, "
            f"eta={eta}, alpha={alpha}, gamma={gamma})"
        )
    if optimizer not in ALGORITHMS:
        raise ProgtrainConfigError(f"gradinit: optimizer must be one of {ALGORITHMS}, got {optimizer!r}")
    if is_parametrized(model):
        raise ProgtrainConfigError("gradinit needs plain weights: bake the model first (progtrain.bake.bake_)")


class _ScaleStep:
    """One Adam step (learning rate ``lr``) on the scales ``mlist`` down a loss, then the scales
    clamped to at least ``alpha``."""

    def __init__(self, mlist: list[torch.Tensor], lr: float, alpha: float) -> None:
        self.mlist, self.alpha = mlist, alpha
        self.opt = torch.optim.Adam(mlist, lr=lr)

    def __call__(self, loss: torch.Tensor) -> None:
        grads = torch.autograd.grad(loss, self.mlist, allow_unused=True)
        for m, g in zip(self.mlist, grads):
            m.grad = torch.zeros_like(m) if g is None else g
        self.opt.step()
        with torch.no_grad():
            for m in self.mlist:
                m.clamp_(min=self.alpha)


def _iterate(obj: "_Objective", pairs: list, step: _ScaleStep, iters: int, gamma: float, sgd: bool,
             progress: bool) -> tuple[int, int, list[float]]:
    """GradInit's ``iters`` iterations, cycling over the batch pairs ``(S, S2)``: a step down the
    gradient norm on ``S`` when it exceeds ``gamma`` (constraint step), else down the look-ahead
    loss on ``S2`` (objective step). Returns ``(constraint steps, objective steps, look-ahead losses)``."""
    from tqdm.auto import tqdm

    n_con = n_obj = 0
    history: list[float] = []
    bar = tqdm(range(iters), desc="gradinit", disable=not (progress and _is_main_process()), leave=False)
    for it in bar:
        S, S2 = pairs[it % len(pairs)]
        # Adam's sign step needs only the gradient's value; its norm's derivative (constraint
        # steps) needs the graph of the gradient, rebuilt only when the bound is violated
        theta, grads, gnorm = obj.grad_and_norm(S, create_graph=sgd)
        if float(gnorm.detach()) > gamma:
            if not sgd:
                _, _, gnorm = obj.grad_and_norm(S, create_graph=True)
            step(gnorm)
            n_con += 1
        else:
            la = obj.lookahead(theta, grads, gnorm, S2)
            step(la / obj.eta)
            history.append(float(la.detach()))
            n_obj += 1
    return n_con, n_obj, history


def _end_within_bound(obj: "_Objective", pairs: list, step: _ScaleStep, gamma: float,
                      max_steps: int) -> tuple[float, float, int]:
    """Constraint steps on the worst batch until the gradient norm is within ``gamma`` on every
    batch (at most ``max_steps``) -> ``(look-ahead loss, largest norm, steps taken)``."""
    after, gmax, worst = obj.evaluate(pairs)
    n = 0
    for _ in range(max_steps):
        if gmax <= gamma:
            break
        _, _, gnorm = obj.grad_and_norm(pairs[worst][0], create_graph=True)
        step(gnorm)
        n += 1
        after, gmax, worst = obj.evaluate(pairs)
    return after, gmax, n


@dataclass
class GradInitOptions(FunctionPreservingOptions):
    only_new: bool = option(True, "scale only tensors with new elements (False: every tensor)")
    iters: int = option(300, "GradInit iterations (one Adam step on the scales each)")
    lr: float = option(5e-3, "Adam learning rate of the scales")
    eta: float = option(1e-3, "look-ahead step of the simulated optimiser (parameter units per step)")
    alpha: float = option(0.01, "lower bound of every scale")
    gamma: float | None = option(None, "gradient-norm bound (None: the largest norm over the batches at scales 1)")
    optimizer: Literal["adam", "sgd"] = option("adam", "simulated optimiser: adam (sign step, L1 norm) or sgd")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.require(self.iters >= 0, "iters", "must be >= 0")
        self.require(self.lr > 0, "lr", "must be > 0")
        self.require(self.eta > 0, "eta", "must be > 0")
        self.require(self.alpha >= 0, "alpha", "must be >= 0")
        self.require(self.gamma is None or self.gamma > 0, "gamma", "must be > 0 (or None)")


@register_strategy("gradinit")
class GradInit(FunctionPreserving):
    """Grow as ``function_preserving``, then tune one scale per parameter tensor with GradInit
    (Zhu et al. 2021) on the calibration batches (``grow(data=...)``) and bake it in.

    The tuned model computes a different function by design (noted in the growth record).
    """

    preserves_function = True
    needs_data = True
    Options = GradInitOptions

    def before(self, ctx: GrowthContext) -> None:
        check_batches(ctx.data, self.name)

    def after(self, ctx: GrowthContext) -> None:
        o = self.options
        model = ctx.new_model
        names = [n for n, _ in iter_params(model)]
        if o.only_new:
            names = [n for n in names if n in ctx.param_maps and bool(ctx.param_maps[n].born_mask().any())]
        if not names:
            ctx.report["gradinit"] = {"tensors": 0}
            return
        res = gradinit_(
            model, list(ctx.data), names=names, iters=o.iters, lr=o.lr, eta=o.eta, alpha=o.alpha, gamma=o.gamma,
            optimizer=o.optimizer,
        )
        ctx.report["gradinit"] = res.as_report()
        ctx.report.setdefault("notes", []).append(
            f"gradinit rescaled {len(names)} tensors (look-ahead loss {res.lookahead_before:.4f} -> "
            f"{res.lookahead_after:.4f}): the function changes by design"
        )
