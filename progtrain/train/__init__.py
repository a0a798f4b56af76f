"""Progressive pretraining: run configs, data, the training loop (one process, DDP, DeepSpeed
ZeRO-1/2/3), optimizer surgery across growth, checkpoint/resume, FLOPs accounting and reports.

    from progtrain.train import load_config, train
    summary = train(load_config("configs/gpt2_tiny_progressive.yaml", ["train.max_steps=100"]))

The names are imported on first use (PEP 562): the command line imports
``progtrain.train.commands`` to build its parser without importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_attributes
if TYPE_CHECKING:
    from ..errors import TrainingDivergedError
    from .config import RunConfig, StageConfig, load_config
    from .engine import evaluate, train
    from .flops import flops_per_token, format_plan, plan
    from .surgery import grow_moments, update_scales

_LAZY = {
    "RunConfig": ".config", "StageConfig": ".config", "load_config": ".config",
    "TrainingDivergedError": "..errors", "evaluate": ".engine", "train": ".engine",
    "flops_per_token": ".flops", "format_plan": ".flops", "plan": ".flops",
    "grow_moments": ".surgery", "update_scales": ".surgery",
}

__all__ = ["RunConfig", "StageConfig", "TrainingDivergedError", "evaluate", "flops_per_token", "format_plan",
           "grow_moments", "load_config", "plan", "train", "update_scales"]


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)
