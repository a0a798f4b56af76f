"""``function_preserving`` (default): constrained blocks keep the function (docs/design.md, section 1);
free blocks get small Gaussian values so new units and heads can learn."""

from __future__ import annotations

import torch

from dataclasses import dataclass

from .base import InitStrategy, StrategyOptions, TensorGrowth, option, reference_std, register_strategy


@dataclass
class FunctionPreservingOptions(StrategyOptions):
    scale: float = option(1.0, "std of the free matrix entries relative to the std of the trained tensor they join")

    def __post_init__(self) -> None:
        self.require(self.scale >= 0, "scale", "must be >= 0")


@register_strategy("function_preserving")
class FunctionPreserving(InitStrategy):
    """Free matrix entries ~ N(0, (scale * std_old)^2), where std_old is the std of the trained
    tensor they join; free vector entries (biases) are 0."""

    preserves_function = True
    Options = FunctionPreservingOptions

    def init_tensor(self, t: TensorGrowth) -> None:
        if t.is_vector or not bool(t.free.any()):
            return
        std = self.options.scale * reference_std(t)
        noise = torch.randn(t.value.shape, generator=t.generator) * std
        t.value[t.free] = noise[t.free]
