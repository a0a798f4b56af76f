"""``random``: the plain baseline. Old entries are copied to their positions unchanged; every new
entry is re-initialised as a fresh model would be (N(0, initializer_range^2) for matrices, 1 for norm
gains, 0 for biases and shifts). Not function-preserving."""

from __future__ import annotations

import torch

from .base import InitStrategy, TensorGrowth, register_strategy


@register_strategy("random")
class RandomInit(InitStrategy):
    preserves_function = False

    @classmethod
    def default_options(cls) -> dict:
        return {"std": None}

    def init_tensor(self, t: TensorGrowth) -> None:
        if not bool(t.free.any()):
            return
        if "hidden.gain" in t.axes:
            t.value[t.free] = 1.0
        elif t.is_vector:
            t.value[t.free] = 0.0
        else:
            std = self.options["std"] or float(getattr(t.config, "initializer_range", 0.02))
            t.value[t.free] = (torch.randn(t.value.shape, generator=t.generator) * std)[t.free]
