"""Progressive training against training the target size from scratch, side by side in one run.

For each seed, back to back on the same machine:

1. **scratch**: the progressive config's *final* model (same HF config) trained from step 0, with the
   same data order, optimizer, LR schedule family and total tokens, at its own best LR (from a sweep
   stored in ``benchmarks/results/lr_sweep_<preset>.json``; rerun it with ``--sweep-lr``);
2. **progressive**: the preset's growth schedule, which ends at that model.

3. **progressive, same FLOPs** (``--same-flops``, on by default): the same schedule stretched in steps
   (stage starts included) until it costs what the scratch run costs, i.e. more tokens for the same
   compute: the comparison progressive training is usually sold on.

Seeds: a schedule is tuned on some seeds and judged on others. The config declares the seeds its
stages and LRs were tuned on (``benchmark: {tuning_seeds: [...]}``, required; the scratch LR sweep
runs on the first of them); the headline runs on held-out seeds only: at least 3, none a tuning seed
(the script refuses otherwise; ``--tuning-run`` runs any seeds and reports them as a tuning run,
in ``<out>/tuning``; ``--indicative`` accepts 1 or 2 held-out seeds and marks the report indicative).
When any held-out seed misses L*, the headline is "not reached", naming the
seed and the miss in nats; the JSON has ``held_out_seeds``, ``tuning_seeds``, the per-seed rows
(``per_seed``), ``headline`` and ``tokens_per_param`` (training tokens per parameter of the final
model).

All runs go through progtrain's engine and log cumulative FLOPs, wall seconds, tokens and validation
loss (``metrics.jsonl``). The report (:mod:`progtrain.benchmark`) takes L* = scratch's final validation
loss and interpolates the FLOPs and wall seconds each run needed to first reach it.

The toolkit's own cost is measured too: a fixed-size run (the final model, no evaluation, no
checkpoints) through progtrain's loop against a plain Accelerate loop written here (same model, data,
optimizer and schedule), as the fraction of steps/s lost; and each growth event's wall time
(gather, grow, optimizer surgery, rebuild) as a fraction of the progressive run's wall time.

    OMP_NUM_THREADS=1 python benchmarks/progressive_vs_scratch.py                 # tiny GPT-2, CPU
    python benchmarks/progressive_vs_scratch.py --preset bert                     # tiny BERT (masked LM)
    python benchmarks/progressive_vs_scratch.py --preset gpu-small                # GPT-2-small size, 1 GPU
    OMP_NUM_THREADS=1 python benchmarks/progressive_vs_scratch.py --preset long   # tiny sizes, >= 10 tokens/param
    python benchmarks/progressive_vs_scratch.py --sweep-lr                        # re-sweep the scratch LR

Writes ``<out>/progressive_vs_scratch.json``, ``.md``, ``loss_vs_flops.png`` and ``loss_vs_wallclock.png``
(``<out>`` defaults to ``benchmarks/results`` for the default preset, ``benchmarks/results/<preset>``
otherwise); the training runs go to ``--work-dir``.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import logging
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch
import yaml

HERE = Path(__file__).resolve().parent
logger = logging.getLogger("progressive_vs_scratch")

# preset -> progressive run config (its final stage is the scratch model), the scratch LR sweep grid
# (chosen to bracket the scratch optimum: for tiny, 6e-3 already trains worse than 4e-3) and the
# length of the loop-overhead runs
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"config": HERE / "configs" / "gpt2_tiny.yaml", "sweep": (3e-3, 4e-3, 6e-3), "overhead_steps": 150},
    "bert": {"config": HERE / "configs" / "bert_tiny.yaml", "sweep": (5e-4, 1e-3, 2e-3), "overhead_steps": 150},
    "gpu-small": {"config": HERE / "configs" / "gpt2_small_gpu.yaml", "sweep": (3e-4, 6e-4, 1.2e-3),
                  "overhead_steps": 200},
    # the tiny sizes trained to >= 10 tokens per parameter of the final model (1.07M parameters)
    "long": {"config": HERE / "configs" / "gpt2_tiny_long.yaml", "sweep": (2e-3, 3e-3, 4e-3), "overhead_steps": 150},
}
SAME_FLOPS = "progressive_same_flops"


# ---------------------------------------------------------------------- configs
def split_benchmark_block(d: dict, path: str | Path) -> tuple[dict, dict]:
    """Take the benchmark's own ``benchmark:`` block out of a progressive run config dict: the seeds
    the schedule was tuned on (``tuning_seeds``, required: ``[]`` when none) and optionally the
    default ``held_out_seeds``. Returns (run config dict, protocol dict). Raises ValueError when the
    block or its ``tuning_seeds`` is missing or not a list of integers."""
    d = copy.deepcopy(d)
    b = d.pop("benchmark", None)
    if not isinstance(b, dict) or "tuning_seeds" not in b:
        raise ValueError(f"{path} declares no benchmark.tuning_seeds: add `benchmark: {{tuning_seeds: [...]}}` "
                         f"listing the seeds its schedule and LRs were tuned on ([] if none)")
    bad = sorted(set(b) - {"tuning_seeds", "held_out_seeds"})
    if bad:
        raise ValueError(f"{path}: unknown key(s) {bad} in benchmark; valid: held_out_seeds, tuning_seeds")
    for k in ("tuning_seeds", "held_out_seeds"):
        v = b.get(k)
        if v is not None and (not isinstance(v, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in v)):
            raise ValueError(f"{path}: benchmark.{k} must be a list of integer seeds, got {v!r}")
    return d, {"tuning_seeds": list(b["tuning_seeds"]), "held_out_seeds": b.get("held_out_seeds")}


def tokens_per_param(prog: dict) -> dict:
    """Training tokens of a run (the scratch run sees the same) per parameter of its final model:
    ``{"tokens", "final_params", "tokens_per_param"}`` (parameters counted as ``progtrain plan`` does)."""
    from progtrain.train.config import from_dict
    from progtrain.train.flops import plan

    total = next(r for r in plan(from_dict(copy.deepcopy(prog))) if r["stage"] == "total")
    return {"tokens": int(total["tokens"]), "final_params": int(total["params"]),
            "tokens_per_param": total["tokens"] / total["params"]}


def scratch_dict(prog: dict) -> dict:
    """The scratch run of a progressive run config dict: no stages, and a fresh model with the HF
    config of the progressive run's last stage (checked size for size)."""
    from progtrain.arch import get_adapter
    from progtrain.train.config import from_dict, initial_hf_config
    from progtrain.train.flops import stage_configs

    cfg = from_dict(copy.deepcopy(prog))
    final = stage_configs(cfg)[-1]
    keep = {k: v for k, v in final.to_diff_dict().items()
            if k not in ("architectures", "transformers_version", "model_type", "vocab_size", "_name_or_path",
                         "pad_token_id", "bos_token_id", "eos_token_id", "dtype", "torch_dtype")}
    d = copy.deepcopy(prog)
    d["stages"] = []
    d["model"]["config"] = keep
    sizes = get_adapter(final).read_sizes(final).as_dict()
    got = initial_hf_config(from_dict(copy.deepcopy(d)))
    got_sizes = get_adapter(got).read_sizes(got).as_dict()
    if got_sizes != sizes:
        raise RuntimeError(f"scratch model sizes {got_sizes} differ from the progressive final sizes {sizes}")
    return d


def compute_matched_dict(prog: dict) -> tuple[dict, float]:
    """The progressive run stretched to the scratch run's FLOPs: ``max_steps`` and every stage start
    multiplied by scratch FLOPs / progressive FLOPs (same stage fractions, same warm-up); returns the
    dict and the factor."""
    from progtrain.train.config import from_dict
    from progtrain.train.flops import plan

    rows = plan(from_dict(copy.deepcopy(prog)))
    total = next(r for r in rows if r["stage"] == "total")["flops"]
    scratch = next(r for r in rows if r["name"] == "final size only")["flops"]
    factor = scratch / total
    d = copy.deepcopy(prog)
    d["train"]["max_steps"] = round(prog["train"]["max_steps"] * factor)
    for st in d["stages"]:
        st["start_step"] = round(st["start_step"] * factor)
    return d, factor


def run_engine(d: dict, out: Path) -> Path:
    """Train the run config dict ``d`` into a fresh ``out``; returns its metrics.jsonl."""
    from progtrain.benchmark import train_run

    return train_run(d, out)


def run_all(runs: Sequence[tuple[int, str, dict]], work: Path, jobs: int,
            reuse: bool = False) -> dict[tuple[int, str], Path]:
    """Train every ``(seed, arm name, config dict)`` of ``runs`` into ``work/<arm>_s<seed>``: back to back
    in this process (``jobs`` 1, the default) or on ``jobs`` worker processes, each with
    ``torch.get_num_threads() // jobs`` threads (at least 1). Wall-clock ratios compare runs that ran under
    the same load only when the machine does nothing else: with ``jobs`` > 1 each run shares it with the
    others. ``reuse``: a run directory that already holds that very run, finished, is kept
    (:func:`progtrain.benchmark.finished_run`). Returns ``{(seed, name): metrics.jsonl}``."""
    from progtrain.benchmark import train_run

    if jobs <= 1:
        return {(seed, name): train_run(d, work / f"{name}_s{seed}", seed=seed, reuse=reuse) for seed, name, d in runs}
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    threads = max(1, torch.get_num_threads() // jobs)
    with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
        futs = {(seed, name): pool.submit(train_run, d, work / f"{name}_s{seed}", seed=seed, threads=threads,
                                          reuse=reuse) for seed, name, d in runs}
        return {k: f.result() for k, f in futs.items()}


# ---------------------------------------------------------------------- loop overhead
def _steps_per_s(metrics: Path, skip: int) -> float:
    """Optimizer steps per second between the first train log at or after ``skip`` steps and the end."""
    rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
    rows = [r for r in rows if r.get("event") == "train"]
    first = next(r for r in rows if r["step"] >= skip)
    last = rows[-1]
    return (last["step"] - first["step"]) / (last["wall_s"] - first["wall_s"])


def plain_accelerate_loop(d: dict, run_dir: Path, steps: int, skip: int) -> float:
    """The same model, data, optimizer, clipping and schedule in a minimal Accelerate loop; returns
    steps/s over steps ``skip .. steps`` (loss read every ``train.log_interval`` steps, as a user would)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from progtrain.train.config import from_dict
    from progtrain.train.data import prepare_data
    from progtrain.train.engine import build_initial_model, lr_factor

    cfg = from_dict(copy.deepcopy(d))
    data = prepare_data(cfg, run_dir)  # tokenizer saved by the progtrain run in run_dir
    set_seed(cfg.seed)
    acc = Accelerator(mixed_precision="bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no")
    model = build_initial_model(cfg, data.tokenizer)
    o = cfg.optim
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=o.lr, betas=tuple(o.betas), eps=o.eps)
    step = {"n": 0}
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: lr_factor(cfg, step["n"]))
    B = cfg.train.batch_size
    loader = torch.utils.data.DataLoader(data.train_stream(0, steps * B), batch_size=B, shuffle=False)
    model, opt, loader, sched = acc.prepare(model, opt, loader, sched)
    model.train()
    t_skip = None
    for batch in loader:
        loss = model(**batch).loss
        acc.backward(loss)
        acc.clip_grad_norm_(model.parameters(), o.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step["n"] += 1
        sched.step()
        if step["n"] % cfg.train.log_interval == 0:
            float(loss.detach())
        if step["n"] == skip:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t_skip = time.perf_counter()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (steps - skip) / (time.perf_counter() - t_skip)


def loop_overhead(scratch: dict, work: Path, steps: int, reps: int = 3) -> dict:
    """progtrain's loop vs the plain loop at the final model size, back to back ``reps`` times; the
    overhead is 1 - the median over reps of (progtrain steps/s) / (plain steps/s), each pair measured
    under the same machine load."""
    d = copy.deepcopy(scratch)
    d["train"].update(max_steps=steps, eval_interval=0, checkpoint_interval=0, log_interval=10)
    skip = 10
    ours, plain = [], []
    for r in range(reps):
        run = work / f"overhead_{r}"
        ours.append(_steps_per_s(run_engine(d, run), skip))
        plain.append(plain_accelerate_loop(d, run, steps, skip))
        logger.info("overhead rep %d: progtrain %.3f steps/s, plain Accelerate %.3f steps/s", r, ours[-1], plain[-1])
    import statistics

    ratios = [a / b for a, b in zip(ours, plain)]
    return {"progtrain_steps_per_s": ours, "plain_steps_per_s": plain, "steps": steps, "ratios": ratios,
            "loop_overhead_ratio": 1.0 - statistics.median(ratios)}


# ---------------------------------------------------------------------- LR sweep
def sweep_lr(scratch: dict, work: Path, seed: int, lrs: Sequence[float]) -> dict:
    """Train scratch at each LR of ``lrs`` (one seed); the best final validation loss wins."""
    from progtrain.benchmark import Curve

    results = []
    for lr in lrs:
        d = copy.deepcopy(scratch)
        d["optim"]["lr"] = float(lr)
        d["seed"] = seed
        m = run_engine(d, work / f"sweep_lr{lr:g}")
        results.append({"lr": float(lr), "final_val_loss": Curve.from_metrics("scratch", m).final_loss})
        logger.info("sweep: lr %.3g -> final val loss %.4f", lr, results[-1]["final_val_loss"])
    best = min(results, key=lambda r: r["final_val_loss"])
    return {"best_lr": best["lr"], "results": results, "seed": seed,
            "date": dt.date.today().isoformat(), "command": " ".join(map(shlex.quote, sys.argv))}


# ---------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="which comparison (default: tiny GPT-2 on CPU)")
    p.add_argument("--config", help="a progressive run config instead of the preset's (its last stage is the scratch model)")
    p.add_argument("--seeds", type=int, nargs="+",
                   help="held-out seeds of the headline: at least 3, none of the config's benchmark.tuning_seeds "
                        "(default: the config's held_out_seeds, else the 3 smallest seeds that are not tuning seeds)")
    p.add_argument("--tuning-run", action="store_true",
                   help="a run for tuning a schedule, on any seeds (tuning seeds included): reported as a tuning run, "
                        "not a headline, in <out>/tuning")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override both runs' configs")
    p.add_argument("--sweep-lr", action="store_true", help="rerun the scratch LR sweep (the preset's grid, on the first tuning seed) first")
    p.add_argument("--sweep-lrs", type=float, nargs="+", help="LR grid of the sweep (default: the preset's)")
    p.add_argument("--scratch-lr", type=float, help="scratch LR (default: the stored sweep's best, else the config's)")
    p.add_argument("--same-flops", action=argparse.BooleanOptionalAction, default=True,
                   help="also run the progressive schedule stretched to the scratch run's FLOPs (more tokens; default: on)")
    p.add_argument("--overhead-steps", type=int, help="steps of each loop-overhead run (0 skips it)")
    p.add_argument("--jobs", type=int, default=1,
                   help="training runs in parallel worker processes (default 1: back to back; each worker gets "
                        "the torch threads divided by --jobs)")
    p.add_argument("--reuse", action="store_true",
                   help="keep the training runs in --work-dir that already finished with the very same config "
                        "(an interrupted benchmark continues; the rest is trained)")
    p.add_argument("--indicative", action="store_true",
                   help="allow fewer than 3 held-out seeds (still none a tuning seed); the report is marked "
                        "indicative, not a headline")
    p.add_argument("--out", help="where the report goes")
    p.add_argument("--work-dir", default="runs/bench", help="where the training runs go (default: runs/bench)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    from progtrain.benchmark import Curve, aggregate, compare, machine_info, markdown_table, plot_curves, write_report
    from progtrain.train.config import apply_overrides

    from progtrain.benchmark import check_held_out_seeds, default_held_out_seeds

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    preset = PRESETS[args.preset]
    cfg_path = Path(args.config) if args.config else preset["config"]
    out = Path(args.out) if args.out else (HERE / "results" if args.preset == "tiny" else HERE / "results" / args.preset)
    if args.tuning_run and not args.out:
        out = out / "tuning"
    work = Path(args.work_dir) / args.preset

    # the protocol is checked before anything is trained or written (bad input: one line, exit 2)
    def refuse(msg: str) -> None:
        sys.stderr.write(f"error: {msg}\n")
        raise SystemExit(2)

    try:
        prog, protocol = split_benchmark_block(yaml.safe_load(cfg_path.read_text()), cfg_path)
    except ValueError as e:
        refuse(str(e))
    tuning = protocol["tuning_seeds"]
    seeds = args.seeds or protocol["held_out_seeds"] or default_held_out_seeds(tuning)
    if not args.tuning_run:
        try:
            check_held_out_seeds(seeds, tuning, minimum=1 if args.indicative else 3)
        except ValueError as e:
            refuse(f"{e} (or pass --tuning-run for a run that is not a headline)")
    sweep_seed = tuning[0] if tuning else None
    if args.sweep_lr and sweep_seed is None:
        refuse(f"--sweep-lr tunes the scratch LR on a seed, which then is a tuning seed: declare it in {cfg_path}'s "
               f"benchmark.tuning_seeds first")
    prog = apply_overrides(prog, args.set)
    scratch = scratch_dict(prog)
    sweep_file = (HERE / "results" / f"lr_sweep_{args.preset}.json") if not args.config else out / "lr_sweep.json"
    sweep = json.loads(sweep_file.read_text()) if (sweep_file.exists() and not args.sweep_lr) else None
    if sweep and not args.scratch_lr and not args.tuning_run and sweep.get("seed") in seeds:
        refuse(f"the scratch LR in {sweep_file} was swept on seed {sweep['seed']}, a held-out seed here: rerun with "
               f"--sweep-lr (it sweeps on the first tuning seed) or choose other --seeds")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    if args.sweep_lr:
        sweep = sweep_lr(scratch, work, sweep_seed, args.sweep_lrs or preset["sweep"])
        tmp = sweep_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(sweep, indent=1))
        os.replace(tmp, sweep_file)
    scratch_lr = args.scratch_lr or (sweep["best_lr"] if sweep else float(scratch["optim"]["lr"]))
    scratch["optim"]["lr"] = scratch_lr
    logger.info("scratch LR %.3g (%s); progressive LR %.3g", scratch_lr,
                "--scratch-lr" if args.scratch_lr else (f"sweep {sweep_file.name}" if sweep else "config"), prog["optim"]["lr"])

    arms = [("scratch", scratch), ("progressive", prog)]
    matched_factor = None
    if args.same_flops:
        matched, matched_factor = compute_matched_dict(prog)
        arms.append((SAME_FLOPS, matched))
        logger.info("same-FLOPs progressive arm: %d steps (x%.3f tokens)", matched["train"]["max_steps"], matched_factor)
    curves: dict[str, list[Curve]] = {name: [] for name, _ in arms}
    per_seed, per_seed_matched = [], []
    metrics = run_all([(seed, name, d) for seed in seeds for name, d in arms], work, args.jobs, reuse=args.reuse)
    for seed in seeds:
        for name, _ in arms:
            curves[name].append(Curve.from_metrics(name, metrics[seed, name]))
        r = compare(curves["scratch"][-1], curves["progressive"][-1])
        r["seed"] = seed
        per_seed.append(r)
        logger.info("seed %d: L* %.4f, progressive final %.4f, reached %s, FLOPs ratio %s, wall ratio %s", seed,
                    r["L_star"], r["final_val_loss_progressive"], r["reached"], r["flops_ratio"], r["wallclock_ratio"])
        if args.same_flops:
            m = compare(curves["scratch"][-1], curves[SAME_FLOPS][-1])
            m["seed"] = seed
            per_seed_matched.append(m)
            logger.info("seed %d, same FLOPs: final %.4f, reached %s, FLOPs ratio %s, wall ratio %s", seed,
                        m["final_val_loss_progressive"], m["reached"], m["flops_ratio"], m["wallclock_ratio"])

    summary = aggregate(per_seed)
    if args.same_flops:
        summary["same_flops"] = dict(aggregate(per_seed_matched), token_factor=matched_factor)
    steps = args.overhead_steps if args.overhead_steps is not None else preset["overhead_steps"]
    overhead = loop_overhead(scratch, work, steps) if steps else None
    summary["loop_overhead_ratio"] = overhead["loop_overhead_ratio"] if overhead else None
    summary.update(
        loop_overhead=overhead, seeds=list(seeds), held_out_seeds=[] if args.tuning_run else list(seeds),
        tuning_seeds=list(tuning), tuning_run=bool(args.tuning_run), **tokens_per_param(prog),
        preset=args.preset, config=str(cfg_path),
        overrides=list(args.set), scratch_lr=scratch_lr, progressive_lr=prog["optim"]["lr"], lr_sweep=sweep,
        machine=machine_info(), date=dt.datetime.now().isoformat(timespec="seconds"),
        command=" ".join(map(shlex.quote, ["python", "benchmarks/progressive_vs_scratch.py", *(argv if argv is not None else sys.argv[1:])])),
        benchmark_wall_s=round(time.perf_counter() - t0, 1),
        total_flops_scratch=per_seed[0]["total_flops_scratch"], total_flops_progressive=per_seed[0]["total_flops_progressive"],
    )
    summary.update(indicative=bool(args.indicative) and not args.tuning_run and len(seeds) < 3, jobs=args.jobs)
    if args.tuning_run:
        summary["headline"] = "tuning run (not a headline): " + summary["headline"]
    elif summary["indicative"]:
        summary["headline"] = (f"indicative ({len(seeds)} held-out seed(s), fewer than the 3 of a headline): "
                               + summary["headline"])
    l_star = summary["L_star"]
    plot_curves(curves, "flops", out / "loss_vs_flops.png", l_star)
    plot_curves(curves, "wall_s", out / "loss_vs_wallclock.png", l_star)
    table = markdown_table(summary)
    if args.same_flops:
        table += (f"\nSame-FLOPs arm (the progressive schedule stretched x{matched_factor:.3f} in steps to the scratch "
                  f"run's FLOPs):\n\n" + markdown_table(summary["same_flops"]))
    write_report(out, "progressive_vs_scratch", table, summary)
    sys.stdout.write("\n" + table + f"\nreport in {out} ({summary['benchmark_wall_s']} s)\n")
    return summary


if __name__ == "__main__":
    main()
