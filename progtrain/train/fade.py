"""Fade-in of new blocks after a depth growth (MSG-style growth masks).

A post-norm block (BERT) cannot be an identity: its LayerNorm renormalises the stream, so inserting
new blocks changes the function however they are initialised. During the first ``steps`` optimizer
steps of a stage, each new block's output is mixed with its input,

    out = h + m * (block(h) - h),    m = min(1, steps_since_growth / steps),

through a forward hook on the block (the model stays a standard ``transformers`` model: no module is
replaced and the state dict is unchanged). At ``m = 0`` the grown model computes exactly what the
small model computed, whatever the family; at ``m = 1`` the hook is removed and the block is a
standard layer again, so checkpoints and the final model never depend on the mask. ``m`` is a pure
function of the optimizer step, so a resumed run rebuilds the same mask.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch

logger = logging.getLogger(__name__)


class LayerFade:
    """Forward hooks that fade the blocks at ``positions`` in over ``steps`` optimizer steps.

    Args:
        model: the (unwrapped) ``PreTrainedModel`` that holds the blocks.
        positions: indices of the new blocks in the grown model.
        steps: length of the fade-in, in optimizer steps (> 0).
    """

    def __init__(self, model: torch.nn.Module, positions: Sequence[int], steps: int) -> None:
        from ..arch import base_prefix, get_adapter

        if steps < 1:
            raise ValueError(f"fade-in needs at least 1 step, got {steps}")
        adapter = get_adapter(model)
        prefix = base_prefix(model)
        layers = model.get_submodule(f"{prefix}.{adapter.layers_path}" if prefix else adapter.layers_path)
        self.steps = int(steps)
        self.positions = [int(i) for i in positions]
        self.m = 0.0
        self._handles = [layers[i].register_forward_hook(self._hook, with_kwargs=True) for i in self.positions]

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def set_step(self, since_growth: int) -> None:
        """Set ``m`` for the optimizer step ``since_growth`` steps after the growth (0 = the first);
        removes the hooks once ``m`` reaches 1."""
        self.m = min(1.0, max(0, since_growth) / self.steps)
        if self.m >= 1.0:
            self.remove()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _hook(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        h = args[0] if args else kwargs["hidden_states"]
        out = output[0] if isinstance(output, tuple) else output
        mixed = h + self.m * (out - h) if self.m > 0 else h + 0.0 * out  # keep the graph: DDP expects grads
        return (mixed, *output[1:]) if isinstance(output, tuple) else mixed
