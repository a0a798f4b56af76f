"""Init strategies: fill the *free* blocks of grown tensors (and, for some methods, adjust others).

A strategy is a class registered under a name with :func:`register_strategy`. The growth operator
builds every grown tensor with its constrained blocks already set (copied, split, zero) and calls
:meth:`InitStrategy.init_tensor` once per tensor with a :class:`TensorGrowth`; whole-model methods
(GradInit, splitting, GradMax) use the :meth:`InitStrategy.before` / :meth:`InitStrategy.after` hooks.
Operators never know which strategy runs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..errors import ProgtrainConfigError

logger = logging.getLogger(__name__)


@dataclass
class TensorGrowth:
    """One grown parameter handed to a strategy.

    Attributes:
        name: parameter name in the grown model.
        role: its role (``q``, ``down``, ``norm`` ...; see :mod:`progtrain.arch.base`).
        axes: axis tags per dimension.
        value: the grown tensor (fp32) with constrained entries set; FREE entries are zero.
        free: bool mask of entries the strategy must fill.
        born: bool mask of entries that did not exist before the growth (free or constrained).
        old: the source tensor (fp32) or None.
        fan_in_old / fan_in_new: number of inputs of one output unit before/after (1 for vectors).
        new_layer: True when the tensor belongs to an inserted block.
        config: the grown model's HF config.
        generator: seeded RNG to draw from.
    """

    name: str
    role: str
    axes: tuple[str | None, ...]
    value: torch.Tensor
    free: torch.Tensor
    born: torch.Tensor
    old: torch.Tensor | None
    fan_in_old: int
    fan_in_new: int
    new_layer: bool
    config: Any
    generator: torch.Generator
    info: dict = field(default_factory=dict)

    @property
    def is_vector(self) -> bool:
        return self.value.dim() == 1

    @property
    def is_norm(self) -> bool:
        return any(a in ("hidden.gain", "hidden.shift") for a in self.axes)


@dataclass
class GrowthContext:
    """Whole-model view for strategy hooks: the old and grown models, space maps, param maps, and
    optional data (an iterable of batches) for data-driven strategies."""

    old_model: Any
    new_model: Any | None
    maps: Any
    param_maps: dict
    data: Any = None
    report: dict = field(default_factory=dict)


class InitStrategy:
    """Base class. Subclasses set ``name``, ``preserves_function`` and override :meth:`init_tensor`."""

    name: str = ""
    preserves_function: bool = True
    needs_data: bool = False

    def __init__(self, **options: Any) -> None:
        unknown = set(options) - set(self.default_options())
        if unknown:
            raise ProgtrainConfigError(
                f"init strategy {self.name!r} has no option(s) {sorted(unknown)}; "
                f"valid: {sorted(self.default_options()) or 'none'}"
            )
        self.options = {**self.default_options(), **options}

    @classmethod
    def default_options(cls) -> dict[str, Any]:
        return {}

    def before(self, ctx: GrowthContext) -> None:
        """Called once before any tensor is built (e.g. to collect gradients on the old model)."""

    def init_tensor(self, t: TensorGrowth) -> None:
        """Fill ``t.value[t.free]`` in place (and optionally adjust other entries)."""
        raise NotImplementedError

    def after(self, ctx: GrowthContext) -> None:
        """Called once with the grown model loaded (e.g. to tune scales on data)."""

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, **self.options}


_STRATEGIES: dict[str, type[InitStrategy]] = {}


def register_strategy(name: str) -> Callable[[type[InitStrategy]], type[InitStrategy]]:
    """Class decorator registering an :class:`InitStrategy` under ``name``."""

    def deco(cls: type[InitStrategy]) -> type[InitStrategy]:
        cls.name = name
        _STRATEGIES[name] = cls
        return cls

    return deco


def available_strategies() -> list[str]:
    """Names accepted by ``grow(init=...)`` and ``progtrain grow --init``."""
    return sorted(_STRATEGIES)


def get_strategy(name: str | InitStrategy, **options: Any) -> InitStrategy:
    """Instantiate a registered strategy (an instance is returned as is)."""
    if isinstance(name, InitStrategy):
        return name
    if name not in _STRATEGIES:
        raise ProgtrainConfigError(
            f"unknown init strategy {name!r}; available: {', '.join(available_strategies())}"
        )
    return _STRATEGIES[name](**options)


def reference_std(t: TensorGrowth) -> float:
    """Std of the trained tensor the new entries join (falls back to the config's initializer_range)."""
    if t.old is not None and t.old.numel() > 1:
        s = float(t.old.float().std())
        if s > 0:
            return s
    return float(getattr(t.config, "initializer_range", 0.02))
