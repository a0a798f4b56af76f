"""Report logic of the progressive-vs-scratch benchmark: when does a run first reach a loss, at what
compute and wall-clock, and how do two runs compare across seeds.

A run's evaluation curve is a list of points ``{"step", "tokens", "flops", "wall_s", "val_loss"}``
(FLOPs in floating-point operations, wall time in seconds since the run started), as written by the
training engine to ``metrics.jsonl``. Between two evaluations the loss is taken to change linearly
in the x-axis quantity (FLOPs or seconds), so the crossing point of a target loss is interpolated.
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from .io import atomic_write_text

logger = logging.getLogger(__name__)


@dataclass
class Curve:
    """Validation curve of one run, in evaluation order.

    Attributes:
        name: label (``scratch`` / ``progressive``).
        points: evaluation points, dicts with at least ``flops``, ``wall_s`` and ``val_loss``.
        growth_events: points (same keys, plus ``stage``) at which the model grew.
        growth_seconds: wall seconds spent inside each growth event.
        total_wall_s: wall seconds of the whole run (training, evaluation and growth).
    """

    name: str
    points: list[dict]
    growth_events: list[dict] = field(default_factory=list)
    growth_seconds: list[float] = field(default_factory=list)
    total_wall_s: float | None = None

    @property
    def final_loss(self) -> float:
        return float(self.points[-1]["val_loss"])

    @classmethod
    def from_metrics(cls, name: str, path: str | Path) -> "Curve":
        """Read an engine's ``metrics.jsonl``: rows with a ``val_loss`` become points; a change of
        ``stage`` between rows marks a growth event (``growth_s`` on a row is the growth's time)."""
        points, events, growth_s = [], [], []
        stage = None
        last_wall = 0.0
        for line in Path(path).read_text().splitlines():
            if not line.strip():
                continue
            row = json.loads(line)
            last_wall = float(row.get("wall_s", last_wall))
            if "growth_s" in row and row["growth_s"] is not None:
                growth_s.append(float(row["growth_s"]))
            if stage is not None and row.get("stage") is not None and row["stage"] != stage:
                events.append(row)
            if row.get("stage") is not None:
                stage = row["stage"]
            if row.get("val_loss") is not None:
                points.append(row)
        return cls(name, points, events, growth_s, last_wall)


def first_crossing(xs: Sequence[float], losses: Sequence[float], target: float) -> float | None:
    """The smallest x at which the piecewise-linear curve (xs, losses) first reaches ``target``
    (loss <= target), or None when it never does. ``xs`` must be non-decreasing."""
    if len(xs) != len(losses):
        raise ValueError("xs and losses differ in length")
    for i, (x, y) in enumerate(zip(xs, losses)):
        if y <= target:
            if i == 0:
                return float(x)
            x0, y0 = xs[i - 1], losses[i - 1]
            if y0 == y:
                return float(x)
            return float(x0 + (x - x0) * (y0 - target) / (y0 - y))
    return None


def compare(scratch: Curve, progressive: Curve) -> dict[str, Any]:
    """Compare one progressive run with its scratch baseline.

    ``L_star`` is the scratch run's final validation loss. Returns the FLOPs and wall seconds each run
    needed to first reach it, their ratios progressive/scratch (None when the progressive run never
    reaches L*), ``reached``, ``miss`` (progressive's best loss minus L*, > 0 when it never reached
    it), the final losses, and the fraction of the progressive run's wall time spent growing.
    """
    l_star = scratch.final_loss
    out: dict[str, Any] = {"L_star": l_star}
    for key, x in (("flops", "flops"), ("wallclock", "wall_s")):
        s = first_crossing([p[x] for p in scratch.points], [p["val_loss"] for p in scratch.points], l_star)
        p = first_crossing([q[x] for q in progressive.points], [q["val_loss"] for q in progressive.points], l_star)
        out[f"{key}_to_L_star_scratch"] = s
        out[f"{key}_to_L_star_progressive"] = p
        out[f"{key}_ratio"] = None if (p is None or not s) else p / s
    best = min(float(q["val_loss"]) for q in progressive.points)
    out["reached"] = out["flops_to_L_star_progressive"] is not None
    out["miss"] = max(0.0, best - l_star)
    out["final_val_loss_scratch"] = l_star
    out["final_val_loss_progressive"] = progressive.final_loss
    total = progressive.total_wall_s or (progressive.points[-1]["wall_s"] if progressive.points else None)
    out["growth_event_fraction"] = (max(progressive.growth_seconds) / total) if (progressive.growth_seconds and total) else None
    out["growth_seconds_total"] = sum(progressive.growth_seconds)
    out["total_flops_scratch"] = scratch.points[-1]["flops"]
    out["total_flops_progressive"] = progressive.points[-1]["flops"]
    return out


def mean_std(values: Iterable[float | None]) -> dict[str, float | int | None]:
    """Mean and sample std of the finite, non-None values (std 0 for one value; None when there are none)."""
    v = [float(x) for x in values if x is not None and math.isfinite(float(x))]
    if not v:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0, "n": len(v)}


SUMMARY_KEYS = (
    "flops_ratio",
    "wallclock_ratio",
    "L_star",
    "final_val_loss_scratch",
    "final_val_loss_progressive",
    "miss",
    "growth_event_fraction",
)


def aggregate(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean ± std over seeds of :func:`compare` results. ``reached`` is True only when every seed
    reached L*; ``reached_seeds`` counts them. Top-level keys hold the means; ``*_std`` the stds."""
    out: dict[str, Any] = {"per_seed": per_seed}
    for key in SUMMARY_KEYS:
        ms = mean_std(r.get(key) for r in per_seed)
        out[key] = ms["mean"]
        out[f"{key}_std"] = ms["std"]
    out["reached_seeds"] = sum(bool(r["reached"]) for r in per_seed)
    out["reached"] = out["reached_seeds"] == len(per_seed) and bool(per_seed)
    out["not_reached"] = [{"seed": r.get("seed"), "miss": r["miss"]} for r in per_seed if not r["reached"]]
    out["headline"] = headline(out)
    return out


def headline(summary: dict[str, Any]) -> str:
    """The one-line result: ``not reached`` naming each seed that missed L* and by how much (nats)
    when any did, else the FLOPs and wall-clock ratios (mean ± std over the seeds)."""
    n = len(summary.get("per_seed", []))
    if not n:
        return "no seeds"
    if not summary["reached"]:
        misses = ", ".join(
            f"seed {m['seed']} missed L* by {m['miss']:.4f} nats" if m.get("seed") is not None
            else f"missed L* by {m['miss']:.4f} nats" for m in summary["not_reached"])
        return f"not reached in {n - summary['reached_seeds']}/{n} seeds ({misses})"
    return (f"reached L* in {n}/{n} seeds at {_fmt(summary['flops_ratio'], summary['flops_ratio_std'], '.3f')} of the "
            f"scratch FLOPs and {_fmt(summary['wallclock_ratio'], summary['wallclock_ratio_std'], '.3f')} of its wall-clock")


def check_held_out_seeds(held_out: Sequence[int], tuning: Sequence[int], minimum: int = 3) -> None:
    """Refuse a headline on seeds that are too few, repeated, or were used to tune the schedule.

    Raises:
        ValueError: fewer than ``minimum`` distinct held-out seeds, a repeated seed, or a held-out seed
            that is also a tuning seed (the message names the seeds and the fix).
    """
    held, tune = [int(s) for s in held_out], {int(s) for s in tuning}
    if len(set(held)) != len(held):
        raise ValueError(f"held-out seeds {held} repeat a seed: give each seed once")
    both = sorted(set(held) & tune)
    if both:
        raise ValueError(f"seed(s) {both} tuned the schedule (tuning_seeds {sorted(tune)}) and cannot be held out: "
                         f"choose other --seeds")
    if len(held) < minimum:
        raise ValueError(f"the headline needs at least {minimum} held-out seeds, got {len(held)} ({held}): pass "
                         f"--seeds with {minimum} or more seeds outside the tuning seeds {sorted(tune)}")


def default_held_out_seeds(tuning: Sequence[int], n: int = 3) -> list[int]:
    """The ``n`` smallest non-negative seeds that are not tuning seeds."""
    tune, out, s = {int(x) for x in tuning}, [], 0
    while len(out) < n:
        if s not in tune:
            out.append(s)
        s += 1
    return out


def _fmt(mean: Any, std: Any, spec: str) -> str:
    if mean is None:
        return "not reached"
    return f"{mean:{spec}} ± {std:{spec}}" if std else f"{mean:{spec}}"


def markdown_table(summary: dict[str, Any]) -> str:
    """The benchmark's headline table (mean ± std over seeds) as markdown."""
    n = len(summary.get("per_seed", []))
    rows = [
        ("headline" + (f" (held-out seeds {', '.join(map(str, summary['held_out_seeds']))})"
                       if summary.get("held_out_seeds") else ""), summary.get("headline") or headline(summary)),
        ("L* (scratch final val loss)", _fmt(summary["L_star"], summary["L_star_std"], ".4f")),
        ("progressive final val loss", _fmt(summary["final_val_loss_progressive"], summary["final_val_loss_progressive_std"], ".4f")),
        ("progressive reached L*", f"{summary['reached_seeds']}/{n} seeds"),
        ("FLOPs to L*, progressive / scratch", _fmt(summary["flops_ratio"], summary["flops_ratio_std"], ".3f")),
        ("wall-clock to L*, progressive / scratch", _fmt(summary["wallclock_ratio"], summary["wallclock_ratio_std"], ".3f")),
    ]
    if not summary["reached"]:
        rows.append(("progressive best loss above L* by", _fmt(summary["miss"], summary["miss_std"], ".4f")))
    if summary.get("tokens_per_param") is not None:
        rows.append(("training tokens per parameter of the final model", f"{summary['tokens_per_param']:.2f}"))
    if summary.get("loop_overhead_ratio") is not None:
        rows.append(("progtrain loop overhead: steps/s lost vs a plain Accelerate loop", f"{100 * summary['loop_overhead_ratio']:.1f}%"))
    if summary.get("growth_event_fraction") is not None:
        rows.append(("largest growth event, fraction of the progressive run's wall time",
                     _fmt(summary["growth_event_fraction"], summary["growth_event_fraction_std"], ".4f")))
    lines = ["| metric | value |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows]
    return "\n".join(lines) + "\n"


def plot_curves(curves: dict[str, list[Curve]], x: str, path: str | Path, l_star: float | None = None) -> None:
    """Plot validation loss against ``x`` (``flops`` or ``wall_s``) for each run label (one line per
    seed), growth events as markers, and L* as a horizontal line; writes a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = {"scratch": "tab:blue", "progressive": "tab:orange", "progressive_same_flops": "tab:green"}
    for label, runs in curves.items():
        for i, c in enumerate(runs):
            xs = [p[x] for p in c.points]
            ax.plot(xs, [p["val_loss"] for p in c.points], color=colors.get(label), alpha=0.9 if i == 0 else 0.5,
                    label=label if i == 0 else None)
            for e in c.growth_events:
                ax.axvline(e[x], color=colors.get(label), ls=":", lw=0.8)
    if l_star is not None:
        ax.axhline(l_star, color="gray", ls="--", lw=0.8, label="L* (scratch final)")
    ax.set_xlabel({"flops": "training FLOPs", "wall_s": "wall-clock seconds"}.get(x, x))
    ax.set_ylabel("validation loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(out: str | Path, stem: str, markdown: str, data: dict[str, Any]) -> tuple[Path, Path]:
    """Write ``<out>/<stem>.md`` and ``<out>/<stem>.json`` (the JSON through a temporary file renamed
    into place, so a reader never sees half of it); returns both paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    md, js = out / f"{stem}.md", out / f"{stem}.json"
    md.write_text(markdown)
    atomic_write_text(js, json.dumps(data, indent=1, default=str))
    return md, js


def machine_info(threads: int | None = None) -> dict[str, Any]:
    """Where a benchmark ran: platform, CPU model and core count, Python and torch versions, torch
    threads (``threads`` or the current setting), ``OMP_NUM_THREADS`` and the GPU, if any."""
    import platform

    import torch

    cpu = platform.processor() or ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"platform": platform.platform(), "cpu": cpu, "cpus": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": threads or torch.get_num_threads(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def finished_run(cfg: Any, out: str | Path) -> bool:
    """Whether ``out`` holds a finished run of exactly the run config ``cfg`` (its ``run_info.json``
    records the same resolved config, not resumed, and ``metrics.jsonl`` ends at ``train.max_steps``)."""
    out = Path(out)
    try:
        info = json.loads((out / "run_info.json").read_text())
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    except (OSError, ValueError):
        return False
    same = json.loads(json.dumps(info.get("config"), default=str)) == json.loads(json.dumps(cfg.to_dict(), default=str))
    ended = any(r.get("event") == "end" and r.get("step") == cfg.train.max_steps for r in rows)
    return same and ended and not info.get("resumed_from")


def train_run(d: dict[str, Any], out: str | Path, *, seed: int | None = None, threads: int | None = None,
              reuse: bool = False) -> Path:
    """Train the run config dict ``d`` (``seed`` replacing its seed when given) into a fresh directory
    ``out`` (removed first when it exists) through progtrain's engine, with ``threads`` torch threads
    when given (a benchmark's worker process). No Hub push. ``reuse``: keep ``out`` instead when it
    already holds this very run, finished (:func:`finished_run`; an interrupted benchmark picks up
    its finished runs). Returns ``out/metrics.jsonl``."""
    import copy
    import shutil

    import torch

    from progtrain.train import train
    from progtrain.train.config import from_dict

    if threads:
        torch.set_num_threads(threads)
    out = Path(out)
    d = copy.deepcopy(d)
    d["output_dir"] = str(out)
    if seed is not None:
        d["seed"] = seed
    d.pop("push_to_hub", None)
    cfg = from_dict(d)
    if reuse and finished_run(cfg, out):
        logger.info("reusing the finished run in %s", out)
        return out / "metrics.jsonl"
    if out.exists():
        shutil.rmtree(out)
    train(cfg)
    return out / "metrics.jsonl"
