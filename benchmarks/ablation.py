"""Init-strategy ablation: grow a tiny GPT-2 once with each init strategy and compare validation losses.

For each seed:

1. the small model (``benchmarks/configs/ablation_gpt2_tiny.yaml``: GPT-2, width 64, 4 heads, FFN 256,
   2 layers, on the embedded Shakespeare plays) is trained ONCE for ``--steps-before`` optimizer steps
   and checkpointed (``train(cfg, stop_at_step=...)``);
2. for each arm (init strategy), that run directory is copied and resumed with the arm's stage config:
   the engine grows the model at the checkpoint's step (width 128, 8 heads, FFN 512) and trains
   ``--steps-after`` more steps. Every arm thus starts from the very same small model, optimizer
   moments, RNG state, data order and LR schedule (the schedule spans the whole run in every arm).

The engine's ``metrics.jsonl`` gives the validation loss right before and right after the growth
(same held-out batches), whether the growth was exact (and its relative logit deviation) and the
growth's wall time; the last evaluation gives the end-of-run loss. Losses are mean nats per predicted
token. The report aggregates mean +/- sample std over seeds, plus each arm's end loss minus
``function_preserving``'s in the same seed (paired: same small model, same data).

Arms (``--strategies``, default all): random, function_preserving, variance_transfer,
variance_transfer_lr (variance_transfer + stage ``lr_scales: {mode: norm_ratio}``), mixture, gradinit,
signed_split, gradmax. signed_split and gradmax only choose the new FFN units; the hidden and head
growth of those arms is done as by function_preserving (the strategies' own documented behaviour).

    OMP_NUM_THREADS=1 python benchmarks/ablation.py                        # the README table (~20 min, 2-core CPU)
    OMP_NUM_THREADS=1 python benchmarks/ablation.py --quick                # smoke test (~2 min)
    python benchmarks/ablation.py --seeds 0 1 --strategies random gradmax --steps-before 100 --steps-after 100

Writes ``<out>/ablation.json`` (settings, machine, date, command, per-seed numbers, aggregates) and
``<out>/ablation.md`` (the README section); training runs go to ``--work-dir``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as dt
import json
import logging
import os
import shlex
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

from progtrain.benchmark import machine_info, mean_std, write_report

HERE = Path(__file__).resolve().parent
DEFAULT_CONFIG = HERE / "configs" / "ablation_gpt2_tiny.yaml"
REFERENCE = "function_preserving"
logger = logging.getLogger("ablation")


@dataclass(frozen=True)
class Arm:
    """One arm of the ablation: the growth stage's ``init`` strategy, its ``init_kwargs`` and the
    stage's ``lr_scales`` (None = plain AdamW for every element), with a note for the report."""

    name: str
    init: str
    init_kwargs: dict = field(default_factory=dict)
    lr_scales: dict | None = None
    note: str = ""


ARMS: dict[str, Arm] = {a.name: a for a in [
    Arm("random", "random",
        note="new entries drawn as in a fresh model (N(0, 0.02^2) matrices, 0 biases, 1 norm gains); not function-preserving"),
    Arm("function_preserving", "function_preserving",
        note="hidden stream tiled, new heads' and FFN units' fan-out zero, other new entries N(0, std(old)^2)"),
    Arm("variance_transfer", "variance_transfer",
        note="old weights rescaled by sqrt(fan_in_old / fan_in_new) (rescale=sqrt), new fan-out zero; "
             "the rescale changes the function"),
    Arm("variance_transfer_lr", "variance_transfer", lr_scales={"mode": "norm_ratio"},
        note="as variance_transfer, plus LR adaptation: born elements train at ||W_born|| / ||W_0|| of the "
             "old elements' step, per role, clamped to [0.1, 10] (stage lr_scales: {mode: norm_ratio})"),
    Arm("mixture", "mixture",
        note="new free entries are mixtures of 4 templates derived from each trained weight (the small model "
             "was trained without templates); fan-out zero (exact); trained as plain weights after growth"),
    # GradInit's default 300 iterations take ~200 s per growth here (one thread); 100 keep the
    # default ablation inside its 30-minute budget
    Arm("gradinit", "gradinit", init_kwargs={"iters": 100},
        note="function_preserving growth, then one GradInit scale per tensor with new elements "
             "({iters} Adam iterations on 4 calibration batches; the strategy's default is 300, cut for time), "
             "baked in; changes the function by design"),
    Arm("signed_split", "signed_split",
        note="new FFN units are signed/positive splits of existing units (eps=0.01); hidden and heads grown as "
             "function_preserving; changes the function at O(eps^2)"),
    Arm("gradmax", "gradmax",
        note="new FFN units: zero fan-in, fan-out from the top singular vectors of the gradient correlation "
             "(columns beyond the 128 singular vectors are random, same scale); hidden and heads grown as "
             "function_preserving"),
]}


# ---------------------------------------------------------------------- run configs
def run_dict(base: dict, seed: int, steps_before: int, steps_after: int, out: Path, arm: Arm | None) -> dict:
    """The run config dict of one arm (``arm=None``: the shared small-model run, whose stage init is
    never used because it stops at the growth step)."""
    d = copy.deepcopy(base)
    d["seed"] = int(seed)
    d["output_dir"] = str(out)
    d.pop("push_to_hub", None)
    d["train"]["max_steps"] = int(steps_before + steps_after)
    if len(d.get("stages") or []) != 1:
        raise ValueError(f"the ablation config must have exactly one growth stage, got {len(d.get('stages') or [])}")
    st = d["stages"][0]
    st["start_step"] = int(steps_before)
    st.pop("start_tokens", None)
    if arm is not None:
        st["init"] = arm.init
        st["init_kwargs"] = dict(arm.init_kwargs)
        st["lr_scales"] = copy.deepcopy(arm.lr_scales)
    return d


# ---------------------------------------------------------------------- reading a run
def read_rows(path: Path) -> list[dict]:
    """The lines of an engine ``metrics.jsonl``."""
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def arm_result(rows: Sequence[dict], max_steps: int, growth_record: dict | None = None) -> dict:
    """One arm's numbers from its metrics rows: validation loss before / right after the (first) growth
    and at the end (the evaluation at ``max_steps``), exactness (every growth exact), the largest
    relative logit deviation, growth seconds (gather, grow, optimizer surgery, rebuild; summed over
    the growths), the number of growths and the evaluation curve [(step, val_loss)] from the first
    growth on. Raises ValueError for a run without a growth or without an evaluation at ``max_steps``."""
    growth = [r for r in rows if r.get("event") == "growth"]
    if not growth:
        raise ValueError("expected a growth event, found none")
    g = growth[0]
    ends = [r for r in rows if r.get("event") == "eval" and r.get("step") == max_steps and r.get("val_loss") is not None]
    if not ends:
        raise ValueError(f"no evaluation at the last step {max_steps}")
    curve = [(int(g["step"]), float(g["val_loss_after"]))] + [
        (int(r["step"]), float(r["val_loss"])) for r in rows
        if r.get("event") == "eval" and r.get("val_loss") is not None and r["step"] > g["step"]]
    rec = growth_record or {}
    devs = [float(x["deviation"]) for x in growth if x.get("deviation") is not None]
    secs = [float(x["growth_s"]) for x in growth if x.get("growth_s") is not None]
    return {
        "growth_step": int(g["step"]),
        "n_growths": len(growth),
        "val_loss_before": float(g["val_loss_before"]),
        "val_loss_after": float(g["val_loss_after"]),
        "val_loss_end": float(ends[-1]["val_loss"]),
        "exact": all(bool(x["exact"]) for x in growth),
        "deviation": max(devs) if devs else None,
        "growth_s": sum(secs) if secs else None,
        "params_after": growth[-1].get("params"),
        "curve_after_growth": curve,
        "notes": list(rec.get("notes") or []),
        "strategy_report": rec.get("strategy_report") or {},
    }


# ---------------------------------------------------------------------- aggregation and report
def fmt_ms(ms: dict, digits: int = 3, signed: bool = False) -> str:
    """``mean ± std`` (``-`` when there is no value)."""
    if ms.get("mean") is None:
        return "-"
    sign = "+" if signed else ""
    return f"{ms['mean']:{sign}.{digits}f} ± {ms['std']:.{digits}f}"


def exact_label(results: Sequence[dict]) -> str:
    """``yes`` when every seed's growth was exact; else ``no`` with the largest relative logit
    deviation (max |d logits| / max |logits|); ``k/n`` exact when the seeds disagree."""
    if not results:
        return "-"
    flags = [bool(r["exact"]) for r in results]
    devs = [r["deviation"] for r in results if r.get("deviation") is not None]
    dev = f" (dev {max(devs):.1e})" if devs else ""
    if all(flags):
        return "yes"
    if not any(flags):
        return "no" + dev
    return f"{sum(flags)}/{len(flags)} seeds" + dev


def aggregate(per_seed: dict[str, dict[int, dict]], reference: str = REFERENCE) -> list[dict]:
    """One summary row per arm from ``{arm: {seed: result}}`` (a result with ``error`` is skipped and
    counted). ``end_minus_ref`` is the paired per-seed difference of end losses to ``reference`` (only
    seeds where both arms ran)."""
    ref = per_seed.get(reference, {})
    rows = []
    for name, by_seed in per_seed.items():
        ok = {s: r for s, r in by_seed.items() if "error" not in r}
        diffs = [r["val_loss_end"] - ref[s]["val_loss_end"] for s, r in ok.items()
                 if s in ref and "error" not in ref[s]]
        rows.append({
            "strategy": name,
            "n": len(ok),
            "failed": sorted(s for s, r in by_seed.items() if "error" in r),
            "errors": sorted({r["error"] for r in by_seed.values() if "error" in r}),
            "val_loss_before": mean_std(r["val_loss_before"] for r in ok.values()),
            "val_loss_after": mean_std(r["val_loss_after"] for r in ok.values()),
            "growth_jump": mean_std(r["val_loss_after"] - r["val_loss_before"] for r in ok.values()),
            "val_loss_end": mean_std(r["val_loss_end"] for r in ok.values()),
            "end_minus_ref": mean_std(diffs) if name != reference else {"mean": 0.0, "std": 0.0, "n": len(diffs)},
            "exact": exact_label(list(ok.values())),
            "growth_s": mean_std(r["growth_s"] for r in ok.values()),
        })
    return rows


def markdown_table(rows: Sequence[dict], reference: str = REFERENCE) -> str:
    """The ablation table: one line per arm, losses as mean ± std over seeds."""
    head = ["strategy", "val loss before growth", "right after growth", "end of run",
            f"end − {reference} (paired)", "exact", "growth s", "seeds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for r in rows:
        seeds = str(r["n"]) + (f" ({len(r['failed'])} failed)" if r["failed"] else "")
        lines.append("| " + " | ".join([
            f"`{r['strategy']}`", fmt_ms(r["val_loss_before"]), fmt_ms(r["val_loss_after"]), fmt_ms(r["val_loss_end"]),
            "-" if r["strategy"] == reference else fmt_ms(r["end_minus_ref"], signed=True),
            r["exact"], fmt_ms(r["growth_s"], digits=2), seeds,
        ]) + " |")
    return "\n".join(lines) + "\n"


def findings(rows: Sequence[dict], reference: str = REFERENCE) -> list[str]:
    """Plain statements computed from the numbers (no interpretation beyond them)."""
    ok = [r for r in rows if r["val_loss_end"]["mean"] is not None]
    if not ok:
        return ["No arm finished."]
    out = []
    best = min(ok, key=lambda r: r["val_loss_end"]["mean"])
    worst = max(ok, key=lambda r: r["val_loss_end"]["mean"])
    out.append(f"Lowest end-of-run loss: `{best['strategy']}` ({fmt_ms(best['val_loss_end'])}); highest: "
               f"`{worst['strategy']}` ({fmt_ms(worst['val_loss_end'])}), a spread of "
               f"{worst['val_loss_end']['mean'] - best['val_loss_end']['mean']:.3f} nats.")
    clear = [r for r in ok if r["strategy"] != reference and r["end_minus_ref"]["n"] > 1
             and abs(r["end_minus_ref"]["mean"]) > 2 * r["end_minus_ref"]["std"]]
    if any(r["strategy"] == reference for r in ok):
        if all(r["end_minus_ref"]["n"] <= 1 for r in ok if r["strategy"] != reference):
            out.append("With one seed there is no seed spread to judge the differences against.")
        elif clear:
            parts = [f"`{r['strategy']}` ({r['end_minus_ref']['mean']:+.3f})" for r in clear]
            out.append(f"Paired with `{reference}` in the same seed, the end-of-run difference is larger than twice "
                       f"its std over seeds (a rough criterion, not a significance test) for {', '.join(parts)}; "
                       f"the other arms are within that noise of it.")
        else:
            out.append(f"Paired with `{reference}` in the same seed, no arm's end-of-run difference exceeds twice its "
                       f"seed std.")
    jumps = [r for r in ok if r["growth_jump"]["mean"] is not None and abs(r["growth_jump"]["mean"]) > 1e-3]
    if jumps:
        parts = [f"`{r['strategy']}` ({r['growth_jump']['mean']:+.3f})" for r in sorted(jumps, key=lambda r: -abs(r['growth_jump']['mean']))]
        out.append(f"The growth itself moved the validation loss by more than 0.001 nats for {', '.join(parts)}; "
                   f"every other arm left it unchanged to that precision.")
    vt = {r["strategy"]: r for r in ok}
    if "variance_transfer" in vt and "variance_transfer_lr" in vt:
        a, b = vt["variance_transfer"]["val_loss_end"], vt["variance_transfer_lr"]["val_loss_end"]
        out.append(f"LR adaptation (norm_ratio) {'lowered' if b['mean'] < a['mean'] else 'raised'} variance_transfer's "
                   f"end-of-run loss from {a['mean']:.3f} to {b['mean']:.3f}.")
    return out


# ---------------------------------------------------------------------- machine
def machine_line(m: dict) -> str:
    s = f"{m['cpu'] or 'unknown CPU'}, {m['cpus']} cores, {m['torch_threads']} torch thread(s), torch {m['torch']}"
    s += f", GPU {m['gpu']}" if m.get("gpu") else ""
    return s + (f" ({m['note']})" if m.get("note") else "")


# ---------------------------------------------------------------------- driving the engine
def _train(cfg: Any, log_path: Path, quiet: bool = True, **kw: Any) -> dict:
    """``progtrain.train.train``; with ``quiet`` its end-of-run printout and per-step progress bar go to
    ``log_path`` instead of the terminal (logging handlers keep the terminal)."""
    from progtrain.train import train

    if not quiet:
        return train(cfg, **kw)
    with open(log_path, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        return train(cfg, **kw)


def train_small(base: dict, seed: int, steps_before: int, steps_after: int, work: Path, quiet: bool = True) -> dict:
    """Train seed ``seed``'s small model to the growth step into ``work/seed<k>/small`` (a fresh
    ``work/seed<k>``); returns its wall seconds and evaluation curve ``[(step, val_loss)]``."""
    from progtrain.train.config import from_dict

    root = work / f"seed{seed}"
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    small = root / "small"
    t0 = time.perf_counter()
    _train(from_dict(run_dict(base, seed, steps_before, steps_after, small, None)), root / "small.log", quiet,
           stop_at_step=steps_before)
    rows = read_rows(small / "metrics.jsonl")
    return {"wall_s": round(time.perf_counter() - t0, 1), "curve": [
        (int(r["step"]), float(r["val_loss"])) for r in rows if r.get("event") == "eval" and r.get("val_loss") is not None]}


def run_seed(base: dict, seed: int, arms: Sequence[Arm], steps_before: int, steps_after: int, work: Path,
             bar: Any = None, quiet: bool = True) -> tuple[dict[str, dict], dict]:
    """Train the small model once, then grow and continue a copy of it with every arm. Returns
    ``{arm: result}`` (``{"error": ...}`` for an arm that raised) and the small run's info."""
    from progtrain.train.config import from_dict

    small_info = train_small(base, seed, steps_before, steps_after, work, quiet)
    root = work / f"seed{seed}"
    small = root / "small"
    logger.info("seed %d: small model trained to step %d in %.1f s", seed, steps_before, small_info["wall_s"])
    out: dict[str, dict] = {}
    max_steps = steps_before + steps_after
    for arm in arms:
        run = root / arm.name
        shutil.copytree(small, run)
        t1 = time.perf_counter()
        try:
            # the arm branches off the small model's checkpoint with its own stage: a deliberate config change
            _train(from_dict(run_dict(base, seed, steps_before, steps_after, run, arm)), root / f"{arm.name}.log", quiet,
                   resume=True, allow_config_change=True)
            hist_file = run / "final" / "progtrain_growth.json"
            hist = json.loads(hist_file.read_text()) if hist_file.exists() else []
            hist = hist.get("history", hist) if isinstance(hist, dict) else hist
            r = arm_result(read_rows(run / "metrics.jsonl"), max_steps, hist[-1] if hist else None)
        except Exception as e:  # an arm that fails is reported, not hidden
            logger.exception("seed %d, %s failed", seed, arm.name)
            r = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
        r["run_wall_s"] = round(time.perf_counter() - t1, 1)
        out[arm.name] = r
        if "error" not in r:
            logger.info("seed %d %-21s before %.4f after %.4f end %.4f exact %s growth %.2f s (run %.0f s)", seed,
                        arm.name, r["val_loss_before"], r["val_loss_after"], r["val_loss_end"], r["exact"],
                        r["growth_s"] or float("nan"), r["run_wall_s"])
        if bar is not None:
            bar.update(1)
    befores = {round(r["val_loss_before"], 9) for r in out.values() if "error" not in r}
    small_info["same_start"] = len(befores) <= 1
    if not small_info["same_start"]:
        logger.warning("seed %d: the arms' pre-growth losses differ (%s): they did not start from the same model",
                       seed, sorted(befores))
    return out, small_info


# ---------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="run config with one growth stage (default: %(default)s)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default: 0 1 2)")
    p.add_argument("--steps-before", type=int, default=150, help="optimizer steps before the growth (default: 150)")
    p.add_argument("--steps-after", type=int, default=150, help="optimizer steps after the growth (default: 150)")
    p.add_argument("--strategies", nargs="+", choices=list(ARMS), default=list(ARMS), metavar="ARM",
                   help=f"arms to run (default: all): {', '.join(ARMS)}")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override the run config (all arms)")
    p.add_argument("--threads", type=int, help="torch threads (default: 1)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 1 seed, 30 + 30 steps, 2 eval batches, 5 GradInit iterations")
    p.add_argument("--out", help="report directory (default: benchmarks/results; with --quick: <work-dir>/quick)")
    p.add_argument("--work-dir", default="runs/ablation", help="training runs (default: runs/ablation)")
    p.add_argument("--machine-note", help="free text on the machine's conditions for the report (e.g. other load)")
    p.add_argument("--render", action="store_true",
                   help="no training: rewrite <out>/ablation.md (and the JSON's summary) from <out>/ablation.json")
    p.add_argument("-v", "--verbose", action="store_true", help="show progtrain's own logs and progress bars")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    import torch
    import yaml
    from tqdm.auto import tqdm

    from progtrain.train.config import apply_overrides

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if not args.verbose:
        for name in ("progtrain", "transformers", "accelerate", "datasets", "DeepSpeed", "deepspeed"):
            logging.getLogger(name).setLevel(logging.WARNING)
    if args.render:
        return render(Path(args.out) if args.out else HERE / "results", args.machine_note)
    threads = args.threads or 1
    torch.set_num_threads(threads)
    overrides = list(args.set)
    if args.quick:
        args.seeds, args.steps_before, args.steps_after = args.seeds[:1], 30, 30
        overrides += ["train.eval_batches=2", "optim.warmup_steps=10", "train.eval_interval=10"]
    if args.steps_before < 1 or args.steps_after < 1:
        raise SystemExit("--steps-before and --steps-after must be positive")
    out = Path(args.out) if args.out else (Path(args.work_dir) / "quick" if args.quick else HERE / "results")
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work_dir)
    base = apply_overrides(yaml.safe_load(Path(args.config).read_text()), overrides)
    arms = [ARMS[n] for n in args.strategies]
    if args.quick:  # a smoke test of the plumbing, not of GradInit's optimisation
        arms = [replace(a, init_kwargs={**a.init_kwargs, "iters": 5}) if a.init == "gradinit" else a for a in arms]
    command = " ".join(["OMP_NUM_THREADS=1" if os.environ.get("OMP_NUM_THREADS") == "1" else "",
                        "python benchmarks/ablation.py", *map(shlex.quote, argv)]).strip()
    logger.info("%d seed(s) x %d arm(s), %d + %d steps; runs in %s", len(args.seeds), len(arms), args.steps_before,
                args.steps_after, work)

    t0 = time.perf_counter()
    per_seed: dict[str, dict[int, dict]] = {a.name: {} for a in arms}
    small: dict[int, dict] = {}
    with tqdm(total=len(args.seeds) * len(arms), desc="ablation runs", dynamic_ncols=True) as bar:
        for seed in args.seeds:
            res, small[seed] = run_seed(base, seed, arms, args.steps_before, args.steps_after, work, bar,
                                        quiet=not args.verbose)
            for name, r in res.items():
                per_seed[name][seed] = r
    wall = round(time.perf_counter() - t0, 1)

    rows = aggregate(per_seed)
    table = markdown_table(rows)
    machine = machine_info(threads)
    if args.machine_note:
        machine["note"] = args.machine_note
    date = dt.datetime.now().isoformat(timespec="seconds")
    cfg = base
    settings = {
        "config": str(Path(args.config)), "overrides": overrides, "seeds": list(args.seeds),
        "steps_before": args.steps_before, "steps_after": args.steps_after, "quick": args.quick,
        "batch_size": cfg["train"]["batch_size"], "seq_len": cfg["data"]["seq_len"], "lr": cfg["optim"]["lr"],
        "schedule": cfg["optim"]["schedule"], "warmup_steps": cfg["optim"]["warmup_steps"],
        "eval_batches": cfg["train"]["eval_batches"], "model": cfg["model"], "grow": cfg["stages"][0]["grow"],
    }
    report = {
        "date": date, "command": command, "machine": machine, "benchmark_wall_s": wall, "settings": settings,
        "arms": {a.name: asdict(a) for a in arms}, "small_runs": small,
        "summary": rows, "per_seed": {k: {str(s): r for s, r in v.items()} for k, v in per_seed.items()},
        "findings": findings(rows),
    }
    md = markdown_section(report, table)
    write_report(out, "ablation", md, report)
    sys.stdout.write("\n" + md + f"\nreport in {out} (benchmark wall time {wall} s)\n")
    return report


def render(out: Path, machine_note: str | None = None) -> dict:
    """Rebuild the summary, findings and ``ablation.md`` from the per-seed numbers in
    ``out/ablation.json`` (after a change to the report code; no training)."""
    report = json.loads((out / "ablation.json").read_text())
    per_seed = {k: {int(s): r for s, r in v.items()} for k, v in report["per_seed"].items()}
    if machine_note is not None:
        report["machine"]["note"] = machine_note
    report["summary"] = aggregate(per_seed)
    report["findings"] = findings(report["summary"])
    report["rendered"] = {"date": dt.datetime.now().isoformat(timespec="seconds"),
                          "command": " ".join(["python benchmarks/ablation.py", *map(shlex.quote, sys.argv[1:])])}
    md = markdown_section(report, markdown_table(report["summary"]))
    write_report(out, "ablation", md, report)
    sys.stdout.write(md)
    return report


def _note(arm: dict) -> str:
    """An arm's note with its ``{iters}`` placeholder filled from its init_kwargs."""
    return arm["note"].replace("{iters}", str(arm["init_kwargs"].get("iters", "")))


def markdown_section(report: dict, table: str) -> str:
    """The README section: heading, setup, command, date, machine, table, notes and findings."""
    s, m = report["settings"], report["machine"]
    g = s["grow"]
    mc = s["model"]["config"]
    n_eval = s["eval_batches"] * s["batch_size"]
    setup = (
        f"A tiny GPT-2 (width {mc.get('n_embd')}, {mc.get('n_head')} heads, FFN {4 * int(mc.get('n_embd', 0))}, "
        f"{mc.get('n_layer')} layers) is trained on the embedded Shakespeare plays for {s['steps_before']} steps "
        f"(batch {s['batch_size']} x {s['seq_len']} tokens, AdamW, LR {s['lr']:g}, {s['warmup_steps']}-step warm-up, "
        f"{s['schedule']} decay over the whole run), once per seed; each strategy then grows a copy of that same "
        f"checkpoint to width {g.get('hidden_size')}, {g.get('num_heads')} heads, FFN {g.get('intermediate_size')} "
        f"and trains {s['steps_after']} more steps with the same data order and schedule. Validation loss is nats "
        f"per token on the same {n_eval} held-out sequences, mean ± sample std over seeds {', '.join(map(str, s['seeds']))}; "
        f"\"end − {REFERENCE}\" is the per-seed paired difference. \"exact\": whether the grown model computed the "
        f"same function, measured: max |Δlogits| / max |logits| within 1e-5 on random tokens (2x16 and 1x64), as "
        f"the engine measures it at each growth (else that largest relative deviation); \"growth s\": wall seconds of the growth "
        f"(gather, init strategy, optimizer surgery, rebuild; the two evaluations excluded)."
    )
    notes = "\n".join(f"- `{name}`: {_note(a)}" for name, a in report["arms"].items())
    errors = [f"- `{r['strategy']}` failed in seed(s) {r['failed']}: {'; '.join(r['errors'])}" for r in report["summary"] if r["failed"]]
    parts = [
        "### Ablation: init strategies\n",
        setup + "\n",
        "```bash\n" + report["command"] + "\n```\n",
        f"Date: {report['date'][:10]}. Machine: {machine_line(m)}; whole benchmark {report['benchmark_wall_s'] / 60:.1f} min.\n",
        table,
        "Strategies:\n\n" + notes + "\n",
    ]
    if errors:
        parts.append("Failures:\n\n" + "\n".join(errors) + "\n")
    parts.append(" ".join(report["findings"]) + "\n")
    return "\n".join(parts)


if __name__ == "__main__":
    main()
