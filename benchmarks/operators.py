"""Operator league table: grow one trained small model with every growth operator and compare.

The design of ``benchmarks/ablation.py`` (whose run-reading and report helpers this script reuses):
for each seed the small model of ``benchmarks/configs/operators.yaml`` (``run``: a tiny GPT-2 on the
embedded Shakespeare plays) is trained ONCE for ``steps_before`` optimizer steps and checkpointed;
every arm then resumes a copy of that run directory with its own growth stage (init strategy, depth
operator, stage options; all arms reach the same sizes at the same step) and trains ``steps_after``
more steps. Every arm thus starts from the same small model, optimizer moments, RNG state, data
order and LR schedule. The arms are data (``arms:`` in the config: name, the paper the arm stands
for, the stage keys it changes, notes).

Columns: validation loss right before and right after the growth (same held-out batches), final
loss, the paired per-seed difference of final losses to ``function_preserving`` (mean ± sample std
over seeds), whether the growth was exact (measured by the engine: max |Δlogits| / max |logits| ≤
1e-5), the growth's wall seconds, and the paper. An arm whose stage option this progtrain's config
validation does not know (``mask_steps``, ``moments`` before that branch is merged) is reported as
"option not available" and skipped; an arm that raises is reported as failed; neither stops the rest.

    OMP_NUM_THREADS=1 python benchmarks/operators.py                 # the league table (~30-35 min, idle 2-core CPU)
    OMP_NUM_THREADS=1 python benchmarks/operators.py --quick --arms function_preserving random   # smoke test
    python benchmarks/operators.py --seeds 3 4 5 --arms function_preserving depth_stack --jobs 1

Writes ``<out>/operators.json`` (key ``arms``: one object per arm with ``name``, ``paper``, ``seeds``,
``final_val_loss`` ...; plus settings, machine, date, command, per-seed numbers) and
``<out>/operators.md``; training runs go to ``--work-dir``.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import logging
import os
import shlex
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Sequence

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import ablation  # noqa: E402  (the shared harness: reading runs, aggregation, table helpers)
from progtrain.benchmark import machine_info, write_report  # noqa: E402

DEFAULT_CONFIG = HERE / "configs" / "operators.yaml"
UNAVAILABLE = "option not available"
logger = logging.getLogger("operators")


class ConfigError(ValueError):
    """The league config is invalid (the CLI prints it as one line and exits 2)."""


# ---------------------------------------------------------------------- the config
def load_config(path: str | Path) -> dict:
    """Read and check the league config: ``run`` (a run config with exactly one stage), ``arms``
    (a list of mappings with unique ``name``, a ``paper``, and optional ``stage``, ``extra_growths``,
    ``quick_stage``, ``cost``, ``notes``) and ``defaults``. Raises :class:`ConfigError`."""
    import yaml

    path = Path(path)
    try:
        d = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read the league config {path}: {e}") from None
    if not isinstance(d, dict) or not isinstance(d.get("run"), dict) or not isinstance(d.get("arms"), list):
        raise ConfigError(f"{path}: the league config needs a 'run' mapping and an 'arms' list")
    if len(d["run"].get("stages") or []) != 1:
        raise ConfigError(f"{path}: run.stages must hold exactly one growth stage (the common growth)")
    allowed = {"name", "paper", "stage", "extra_growths", "quick_stage", "cost", "notes"}
    names = set()
    for i, a in enumerate(d["arms"]):
        if not isinstance(a, dict) or not a.get("name") or not a.get("paper"):
            raise ConfigError(f"{path}: arms[{i}] needs a 'name' and a 'paper'")
        bad = sorted(set(a) - allowed)
        if bad:
            raise ConfigError(f"{path}: arms[{i}] ({a['name']}): unknown key(s) {bad}; valid: {', '.join(sorted(allowed))}")
        if a["name"] in names:
            raise ConfigError(f"{path}: arm name {a['name']!r} appears twice")
        names.add(a["name"])
        for j, g in enumerate(a.get("extra_growths") or []):
            if not isinstance(g, dict) or not isinstance(g.get("after"), int) or g["after"] < 1:
                raise ConfigError(f"{path}: arms[{i}] ({a['name']}).extra_growths[{j}] needs 'after': a positive "
                                  f"number of steps past the common growth step")
    d.setdefault("defaults", {})
    return d


def _merge_stage(stage: dict, over: dict | None) -> dict:
    """``stage`` with the keys of ``over`` set (``grow`` and ``init_kwargs`` merged key by key)."""
    out = copy.deepcopy(stage)
    for k, v in (over or {}).items():
        if k in ("grow", "init_kwargs") and isinstance(v, dict):
            out[k] = {**(out.get(k) or {}), **copy.deepcopy(v)}
        else:
            out[k] = copy.deepcopy(v)
    return out


def run_dict(base: dict, seed: int, steps_before: int, steps_after: int, out: Path, arm: dict | None,
             quick: bool = False) -> dict:
    """The run config dict of one arm (``arm=None``: the shared small-model run, which stops at the
    growth step so its stage is never used). The arm's ``stage`` is merged into the common stage;
    each ``extra_growths`` entry becomes a later stage at ``steps_before + after``, with the arm's
    stage settings and its own ``grow``."""
    d = copy.deepcopy(base)
    d["seed"] = int(seed)
    d["output_dir"] = str(out)
    d.pop("push_to_hub", None)
    d["train"]["max_steps"] = int(steps_before + steps_after)
    st = d["stages"][0]
    st["start_step"] = int(steps_before)
    st.pop("start_tokens", None)
    if arm is None:
        return d
    st = _merge_stage(st, arm.get("stage"))
    if quick:
        st = _merge_stage(st, arm.get("quick_stage"))
    stages = [st]
    for i, g in enumerate(arm.get("extra_growths") or []):
        nxt = _merge_stage({k: v for k, v in st.items() if k != "grow"}, {k: v for k, v in g.items() if k != "after"})
        nxt["name"] = f"{st.get('name', 'grow')}_{i + 2}"
        nxt["start_step"] = int(steps_before + g["after"])
        stages.append(nxt)
    d["stages"] = stages
    return d


def final_sizes(d: dict) -> dict:
    """The sizes (hidden, heads, ffn, layers ...) of a run config dict's last stage."""
    from progtrain.arch import get_adapter
    from progtrain.train.config import from_dict
    from progtrain.train.flops import stage_configs

    last = stage_configs(from_dict(copy.deepcopy(d)))[-1]
    return get_adapter(last).read_sizes(last).as_dict()


def check_arm(base: dict, arm: dict, steps_before: int, steps_after: int, quick: bool = False) -> str | None:
    """Validate an arm's run config without training. Returns None when it is runnable, or the
    reason it is not available when the config validation rejects one of the arm's own stage
    options (a key this progtrain's ``StageConfig`` does not have). Raises :class:`ConfigError` for
    any other invalid arm (a wrong size, an unknown strategy ...) and when the arm's final sizes
    differ from the common growth's."""
    import dataclasses

    from progtrain.errors import ProgtrainConfigError
    from progtrain.train.config import StageConfig, from_dict

    d = run_dict(base, 0, steps_before, steps_after, Path("unused"), arm, quick)
    known = {f.name for f in dataclasses.fields(StageConfig)}
    own = set(arm.get("stage") or {}) | {k for g in arm.get("extra_growths") or [] for k in g if k != "after"}
    missing = sorted(own - known)
    try:
        from_dict(copy.deepcopy(d))
    except ProgtrainConfigError as e:
        if missing:
            return f"{UNAVAILABLE}: stage option(s) {', '.join(missing)} rejected by this progtrain's config validation ({str(e).split(';')[0]})"
        raise ConfigError(f"arm {arm['name']}: {str(e).splitlines()[0]}") from None
    want = final_sizes(run_dict(base, 0, steps_before, steps_after, Path("unused"), None))
    got = final_sizes(d)
    if got != want:
        raise ConfigError(f"arm {arm['name']} ends at sizes {got}, not the common growth's {want}: every arm must "
                          f"grow to the same sizes")
    return None


# ---------------------------------------------------------------------- running (one process per job)
def _setup_worker(verbose: bool, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if not verbose:
        for name in ("progtrain", "transformers", "accelerate", "datasets", "DeepSpeed", "deepspeed"):
            logging.getLogger(name).setLevel(logging.WARNING)


def train_small(base: dict, seed: int, steps_before: int, steps_after: int, work: Path, quiet: bool = True) -> dict:
    """:func:`ablation.train_small` (a module-level name here, so worker processes can call it by name)."""
    return ablation.train_small(base, seed, steps_before, steps_after, work, quiet)


def run_arm(base: dict, seed: int, arm: dict, steps_before: int, steps_after: int, work: Path, quick: bool = False,
            quiet: bool = True) -> dict:
    """Grow and continue a copy of seed ``seed``'s small run with ``arm``; returns
    :func:`ablation.arm_result` plus ``run_wall_s``, or ``{"error": ...}`` when the arm raised."""
    from progtrain.train.config import from_dict

    root = work / f"seed{seed}"
    run = root / arm["name"]
    if run.exists():
        shutil.rmtree(run)
    shutil.copytree(root / "small", run)
    t1 = time.perf_counter()
    try:
        d = run_dict(base, seed, steps_before, steps_after, run, arm, quick)
        # the arm branches off the small model's checkpoint with its own stage: a deliberate config change
        ablation._train(from_dict(d), root / f"{arm['name']}.log", quiet, resume=True, allow_config_change=True)
        hist_file = run / "final" / "progtrain_growth.json"
        hist = json.loads(hist_file.read_text()) if hist_file.exists() else []
        hist = hist.get("history", hist) if isinstance(hist, dict) else hist
        r = ablation.arm_result(ablation.read_rows(run / "metrics.jsonl"), d["train"]["max_steps"], hist[-1] if hist else None)
    except Exception as e:  # an arm that fails is reported, not hidden
        logger.exception("seed %d, %s failed", seed, arm["name"])
        r = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    r["run_wall_s"] = round(time.perf_counter() - t1, 1)
    return r


def _call(fn_name: str, kwargs: dict, verbose: bool, threads: int) -> Any:
    """Run ``fn_name(**kwargs)`` in a pool worker."""
    _setup_worker(verbose, threads)
    return globals()[fn_name](**kwargs)


def run_all(base: dict, arms: Sequence[dict], seeds: Sequence[int], steps_before: int, steps_after: int, work: Path,
            jobs: int, quick: bool, verbose: bool, threads: int) -> tuple[dict[str, dict[int, dict]], dict[int, dict]]:
    """Small runs for every seed, then every (seed, arm) run, on ``jobs`` processes (1: in this one).
    Returns ``({arm: {seed: result}}, {seed: small-run info})``."""
    per_seed: dict[str, dict[int, dict]] = {a["name"]: {} for a in arms}
    small: dict[int, dict] = {}
    common = dict(base=base, steps_before=steps_before, steps_after=steps_after, work=work)
    small_tasks = [("train_small", dict(common, seed=s, quiet=not verbose), s) for s in seeds]
    # longest arms first, so the last job to finish is a short one
    order = sorted(arms, key=lambda a: -float(a.get("cost", 1)))
    arm_tasks = [("run_arm", dict(common, seed=s, arm=a, quick=quick, quiet=not verbose), (s, a["name"]))
                 for a in order for s in seeds]

    def record(kind: str, key: Any, res: dict) -> None:
        if kind == "train_small":
            small[key] = res
            logger.info("seed %d: small model trained to step %d in %.1f s", key, steps_before, res["wall_s"])
            return
        s, name = key
        per_seed[name][s] = res
        if "error" in res:
            logger.info("seed %d %-22s FAILED: %s", s, name, res["error"])
        else:
            logger.info("seed %d %-22s before %.4f after %.4f end %.4f exact %s growth %.2f s (run %.0f s)", s, name,
                        res["val_loss_before"], res["val_loss_after"], res["val_loss_end"], res["exact"],
                        res["growth_s"] or float("nan"), res["run_wall_s"])

    if jobs <= 1:
        for tasks in (small_tasks, arm_tasks):
            for fn, kw, key in tasks:
                record(fn, key, globals()[fn](**kw))
        return per_seed, small
    import multiprocessing as mp

    with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
        for tasks in (small_tasks, arm_tasks):
            futs = {pool.submit(_call, fn, kw, verbose, threads): (fn, key) for fn, kw, key in tasks}
            for f in as_completed(futs):
                fn, key = futs[f]
                record(fn, key, f.result())
    return per_seed, small


# ---------------------------------------------------------------------- report
def league_rows(arms: Sequence[dict], per_seed: dict[str, dict[int, dict]], unavailable: dict[str, str],
                reference: str) -> list[dict]:
    """One object per arm, in config order: ``name``, ``paper``, ``status`` (``ok``, ``failed``,
    ``option not available``), ``seeds`` (the seeds that finished), ``final_val_loss`` (mean) and
    ``final_val_loss_std``, ``val_loss_before`` / ``val_loss_after`` / ``growth_jump`` /
    ``final_minus_reference`` / ``growth_s`` (``{mean, std, n}``), ``exact`` (label), ``failed`` and
    ``errors``, ``reason`` (when not available) and ``notes``."""
    agg = {r["strategy"]: r for r in ablation.aggregate({k: v for k, v in per_seed.items() if k not in unavailable},
                                                        reference=reference)}
    out = []
    for a in arms:
        name = a["name"]
        row: dict[str, Any] = {"name": name, "paper": a["paper"], "notes": " ".join(str(a.get("notes", "")).split())}
        if name in unavailable:
            row.update(status=UNAVAILABLE, reason=unavailable[name], seeds=[], final_val_loss=None,
                       final_val_loss_std=None, exact="-")
            out.append(row)
            continue
        g = agg[name]
        ok_seeds = sorted(s for s, r in per_seed.get(name, {}).items() if "error" not in r)
        row.update(
            status="ok" if ok_seeds and not g["failed"] else ("failed" if not ok_seeds else "ok (some seeds failed)"),
            seeds=ok_seeds, final_val_loss=g["val_loss_end"]["mean"], final_val_loss_std=g["val_loss_end"]["std"],
            val_loss_before=g["val_loss_before"], val_loss_after=g["val_loss_after"], growth_jump=g["growth_jump"],
            final_minus_reference=g["end_minus_ref"], exact=g["exact"], growth_s=g["growth_s"],
            failed=g["failed"], errors=g["errors"],
            n_growths=max((r.get("n_growths", 1) for r in per_seed[name].values() if "error" not in r), default=None),
        )
        out.append(row)
    return out


def markdown_table(rows: Sequence[dict], reference: str) -> str:
    """The league table, one line per arm (ranked by final loss; unavailable/failed arms last)."""
    fm = ablation.fmt_ms
    head = ["arm", "paper", "val loss before growth", "right after growth", "final", f"final − {reference} (paired)",
            "exact", "growth s", "seeds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---", "---"] + ["---:"] * (len(head) - 2)) + "|"]
    ranked = sorted(rows, key=lambda r: (r["final_val_loss"] is None, r["final_val_loss"] or 0.0))
    for r in ranked:
        if r["status"] == UNAVAILABLE or not r["seeds"]:
            what = UNAVAILABLE if r["status"] == UNAVAILABLE else "failed: " + "; ".join(r.get("errors") or [])
            lines.append("| " + " | ".join([f"`{r['name']}`", r["paper"], what] + ["-"] * (len(head) - 4) + ["0"]) + " |")
            continue
        seeds = str(len(r["seeds"])) + (f" ({len(r['failed'])} failed)" if r.get("failed") else "")
        lines.append("| " + " | ".join([
            f"`{r['name']}`", r["paper"], fm(r["val_loss_before"]), fm(r["val_loss_after"]),
            fm({"mean": r["final_val_loss"], "std": r["final_val_loss_std"]}),
            "-" if r["name"] == reference else fm(r["final_minus_reference"], signed=True),
            r["exact"], fm(r["growth_s"], digits=2), seeds,
        ]) + " |")
    return "\n".join(lines) + "\n"


def findings(rows: Sequence[dict], reference: str) -> list[str]:
    """Plain statements computed from the numbers (ablation's, plus which arms could not run)."""
    ok = [dict(r, strategy=r["name"], val_loss_end={"mean": r["final_val_loss"], "std": r["final_val_loss_std"]},
               end_minus_ref=r["final_minus_reference"])
          for r in rows if r["status"] != UNAVAILABLE and r["seeds"]]
    out = ablation.findings(ok, reference=reference)
    na = [r["name"] for r in rows if r["status"] == UNAVAILABLE]
    if na:
        out.append(f"Not run ({UNAVAILABLE} in this progtrain): {', '.join(f'`{n}`' for n in na)}.")
    return out


def markdown_section(report: dict) -> str:
    """The README section: heading, setup, command, date, machine, table, arm notes, findings."""
    s, m = report["settings"], report["machine"]
    g = s["grow"]
    mc = s["model"]["config"]
    ref = s["reference"]
    setup = (
        f"A tiny GPT-2 (width {mc.get('n_embd')}, {mc.get('n_head')} heads, FFN {4 * int(mc.get('n_embd', 0))}, "
        f"{mc.get('n_layer')} layers) is trained on the embedded Shakespeare plays for {s['steps_before']} steps "
        f"(batch {s['batch_size']} x {s['seq_len']} tokens, AdamW, LR {s['lr']:g}, {s['warmup_steps']}-step warm-up, "
        f"{s['schedule']} decay over the whole run), once per seed; every arm grows a copy of that checkpoint at the "
        f"same step to width {g.get('hidden_size')}, {g.get('num_heads')} heads, FFN {g.get('intermediate_size')}, "
        f"{g.get('num_layers')} layers and trains {s['steps_after']} more steps with the same data order and schedule. "
        f"Validation loss: nats per token on the same {s['eval_batches'] * s['batch_size']} held-out sequences, mean ± "
        f"sample std over seeds {', '.join(map(str, s['seeds']))}; \"final − {ref}\" is the per-seed paired "
        f"difference. \"exact\": the engine's measurement at the growth (max |Δlogits| / max |logits| within 1e-5, "
        f"else the largest deviation); \"growth s\": wall seconds of the growth (gather, init strategy, optimizer "
        f"surgery, rebuild; evaluations excluded). Ranked by final loss."
    )
    notes = "\n".join(f"- `{r['name']}` ({r['paper']}): {r['notes']}" + (f" **{r['reason']}**" if r.get("reason") else "")
                      for r in report["arms"])
    parts = [
        "### Operator league table\n",
        setup + "\n",
        "```bash\n" + report["command"] + "\n```\n",
        f"Date: {report['date'][:10]}. Machine: {ablation.machine_line(m)}, {s['jobs']} job(s) in parallel; "
        f"whole benchmark {report['benchmark_wall_s'] / 60:.1f} min.\n",
        markdown_table(report["arms"], ref),
        "Arms:\n\n" + notes + "\n",
        " ".join(report["findings"]) + "\n",
    ]
    return "\n".join(parts)


# ---------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="league config (default: %(default)s)")
    p.add_argument("--seeds", type=int, nargs="+", help="seeds (default: the config's, 0 1 2)")
    p.add_argument("--steps-before", type=int, help="optimizer steps before the growth (default: the config's, 150)")
    p.add_argument("--steps-after", type=int, help="optimizer steps after the growth (default: the config's, 150)")
    p.add_argument("--arms", nargs="+", metavar="ARM", help="arms to run (default: all of the config's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override the run config (all arms)")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                   help="runs in parallel, one process each (default: min(2, cores) = %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per job (default: 1)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 1 seed, 20 + 40 steps, 2 eval batches, each arm's quick_stage (GradInit 5 iterations)")
    p.add_argument("--out", help="report directory (default: benchmarks/results; with --quick: <work-dir>/quick)")
    p.add_argument("--work-dir", default="runs/operators", help="training runs (default: runs/operators)")
    p.add_argument("--machine-note", help="free text on the machine's conditions for the report (e.g. other load)")
    p.add_argument("-v", "--verbose", action="store_true", help="show progtrain's own logs and progress bars")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    try:
        return _main(args, argv)
    except ConfigError as e:
        sys.stderr.write(f"error: {e}\n")
        raise SystemExit(2) from None


def _main(args: argparse.Namespace, argv: list[str]) -> dict:
    from progtrain.train.config import apply_overrides

    _setup_worker(args.verbose, args.threads)
    conf = load_config(args.config)
    dflt = conf["defaults"]
    reference = dflt.get("reference", "function_preserving")
    seeds = args.seeds or list(dflt.get("seeds", [0, 1, 2]))
    steps_before = args.steps_before or int(dflt.get("steps_before", 150))
    steps_after = args.steps_after or int(dflt.get("steps_after", 150))
    overrides = list(args.set)
    if args.quick:
        seeds, steps_before, steps_after = seeds[:1], 20, 40
        overrides += ["train.eval_batches=2", "optim.warmup_steps=5", "train.eval_interval=10"]
    if steps_before < 1 or steps_after < 1:
        raise ConfigError("--steps-before and --steps-after must be positive")
    if args.jobs < 1 or args.threads < 1:
        raise ConfigError("--jobs and --threads must be at least 1")
    by_name = {a["name"]: a for a in conf["arms"]}
    names = args.arms or list(by_name)
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ConfigError(f"unknown arm(s) {unknown}; the config's arms: {', '.join(by_name)}")
    arms = [by_name[n] for n in names]
    try:
        base = apply_overrides(conf["run"], overrides)
    except Exception as e:
        raise ConfigError(f"--set: {e}") from None
    late = [a["name"] for a in arms if any(g["after"] >= steps_after for g in a.get("extra_growths") or [])]
    if late:
        raise ConfigError(f"arm(s) {late} grow again past the end of the run: --steps-after must exceed their "
                          f"extra_growths' 'after'")
    unavailable = {}
    for a in arms:
        why = check_arm(base, a, steps_before, steps_after, args.quick)
        if why:
            unavailable[a["name"]] = why
            logger.warning("%s: %s", a["name"], why)
    runnable = [a for a in arms if a["name"] not in unavailable]
    out = Path(args.out) if args.out else (Path(args.work_dir) / "quick" if args.quick else HERE / "results")
    work = Path(args.work_dir)
    command = " ".join(["OMP_NUM_THREADS=1" if os.environ.get("OMP_NUM_THREADS") == "1" else "",
                        "python benchmarks/operators.py", *map(shlex.quote, argv)]).strip()
    logger.info("%d seed(s) x %d arm(s) (%d not available), %d + %d steps, %d job(s); runs in %s", len(seeds),
                len(runnable), len(unavailable), steps_before, steps_after, args.jobs, work)

    t0 = time.perf_counter()
    per_seed, small = run_all(base, runnable, seeds, steps_before, steps_after, work, args.jobs, args.quick,
                              args.verbose, args.threads)
    wall = round(time.perf_counter() - t0, 1)
    for s in seeds:
        befores = {round(per_seed[a["name"]][s]["val_loss_before"], 9) for a in runnable
                   if "error" not in per_seed[a["name"]].get(s, {"error": 1})}
        small[s]["same_start"] = len(befores) <= 1
        if len(befores) > 1:
            logger.warning("seed %d: the arms' pre-growth losses differ (%s)", s, sorted(befores))

    rows = league_rows(arms, per_seed, unavailable, reference)
    machine = machine_info(args.threads)
    if args.machine_note:
        machine["note"] = args.machine_note
    settings = {
        "config": str(Path(args.config)), "overrides": overrides, "seeds": list(seeds), "steps_before": steps_before,
        "steps_after": steps_after, "quick": args.quick, "jobs": args.jobs, "reference": reference,
        "batch_size": base["train"]["batch_size"], "seq_len": base["data"]["seq_len"], "lr": base["optim"]["lr"],
        "schedule": base["optim"]["schedule"], "warmup_steps": base["optim"]["warmup_steps"],
        "eval_batches": base["train"]["eval_batches"], "model": base["model"], "grow": base["stages"][0]["grow"],
    }
    report = {
        "date": dt.datetime.now().isoformat(timespec="seconds"), "command": command, "machine": machine,
        "benchmark_wall_s": wall, "settings": settings, "arms": rows, "small_runs": small,
        "per_seed": {k: {str(s): r for s, r in v.items()} for k, v in per_seed.items()},
        "arm_configs": {a["name"]: {k: v for k, v in a.items() if k != "notes"} for a in arms},
    }
    report["findings"] = findings(rows, reference)
    md = markdown_section(report)
    write_report(out, "operators", md, report)
    sys.stdout.write("\n" + md + f"\nreport in {out} (benchmark wall time {wall} s)\n")
    return report


if __name__ == "__main__":
    main()
