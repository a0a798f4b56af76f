"""Data pipeline at pretraining scale: prepare time, tokens/s and peak memory, and training start-up on
prepared data, against a plain ``datasets.map`` tokenisation.

1. builds a text corpus of ``--size-mb`` MB (default 1024) locally from the embedded Shakespeare
   plays (copies of the plays, 64 MB per file, in a directory), and a ``--small-mb`` (default 10) one;
2. ``progtrain data prepare`` on the big corpus: wall time, tokens/s, peak RSS (the process and its
   largest tokenising child);
3. the baseline: ``datasets.load_dataset("text", sample_by="paragraph")`` + ``Dataset.map`` with the
   same tokenizer and the same number of processes, as a user would write it (the ids kept in the
   Arrow cache; no packing);
4. a 2-step ``progtrain train`` (tiny GPT-2) on each prepared corpus: seconds from process start to
   the end of the first optimizer step with model construction excluded, and peak RSS.

Each measurement runs in a fresh process. Results go to benchmarks/results/data_pipeline.{json,md}.

    python benchmarks/data_pipeline.py                        # the full run (1 GB vs 10 MB)
    python benchmarks/data_pipeline.py --size-mb 100          # reduced
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FILE_MB = 64


def build_corpus(root: Path, size_mb: int) -> Path:
    """``size_mb`` MB of text: the embedded plays repeated, in files of at most FILE_MB MB."""
    from progtrain.growth.calibration import embedded_corpus_files

    if root.exists() and (root / "SIZE").is_file() and (root / "SIZE").read_text() == str(size_mb):
        return root
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    plays = "\n\n".join(Path(f).read_text(encoding="utf-8", errors="replace") for f in embedded_corpus_files())
    target, written, k = size_mb << 20, 0, 0
    while written < target:
        n = min(FILE_MB << 20, target - written)
        reps = plays * (n // len(plays) + 1)
        (root / f"part-{k:04d}.txt").write_text(reps[:n])
        written += n
        k += 1
    (root / "SIZE").write_text(str(size_mb))
    return root


def config(work: Path, corpus: Path, name: str, num_proc: int) -> dict:
    return {
        "output_dir": str(work / f"run_{name}"), "seed": 0,
        "model": {"family": "gpt2", "task": "causal_lm", "config": {"n_embd": 64, "n_layer": 2, "n_head": 4}},
        "data": {"files": [str(corpus)], "vocab_size": 4096, "seq_len": 128, "val_fraction": 0.001,
                 "val_max_chars": 1_000_000, "tokenizer_sample_chars": 20_000_000, "num_proc": num_proc,
                 "prepared_dir": str(work / f"prepared_{name}")},
        "optim": {"lr": 1e-3, "warmup_steps": 1},
        "train": {"max_steps": 2, "batch_size": 8, "eval_interval": 0, "log_interval": 1},
    }


def peak_rss_mb() -> dict:
    return {"self_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "largest_child_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)}


# ---------------------------------------------------------------------- children (one per measurement)
def child_prepare(cfg_path: str) -> dict:
    from progtrain.train import shards
    from progtrain.train.config import load_config

    cfg = load_config(cfg_path)
    t0 = time.perf_counter()
    d = shards.prepare(cfg, overwrite=True)
    wall = time.perf_counter() - t0
    m = shards.read_manifest(d)
    tokens = m["splits"]["train"]["tokens"] + m["splits"]["val"]["tokens"]
    return {"wall_s": round(wall, 2), "tokens": tokens, "tokens_per_s": round(tokens / wall), **peak_rss_mb(),
            "disk_mb": round(sum(f.stat().st_size for f in Path(d).glob("*.bin")) / 2**20, 1)}


def child_baseline(cfg_path: str) -> dict:
    import datasets
    from transformers import AutoTokenizer

    from progtrain.train.config import load_config
    from progtrain.train.sources import resolve_sources

    cfg = load_config(cfg_path)
    tok = AutoTokenizer.from_pretrained(Path(cfg.data.prepared_dir) / "tokenizer")
    files = [s.path for s in resolve_sources(cfg.data.files)]
    cache = Path(cfg.output_dir).parent / "baseline_cache"
    shutil.rmtree(cache, ignore_errors=True)
    t0 = time.perf_counter()
    ds = datasets.load_dataset("text", data_files=files, sample_by="paragraph", split="train", cache_dir=str(cache))
    ds = ds.map(lambda b: tok(b["text"], add_special_tokens=False), batched=True, remove_columns=["text"],
                num_proc=cfg.data.num_proc if cfg.data.num_proc and cfg.data.num_proc > 1 else None)
    tokens = sum(len(x) for b in ds.select_columns(["input_ids"]).iter(batch_size=10_000) for x in b["input_ids"])
    wall = time.perf_counter() - t0
    shutil.rmtree(cache, ignore_errors=True)
    return {"wall_s": round(wall, 2), "tokens": tokens, "tokens_per_s": round(tokens / wall), **peak_rss_mb()}


def child_train(cfg_path: str, t_spawn: float) -> dict:
    from progtrain.train import engine, report
    from progtrain.train.config import load_config

    built = {"s": 0.0}
    first = {}
    real_build, real_write = engine.build_initial_model, report.MetricsLog.write

    def build(*a, **k):
        t = time.perf_counter()
        try:
            return real_build(*a, **k)
        finally:
            built["s"] += time.perf_counter() - t

    def write(self, **row):
        if row.get("event") == "train" and "t" not in first:
            first["t"] = time.time()
        return real_write(self, **row)

    engine.build_initial_model = build
    report.MetricsLog.write = write
    cfg = load_config(cfg_path)
    shutil.rmtree(cfg.output_dir, ignore_errors=True)
    engine.train(cfg)
    return {"first_step_s": round(first["t"] - t_spawn - built["s"], 2), "model_build_s": round(built["s"], 2),
            **peak_rss_mb()}


def run_child(kind: str, cfg_path: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    out = cfg_path.with_suffix(f".{kind}.json")
    cmd = [sys.executable, __file__, "--child", kind, str(cfg_path), str(out), repr(time.time())]
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-mb", type=int, default=1024)
    p.add_argument("--small-mb", type=int, default=10)
    p.add_argument("--num-proc", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--work", default="/tmp/progtrain_data_bench")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "data_pipeline"))
    p.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        kind, cfg_path, out, t_spawn = a.child
        res = {"prepare": lambda: child_prepare(cfg_path), "baseline": lambda: child_baseline(cfg_path),
               "train": lambda: child_train(cfg_path, float(t_spawn))}[kind]()
        Path(out).write_text(json.dumps(res))
        return
    import yaml

    from progtrain.benchmark import machine_info

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    import datetime as dt
    import shlex

    results = {"size_mb": a.size_mb, "small_mb": a.small_mb, "num_proc": a.num_proc, "machine": machine_info(),
               "date": dt.datetime.now().isoformat(timespec="seconds"),
               "command": " ".join(map(shlex.quote, ["python", "benchmarks/data_pipeline.py", *sys.argv[1:]]))}
    for name, mb in (("big", a.size_mb), ("small", a.small_mb)):
        corpus = build_corpus(work / f"corpus_{mb}mb", mb)
        cfg_path = work / f"{name}.yaml"
        cfg_path.write_text(yaml.safe_dump(config(work, corpus, name, a.num_proc)))
        print(f"[{name}: {mb} MB] prepare ...", flush=True)
        results[f"prepare_{name}"] = run_child("prepare", cfg_path)
        if name == "big":
            print(f"[{name}] datasets.map baseline ...", flush=True)
            results["baseline_big"] = run_child("baseline", cfg_path)
        print(f"[{name}] 2-step train ...", flush=True)
        results[f"train_{name}"] = run_child("train", cfg_path)
    big, small = results["train_big"], results["train_small"]
    results["train_rss_ratio"] = round(big["self_mb"] / small["self_mb"], 3)
    Path(a.out + ".json").write_text(json.dumps(results, indent=1))
    pb, bb = results["prepare_big"], results["baseline_big"]
    md = [f"# Data pipeline ({a.size_mb} MB vs {a.small_mb} MB corpus, {a.num_proc} process(es))", "",
          "| step | wall s | tokens/s | peak RSS MB (process / largest child) |", "|---|---|---|---|",
          f"| progtrain data prepare, {a.size_mb} MB | {pb['wall_s']} | {pb['tokens_per_s']:,} | "
          f"{pb['self_mb']} / {pb['largest_child_mb']} |",
          f"| datasets.map baseline, {a.size_mb} MB | {bb['wall_s']} | {bb['tokens_per_s']:,} | "
          f"{bb['self_mb']} / {bb['largest_child_mb']} |", "",
          "| 2-step train on prepared data | start to first step s (model build excluded) | peak RSS MB |",
          "|---|---|---|",
          f"| {a.size_mb} MB | {big['first_step_s']} | {big['self_mb']} |",
          f"| {a.small_mb} MB | {small['first_step_s']} | {small['self_mb']} |", "",
          f"Training peak RSS ratio {a.size_mb} MB / {a.small_mb} MB: {results['train_rss_ratio']} (goal <= 1.2: "
          f"{'met' if results['train_rss_ratio'] <= 1.2 else 'missed'}); first step on the {a.size_mb} MB corpus "
          f"{big['first_step_s']} s after start (goal <= 10 s: {'met' if big['first_step_s'] <= 10 else 'missed'}).",
          "", f"`{results['command']}`, {results['date']}, {results['machine'].get('cpu', '')}".rstrip(", ") + "."]
    Path(a.out + ".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
