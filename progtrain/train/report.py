"""Run outputs: ``metrics.jsonl``, the ``loss_vs_flops.png`` plot, the stage summary table and the
model card. Only the main process calls these."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Sequence

from ..io import atomic_write, atomic_write_text, json_default
from ..text import text_table

logger = logging.getLogger(__name__)

METRIC_KEYS = ("event", "step", "stage", "tokens", "flops", "wall_s", "train_loss", "val_loss", "lr")


class MetricsLog:
    """Append-only JSON-lines log. Every line has the keys of ``METRIC_KEYS`` (None when not
    measured at that line) plus extras: ``tokens`` (cumulative, all processes), ``flops``
    (cumulative training FLOPs, see :mod:`progtrain.train.flops`), ``wall_s`` (seconds of training
    since the run started, summed over resumed sessions)."""

    def __init__(self, path: str | os.PathLike, truncate_after_step: int | None = None,
                 growth_done: bool = True) -> None:
        self.path = Path(path)
        if truncate_after_step is not None and self.path.exists():
            # a resumed run continues from its checkpoint: drop lines written after it (and a growth at
            # the checkpoint's step when the checkpoint was taken before that growth)
            def keep(m: dict) -> bool:
                if m["event"] in ("growth", "start"):
                    return m["step"] < truncate_after_step or (m["step"] == truncate_after_step and growth_done)
                return m["step"] <= truncate_after_step

            kept = [l for l in self.path.read_text().splitlines() if l.strip() and keep(json.loads(l))]
            atomic_write_text(self.path, "".join(l + "\n" for l in kept))

    def write(self, **row: Any) -> dict:
        line = {k: row.pop(k, None) for k in METRIC_KEYS}
        line.update(row)
        with open(self.path, "a") as f:
            f.write(json.dumps(line, default=json_default) + "\n")
        return line


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """All lines of a ``metrics.jsonl``."""
    return [json.loads(l) for l in Path(path).read_text().splitlines() if l.strip()]


def plot_loss_vs_flops(metrics: Sequence[dict], out: str | os.PathLike) -> Path:
    """Train and validation loss against cumulative training FLOPs, growth events as vertical lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    tr = [(m["flops"], m["train_loss"]) for m in metrics if m["event"] == "train" and m.get("train_loss") is not None]
    ev = sorted([(m["flops"], m["val_loss"]) for m in metrics if m["event"] == "eval" and m.get("val_loss") is not None]
                + [(m["flops"], m["val_loss_after"]) for m in metrics
                   if m["event"] == "growth" and m.get("val_loss_after") is not None])
    if tr and min(f for f, _ in tr) > 0:  # log axis: leave out the step-0 evaluation
        ev = [(f, v) for f, v in ev if f > 0]
    if tr:
        ax.plot(*zip(*tr), lw=1, alpha=0.7, label="train loss")
    if ev:
        ax.plot(*zip(*ev), "o-", ms=3, label="validation loss")
    for m in metrics:
        if m["event"] == "growth":
            ax.axvline(m["flops"], color="k", ls="--", lw=0.8)
            ax.annotate(m.get("name", f"stage {m['stage']}"), (m["flops"], 1), xycoords=("data", "axes fraction"),
                        rotation=90, va="top", ha="right", fontsize=8)
    ax.set_xlabel("cumulative training FLOPs")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("progressive training: loss vs compute")
    if tr and min(f for f, _ in tr) > 0:
        ax.set_xscale("log")
    ax.legend()
    fig.tight_layout()
    try:
        return atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=120))
    finally:
        plt.close(fig)


def stage_rows(metrics: Sequence[dict], stage_info: Sequence[dict]) -> list[dict]:
    """Per-stage summary rows (the card's ``stages`` format): each stage's steps, tokens and FLOPs
    between its growth line and the next one (or the last line), and its validation loss at its end
    (the loss logged right before the next growth, else the last evaluation)."""
    bounds = {0: (0, 0, 0.0)}
    for m in metrics:
        if m["event"] == "growth":
            bounds[m["stage"]] = (m["step"], m["tokens"], m["flops"])
    ends = [m for m in metrics if m["event"] in ("train", "end", "growth")]
    last = (ends[-1]["step"], ends[-1]["tokens"], ends[-1]["flops"]) if ends else (0, 0, 0.0)
    rows = []
    for info in stage_info:
        i = info["stage"]
        if i not in bounds:
            continue  # a stage the run did not reach
        s0, s1 = bounds[i], bounds.get(i + 1, last)
        nxt = [m for m in metrics if m["event"] == "growth" and m["stage"] == i + 1]
        evals = [m for m in metrics if m["event"] == "eval" and m.get("stage") == i and m.get("val_loss") is not None]
        val = nxt[0]["val_loss_before"] if nxt else (evals[-1]["val_loss"] if evals else None)
        rows.append({**info, "steps": s1[0] - s0[0], "tokens": s1[1] - s0[1], "flops": s1[2] - s0[2], "val_loss": val})
    return rows


def format_stage_table(rows: Sequence[dict]) -> str:
    """The stage summary table printed at the end of a run."""
    head = ("stage", "name", "hidden", "heads", "ffn", "layers", "params", "steps", "tokens", "FLOPs", "init", "val loss")
    table = [head]
    for r in rows:
        s = r["sizes"]
        vl = r.get("val_loss")
        table.append((str(r["stage"]), r["name"], str(s["hidden_size"]), str(s["num_heads"]), str(s["intermediate_size"]),
                      str(s["num_layers"]), f"{r['params']:,}", str(r["steps"]), f"{r['tokens']:,}", f"{r['flops']:.3e}",
                      r.get("init") or "-", "-" if vl is None else f"{vl:.4f}"))
    return text_table(table)


def model_card(config: Any, history: list[dict], stages: list[dict], final_metrics: dict, source: str,
               run_cfg: Any) -> str:
    """README.md text for the final model (``progtrain.card.render_model_card``)."""
    from ..card import render_model_card

    # a local path names its last part only: a card travels to the Hub, the machine's paths do not
    if source and not _is_hub_name(source):
        source = Path(source).name or source
    extra = (
        f"Trained with `progtrain train` on {source}: {run_cfg.train.max_steps} steps of "
        f"{run_cfg.tokens_per_step:,} tokens ({run_cfg.train.batch_size} x {run_cfg.data.seq_len}), "
        f"AdamW lr {run_cfg.optim.lr:g} ({run_cfg.optim.schedule}, {run_cfg.optim.warmup_steps} warm-up steps)."
    )
    datasets = None if not run_cfg.data.dataset else [run_cfg.data.dataset]
    base = run_cfg.model.checkpoint if run_cfg.model.checkpoint else None
    return render_model_card(config=config, growth_history=history, stages=stages, final_metrics=final_metrics,
                             base_model=base, datasets=datasets, extra_markdown=extra)


def _is_hub_name(name: str) -> bool:
    """``name`` is not a local path (a hub dataset id such as ``owner/name``, or a description)."""
    return not (name.startswith(("/", "~", ".")) or Path(name).exists())


def perplexity(loss: float | None) -> float | None:
    """exp(loss), or None."""
    if loss is None or not math.isfinite(loss):
        return None
    return math.exp(min(loss, 50.0))
