"""``function_preserving`` (default): constrained blocks keep the function (see DESIGN.md section 3);
free blocks get small Gaussian values so new units and heads can learn."""

from __future__ import annotations

import torch

from .base import InitStrategy, TensorGrowth, reference_std, register_strategy


@register_strategy("function_preserving")
class FunctionPreserving(InitStrategy):
    """Free matrix entries ~ N(0, (scale * std_old)^2), where std_old is the std of the trained
    tensor they join; free vector entries (biases) are 0. Options: ``scale`` (default 1.0)."""

    preserves_function = True

    @classmethod
    def default_options(cls) -> dict:
        return {"scale": 1.0}

    def init_tensor(self, t: TensorGrowth) -> None:
        if t.is_vector or not bool(t.free.any()):
            return
        std = self.options["scale"] * reference_std(t)
        noise = torch.randn(t.value.shape, generator=t.generator) * std
        t.value[t.free] = noise[t.free]
