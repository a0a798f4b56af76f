"""``random``: the plain baseline. Old entries are copied to their positions unchanged; every new
entry is re-initialised as a fresh model would be (N(0, initializer_range^2) for matrices, 1 for norm
gains, 0 for biases and shifts). Not function-preserving."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import InitStrategy, StrategyOptions, TensorGrowth, option, register_strategy


@dataclass
class RandomOptions(StrategyOptions):
    std: float | None = option(None, "std of new matrix entries (None: the config's initializer_range)")

    def __post_init__(self) -> None:
        self.require(self.std is None or self.std > 0, "std", "must be > 0 (or None for initializer_range)")


@register_strategy("random")
class RandomInit(InitStrategy):
    """New entries drawn as a fresh model's (N(0, initializer_range^2) matrices, unit gains, zero
    biases); old entries copied unchanged. Not function-preserving."""

    preserves_function = False
    Options = RandomOptions

    def init_tensor(self, t: TensorGrowth) -> None:
        if not bool(t.free.any()):
            return
        if "hidden.gain" in t.axes:
            t.value[t.free] = 1.0
        elif t.is_vector:
            t.value[t.free] = 0.0
        else:
            std = self.options.std or float(getattr(t.config, "initializer_range", 0.02))
            t.value[t.free] = (torch.randn(t.value.shape, generator=t.generator) * std)[t.free]
