"""``progtrain train CONFIG`` and ``progtrain plan CONFIG`` (registered into the CLI by
``progtrain.cli``).

The command functions import the training stack (torch, transformers, accelerate) when they run, not
at module level: ``progtrain.cli`` imports this module to build its parser, and ``progtrain --help``
must not pay for them.
"""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import ProgtrainConfigError


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments shared by ``progtrain train`` and the ``recipes/`` scripts."""
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (dotted key, list items by index), e.g. --set train.max_steps=50 "
                        "--set stages.0.start_step=20 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint in the output dir")
    p.add_argument("--output-dir", help="output directory (default: output_dir in the config)")
    p.add_argument("--allow-config-change", action="store_true",
                   help="with --resume: continue even though the config's length, batch, LR schedule or stages differ "
                        "from the run's (refused otherwise, because they change the run's path)")


def cmd_train(args: argparse.Namespace) -> int:
    """Validate the config (before any work), then train; a diverged loss raises
    :class:`~progtrain.errors.TrainingDivergedError` (exit 1)."""
    from .config import load_config
    from .engine import train

    cfg = load_config(args.config, args.overrides, args.output_dir)
    train(cfg, resume=args.resume, allow_config_change=args.allow_config_change)
    return 0


def run_recipe(task: str, default_config: str, description: str, argv: list[str] | None = None) -> int:
    """Entry point of the ``recipes/`` scripts: the same path as ``progtrain train``, checking that the
    config trains ``task`` (causal_lm | masked_lm). Returns the exit code (2 with one line on bad input,
    1 when training diverges; see :mod:`progtrain.errors`)."""
    from ..cli import console_logging, run_command
    from .config import load_config
    from .engine import train

    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", default=default_config, help=f"YAML run config (default: {default_config})")
    add_run_arguments(p)
    args = p.parse_args(argv)
    console_logging()

    def recipe(args: argparse.Namespace) -> int:
        cfg = load_config(args.config, args.overrides, args.output_dir)
        if cfg.model.task != task:
            raise ProgtrainConfigError(
                f"{args.config} trains model.task={cfg.model.task}, this recipe trains {task}: use the other recipe "
                f"or `progtrain train {args.config}`"
            )
        train(cfg, resume=args.resume, allow_config_change=args.allow_config_change)
        return 0

    return run_command(recipe, args, p.prog)


def cmd_plan(args: argparse.Namespace) -> int:
    """Print per-stage sizes, parameters, steps, tokens and FLOPs, and the total against training
    the final size for the same tokens."""
    from .config import load_config
    from .flops import format_plan, plan

    cfg = load_config(args.config, args.overrides, None)
    print(format_plan(plan(cfg)))
    return 0


def register(subparsers: Any) -> None:
    """Add the ``train`` and ``plan`` sub-commands."""
    t = subparsers.add_parser(
        "train",
        help="progressive pretraining from a YAML run config",
        description="Train a model in stages, growing it at each stage boundary (function-preserving by default). "
        "Runs unchanged under one process, DDP and DeepSpeed ZeRO-1/2/3: launch with "
        "`accelerate launch -m progtrain.cli train CONFIG` or the scripts in recipes/. Writes the final model "
        "(OUTPUT/final), metrics.jsonl, loss_vs_flops.png, README.md and checkpoints to the output dir. Example:\n"
        "  progtrain train configs/gpt2_tiny_progressive.yaml --set train.max_steps=100",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    t.add_argument("config", help="YAML run config (see configs/)")
    add_run_arguments(t)
    t.set_defaults(func=cmd_train)

    p = subparsers.add_parser(
        "plan",
        help="print the stages of a run config with parameters, tokens and training FLOPs",
        description="Per stage: sizes, parameters, steps, tokens and training FLOPs (6*N*tokens + attention term, "
        "see progtrain/train/flops.py), and the total against training the final size for the same tokens.",
    )
    p.add_argument("config", help="YAML run config")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, as for train")
    p.set_defaults(func=cmd_plan)
