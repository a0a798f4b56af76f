"""``progtrain train CONFIG``, ``progtrain eval CHECKPOINT --config CONFIG`` and ``progtrain plan CONFIG`` (registered into the CLI by
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


def cmd_eval(args: argparse.Namespace) -> int:
    """Validation loss (nats per predicted token) and perplexity of a checkpoint on the held-out split
    of a run config's data (the split the run evaluates on; prepared now when missing). Prints one
    line on stdout (and JSON with ``--json``)."""
    import json
    from pathlib import Path

    import torch

    from ..growth.calibration import fit_problems, input_limits
    from ..io import load_model
    from .config import load_config
    from .data import prepare_data
    from ..quiet import transformers_bars_off
    from .engine import evaluate, name_causal_loss
    from .report import perplexity

    cfg = load_config(args.config, args.overrides, args.output_dir)
    ckpt = Path(args.checkpoint)
    sharded = (ckpt / "sharded").is_dir()  # a ZeRO-3 / FSDP2 training checkpoint: consolidated below
    if (ckpt / "model" / "config.json").is_file():  # a training checkpoint (OUTPUT/checkpoints/step-N)
        ckpt = ckpt / "model"
    if not sharded and not (ckpt / "config.json").is_file():
        raise ProgtrainConfigError(
            f"{args.checkpoint} is not a checkpoint directory (no config.json): pass OUTPUT/final or "
            f"OUTPUT/checkpoints/step-N of a run"
        )
    batches = cfg.train.eval_batches if args.batches is None else args.batches
    if batches < 1:
        raise ProgtrainConfigError(f"--batches must be at least 1, got {batches}")
    data = prepare_data(cfg, cfg.output_dir)
    with transformers_bars_off():
        if sharded:
            from .checkpoint import load_full_model

            model = load_full_model(ckpt, task=cfg.model.task)
        else:
            model = load_model(str(ckpt), task=cfg.model.task, dtype="float32")
    masked = cfg.model.task == "masked_lm"
    if not masked:
        name_causal_loss(model)
    problems = fit_problems(input_limits(model), cfg.data.seq_len, data.tokenizer, masked=masked)
    if problems:
        raise ProgtrainConfigError(
            f"{args.checkpoint} does not fit the data of {args.config}: {'; '.join(problems)}; pass the config the "
            f"checkpoint was trained with"
        )
    bs = cfg.train.batch_size // cfg.train.grad_accum
    val = data.val_set(batches * bs)
    if len(val) == 0:
        raise ProgtrainConfigError(f"the held-out split of {args.config} is empty: raise data.val_fraction")
    loader = torch.utils.data.DataLoader(val, batch_size=bs, shuffle=False)
    loss = evaluate(model, loader, causal=not masked)
    ppl = perplexity(loss)
    print(f"{args.checkpoint}: validation loss {loss:.4f} nats/token, perplexity {ppl:.3f} "
          f"({len(val)} held-out sequences of {cfg.data.seq_len} tokens, {data.source})")
    if args.json:
        print(json.dumps({"checkpoint": str(args.checkpoint), "val_loss": loss, "perplexity": ppl,
                          "sequences": len(val), "seq_len": cfg.data.seq_len}))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    """Print per-stage sizes, parameters, steps, tokens and FLOPs, and the total against training
    the final size for the same tokens."""
    from .config import load_config
    from .flops import format_plan, plan

    cfg = load_config(args.config, args.overrides, None)
    print(format_plan(plan(cfg)))
    return 0


def register(subparsers: Any) -> None:
    """Add the ``train``, ``eval`` and ``plan`` sub-commands."""
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

    e = subparsers.add_parser(
        "eval",
        help="validation loss and perplexity of a checkpoint on a run config's held-out data",
        description="Load CHECKPOINT (a run's OUTPUT/final, OUTPUT/checkpoints/step-N, or any checkpoint whose "
        "vocabulary fits the config's tokenizer) and print its loss per predicted token (nats) and perplexity on "
        "the first train.eval_batches batches of the config's held-out split, the ones training evaluates on. "
        "The data is prepared first when missing. Example:\n"
        "  progtrain eval runs/gpt2_tiny_progressive/final --config configs/gpt2_tiny_progressive.yaml",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    e.add_argument("checkpoint", help="checkpoint directory")
    e.add_argument("--config", required=True, help="YAML run config whose held-out data to evaluate on")
    e.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, as for train")
    e.add_argument("--output-dir", help="output directory of the run (its prepared data, OUTPUT/data by default)")
    e.add_argument("--batches", type=int, help="evaluation batches (default: train.eval_batches)")
    e.add_argument("--json", action="store_true", help="also print the result as JSON")
    e.set_defaults(func=cmd_eval)

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
