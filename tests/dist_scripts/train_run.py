"""Run ``progtrain.train.engine.train`` from a YAML config, optionally stopping after a step (the
``stop_at_step`` of :func:`~progtrain.train.engine.train`, which the CLI does not expose) or resuming.

    accelerate launch [...] tests/dist_scripts/train_run.py --config C --output-dir D [--set K=V ...]
        [--stop-at N] [--resume]
"""

from __future__ import annotations

import argparse

from progtrain.train.config import load_config
from progtrain.train.engine import train


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--output-dir", required=True)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--stop-at", type=int, default=None)
    ap.add_argument("--resume", action="store_true")
    args = ap.parse_args()
    cfg = load_config(args.config, args.overrides, args.output_dir)
    train(cfg, resume=args.resume, stop_at_step=args.stop_at)


if __name__ == "__main__":
    main()
