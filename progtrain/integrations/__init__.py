"""Integrations of progtrain with other training loops.

``progtrain.integrations.trainer.ProgressiveTrainer``: a ``transformers.Trainer`` that applies a
progtrain growth schedule (the ``stages:`` of a run YAML) while it trains.
"""

from .trainer import ProgressiveTrainer, load_stages

__all__ = ["ProgressiveTrainer", "load_stages"]
