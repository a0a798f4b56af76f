"""Progressive pretraining: run configs, data, the training loop (one process, DDP, DeepSpeed
ZeRO-1/2/3), optimizer surgery across growth, checkpoint/resume, FLOPs accounting and reports.

    from progtrain.train import load_config, train
    summary = train(load_config("configs/gpt2_tiny_progressive.yaml", ["train.max_steps=100"]))
"""

from .config import RunConfig, StageConfig, load_config
from ..errors import TrainingDivergedError
from .engine import evaluate, train
from .flops import flops_per_token, format_plan, plan
from .surgery import grow_moments, update_scales

__all__ = ["RunConfig", "StageConfig", "TrainingDivergedError", "evaluate", "flops_per_token", "format_plan",
           "grow_moments", "load_config", "plan", "train", "update_scales"]
