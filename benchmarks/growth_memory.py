"""Per-rank peak memory of a growth vs steady training, under DDP, DeepSpeed ZeRO-3 and FSDP2 (2 CPU
processes each, through the ``launch/`` configs).

Each run builds a GPT-2 (random init, fp32), trains ``--steps`` optimizer steps (phase "steady"),
grows it the way the training engine does at a stage boundary (phase "growth": gather
(``Engine.gather_full_state(main_only=True)``), ``Engine.grow`` of ``progtrain.grow``, the moments'
surgery, release, re-prepare, ``load_moments``), then trains one more step ("after"). A thread samples
the process's resident set (``/proc/self/statm``) every 5 ms and keeps the peak per phase.

Default size: hidden 512, 8 layers, vocab 50257 = 51.2 M parameters, grown to 12 layers (76.4 M).

    python benchmarks/growth_memory.py                          # the full size (needs ~10 GB, minutes)
    python benchmarks/growth_memory.py --hidden 128 --layers 4 --vocab 8000 --target-layers 6   # quick

Writes ``benchmarks/results/growth_memory.json`` (or ``--out``; rows of modes not run this time are
kept from the file when it was written at the same sizes) and prints one row per mode and rank: peak RSS
in steady training, during the growth, and their ratio. Each row also records ``full_state_mb``: the
bytes of real (non-meta) tensors in the full state this rank gathered and grew (the gathered model and
moments, the grown model): under FSDP2 and ZeRO-3 0 on every rank but the main one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODES = {"ddp": "cpu_ddp2.yaml", "zero3": "cpu_zero3.yaml", "fsdp2": "cpu_fsdp2.yaml"}


class RssSampler:
    """Peak resident set size (bytes) per phase, sampled from ``/proc/self/statm`` by a thread."""

    def __init__(self, interval_s: float = 0.005) -> None:
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.interval = interval_s
        self.phase = "start"
        self.peaks: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _run(self) -> None:
        while not self._stop.is_set():
            r = self.rss()
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), r)
            time.sleep(self.interval)

    def set_phase(self, phase: str) -> None:
        r = self.rss()
        self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), r)
        self.phase = phase
        self.peaks[phase] = max(self.peaks.get(phase, 0), r)

    def stop(self) -> dict[str, int]:
        self.set_phase("end")
        self._stop.set()
        self._thread.join()
        return dict(self.peaks)


def _real_bytes(obj) -> int:
    """Bytes of the real (non-meta) tensors of a module (its parameters), a tensor or a nested dict."""
    import torch

    if isinstance(obj, torch.nn.Module):
        return sum(_real_bytes(p) for p in obj.parameters())
    if isinstance(obj, dict):
        return sum(_real_bytes(v) for v in obj.values())
    if isinstance(obj, torch.Tensor) and not obj.is_meta:
        return obj.numel() * obj.element_size()
    return 0


def worker(args: argparse.Namespace) -> None:
    import torch
    import transformers as T

    from progtrain import grow
    from progtrain.train.distributed import Engine, build_accelerator
    from progtrain.train.surgery import grow_moments

    sampler = RssSampler()
    acc = build_accelerator(gradient_clipping=1.0)
    engine = Engine(acc, max_grad_norm=1.0)
    world = acc.num_processes
    torch.manual_seed(0)
    cfg = T.GPT2Config(n_embd=args.hidden, n_layer=args.layers, n_head=args.hidden // 64 or 1, vocab_size=args.vocab,
                       n_positions=args.seq, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = T.GPT2LMHeadModel(cfg)
    n_params = sum(p.numel() for p in model.parameters())

    def build(m):
        opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
        return engine.prepare(m, opt, None, micro_batch_size=args.batch // world)

    def train(n):
        gen = torch.Generator().manual_seed(1)
        for _ in range(n):
            ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen)
            ids = ids[acc.process_index * (args.batch // world):(acc.process_index + 1) * (args.batch // world)]
            loss = engine.model(input_ids=ids.to(acc.device), labels=ids.to(acc.device)).loss
            engine.backward(loss)
            engine.step()
            engine.zero_grad()

    build(model)
    del model
    sampler.set_phase("steady")
    t0 = time.perf_counter()
    train(args.steps)
    steady_s = time.perf_counter() - t0
    acc.wait_for_everyone()
    sampler.set_phase("growth")
    t0 = time.perf_counter()
    full = engine.gather_full_state(main_only=True)
    res = engine.grow(full, lambda m: grow(m, num_layers=args.target_layers, init="function_preserving", seed=0,
                                           verify=False))
    moments = grow_moments(full.moments, res.param_maps) if full.moments is not None else {}
    full_state_mb = sum(_real_bytes(o) for o in (full.model, full.moments or {}, res.model)) / 2**20
    step = full.step
    del full
    engine.release()
    build(res.model)
    engine.load_moments(moments, step)
    del moments, res
    acc.wait_for_everyone()
    growth_s = time.perf_counter() - t0
    sampler.set_phase("after")
    train(1)
    acc.wait_for_everyone()
    peaks = sampler.stop()
    row = {"rank": acc.process_index, "engine": engine.kind, "world_size": world, "params": n_params,
           "steady_peak_mb": peaks["steady"] / 2**20, "growth_peak_mb": peaks["growth"] / 2**20,
           "after_peak_mb": peaks["after"] / 2**20, "full_state_mb": full_state_mb, "steady_s": steady_s,
           "growth_s": growth_s}
    Path(args.worker_out).mkdir(parents=True, exist_ok=True)
    (Path(args.worker_out) / f"rank{acc.process_index}.json").write_text(json.dumps(row))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--target-layers", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4, help="global batch (sequences)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--modes", default="ddp,zero3,fsdp2")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "growth_memory.json"))
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker_out:
        return worker(args)

    rows = []
    for mode in args.modes.split(","):
        tmp = Path(args.out).with_suffix("") .parent / f".growth_memory_{mode}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
        env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
                   PYTHONPATH=os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p))
        if mode == "ddp":
            env["ACCELERATE_USE_CPU"] = "1"
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "launch" / MODES[mode]),
               "--main_process_port", str(29400 + len(rows)), __file__, "--worker-out", str(tmp),
               "--hidden", str(args.hidden), "--layers", str(args.layers), "--target-layers", str(args.target_layers),
               "--vocab", str(args.vocab), "--seq", str(args.seq), "--batch", str(args.batch), "--steps", str(args.steps)]
        subprocess.run(cmd, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for r in sorted(tmp.glob("rank*.json")):
            row = json.loads(r.read_text())
            row["mode"] = mode
            row["ratio"] = row["growth_peak_mb"] / row["steady_peak_mb"]
            rows.append(row)
            r.unlink()
        tmp.rmdir()
    config = {k: v for k, v in vars(args).items() if k not in ("worker_out", "out")}
    modes = set(args.modes.split(","))
    if Path(args.out).is_file():  # keep the other modes' rows of an earlier run at the same sizes
        old = json.loads(Path(args.out).read_text())
        same = {k: v for k, v in old.get("config", {}).items() if k != "modes"} == \
            {k: v for k, v in config.items() if k != "modes"}
        if same:
            kept = [r for r in old.get("rows", []) if r["mode"] not in modes]
            rows = kept + rows
            config["modes"] = ",".join(m for m in MODES if m in {r["mode"] for r in rows})
    rows.sort(key=lambda r: (list(MODES).index(r["mode"]), r["rank"]))
    result = {"config": config, "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"{'mode':6} {'rank':>4} {'params':>11} {'steady MB':>10} {'growth MB':>10} {'ratio':>6} {'growth s':>9} "
          f"{'full state MB':>14}")
    for r in rows:
        print(f"{r['mode']:6} {r['rank']:>4} {r['params']:>11,} {r['steady_peak_mb']:>10.0f} {r['growth_peak_mb']:>10.0f} "
              f"{r['ratio']:>6.2f} {r['growth_s']:>9.2f} {r.get('full_state_mb', float('nan')):>14.0f}")


if __name__ == "__main__":
    main()
