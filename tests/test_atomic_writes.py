"""Atomic writes: a `progtrain grow` killed with SIGKILL mid-save leaves no partial output directory,
and an existing output (replaced with --overwrite) stays intact and loadable."""

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers as T

from progtrain.cli import main
from progtrain.io import load_model

pytestmark = pytest.mark.slow


def snapshot(path: Path) -> dict[str, str]:
    return {str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(path.rglob("*")) if f.is_file()}


def temp_dirs(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.tmp-*"))


# Injected into the child process (sitecustomize on its PYTHONPATH): the child stops itself (SIGSTOP) at
# the first rename of a temporary directory whose name contains $PROGTRAIN_TEST_STOP_AT, i.e. after
# every file of the save is written and before anything becomes visible. The parent then SIGKILLs it:
# a deterministic kill at the last moment before the rename, whatever the machine's speed.
STOPPER = """
import os, signal
_replace = os.replace
def _stopping_replace(src, dst, *args, **kwargs):
    tag = os.environ.get("PROGTRAIN_TEST_STOP_AT")
    if tag and any(tag in os.path.basename(os.fspath(x)) for x in (src, dst)):
        os.kill(os.getpid(), signal.SIGSTOP)
    return _replace(src, dst, *args, **kwargs)
os.replace = _stopping_replace
"""


def child_env(tmp_path: Path, stop_at: str) -> dict[str, str]:
    hook = tmp_path / "stop_hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(STOPPER)
    return dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PROGTRAIN_TEST_STOP_AT=stop_at,
                PYTHONPATH=os.pathsep.join([str(hook), *sys.path]))


def start_grow(tmp_path: Path, src: Path, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "progtrain.cli", "grow", str(src), str(out), "--num-layers", "8",
                             *extra], env=child_env(tmp_path, f".{out.name}."), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


def kill_when_stopped(proc: subprocess.Popen, timeout: float = 240.0) -> None:
    """Wait until ``proc`` stops itself at the injected rename, then SIGKILL it."""
    t0 = time.monotonic()
    while True:
        pid, status = os.waitpid(proc.pid, os.WUNTRACED | os.WNOHANG)
        if pid and os.WIFSTOPPED(status):
            break
        if pid:  # exited without reaching the rename
            raise AssertionError(f"child exited before the save was caught: {proc.stderr.read().decode()[-2000:]}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            raise AssertionError("the save never reached its rename")
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


def test_sigkill_mid_save_leaves_no_partial_output(tmp_path, capsys):
    src = tmp_path / "src"
    cfg = T.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=500, n_positions=64)
    T.GPT2LMHeadModel(cfg).save_pretrained(src)

    # a previous good output, replaced with --overwrite by the killed run
    prev = tmp_path / "prev"
    assert main(["grow", str(src), str(prev), "--num-layers", "3"]) == 0
    before = snapshot(prev)
    fresh = tmp_path / "fresh"

    p_over = start_grow(tmp_path, src, prev, "--overwrite")
    p_fresh = start_grow(tmp_path, src, fresh)
    # both are killed with the whole save written to their temp dirs, right before the first rename
    kill_when_stopped(p_fresh)
    kill_when_stopped(p_over)
    assert any((t / "model.safetensors").exists() for t in temp_dirs(prev))

    assert not fresh.exists(), "a killed save left a partial output directory"
    assert snapshot(prev) == before, "the previous output changed"
    old = load_model(str(prev))
    assert old.config.n_layer == 3
    # whatever the kill left behind is hidden temp data, never the output itself
    leftovers = [p.name for p in tmp_path.iterdir() if p.name not in ("src", "prev", "stop_hook")]
    assert all(n.startswith((".prev.tmp-", ".fresh.tmp-")) for n in leftovers), leftovers
    assert any(n.startswith(".prev.tmp-") for n in leftovers)  # the kill really happened mid-save

    # the next run succeeds despite the leftovers and replaces the output
    capsys.readouterr()
    assert main(["grow", str(src), str(prev), "--num-layers", "4", "--overwrite"]) == 0
    new = load_model(str(prev))
    assert new.config.n_layer == 4
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():  # function-preserving depth growth: same logits as the source
        ref = T.GPT2LMHeadModel.from_pretrained(src)(ids).logits
        assert torch.allclose(new(ids).logits, ref, atol=1e-5)


TRAIN_CONFIG = """
output_dir: {out}
seed: 0
model:
  family: gpt2
  task: causal_lm
  config: {{n_embd: 192, n_layer: 2, n_head: 4, n_positions: 64, resid_pdrop: 0.0, embd_pdrop: 0.0, attn_pdrop: 0.0}}
data: {{vocab_size: 1024, seq_len: 64, val_fraction: 0.01}}
optim: {{lr: 1.0e-3, warmup_steps: 2}}
train: {{max_steps: 14, batch_size: 4, eval_interval: 7, eval_batches: 1, checkpoint_interval: 5, keep_checkpoints: 3,
         log_interval: 1}}
stages:
  - {{name: wide, start_step: 8, grow: {{hidden_size: 384, num_heads: 8}}}}
"""


def test_sigkill_mid_training_checkpoint_then_resume(tmp_path):
    """A run killed while writing its step-10 checkpoint (after the growth at step 8) keeps its
    complete checkpoints (step 5, the step-8 growth boundary), shows no partial step-10 checkpoint,
    and `progtrain train --resume` finishes the run from the boundary checkpoint with the grown model."""
    from progtrain.train.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint

    out = tmp_path / "run"
    cfg = tmp_path / "run.yaml"
    cfg.write_text(TRAIN_CONFIG.format(out=out))
    env = child_env(tmp_path, ".step-00000010.")
    cmd = [sys.executable, "-m", "progtrain.cli", "train", str(cfg)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ck_root = out / "checkpoints"
    kill_when_stopped(proc)
    env.pop("PROGTRAIN_TEST_STOP_AT")

    done = list_checkpoints(out)
    assert [p.name for p in done] == ["step-00000005", "step-00000008"], done
    assert not (ck_root / "step-00000010").exists(), "a killed save left a visible partial checkpoint"
    assert any(p.name.startswith(".step-00000010.tmp-") for p in ck_root.iterdir())  # killed mid-save
    c = load_checkpoint(latest_checkpoint(out))
    assert c.state["step"] == 8 and c.state["stage"] == 1 and c.state["boundary"]
    assert load_model(str(done[-1] / "model")).config.n_embd == 384
    assert not (out / "final").exists()

    res = subprocess.run([*cmd, "--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    info = __import__("json").loads((out / "run_info.json").read_text())
    assert info["resumed_from"] and info["resumed_from"].endswith("step-00000008")
    final = load_model(str(out / "final"))
    assert final.config.n_embd == 384
    assert all(torch.isfinite(p).all() for p in final.parameters())
    rows = [__import__("json").loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steps = [r["step"] for r in rows if r.get("event") == "train"]
    assert steps == list(range(1, 15)), steps  # rows after the resumed checkpoint were rewritten, none twice


# ---------------------------------------------------------------------- single files (atomic_write)
def test_atomic_write_replaces_whole_or_not_at_all(tmp_path):
    import os
    import stat

    from progtrain.io import atomic_write, atomic_write_text, current_umask

    f = tmp_path / "run_info.json"
    atomic_write_text(f, "old")
    assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~current_umask()  # not mkstemp's 0600

    def half(tmp):
        tmp.write_text("ha")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        atomic_write(f, half)
    assert f.read_text() == "old" and os.listdir(tmp_path) == ["run_info.json"]  # no temp file left
    atomic_write_text(f, "new")
    assert f.read_text() == "new" and os.listdir(tmp_path) == ["run_info.json"]


def test_report_writers_leave_no_temp_files(tmp_path):
    """Every single-file writer goes through atomic_write: metrics truncation, the plot, benchmark JSON."""
    pytest.importorskip("matplotlib")
    from progtrain.benchmark import write_report
    from progtrain.train.report import MetricsLog, plot_loss_vs_flops, read_metrics

    log = MetricsLog(tmp_path / "metrics.jsonl")
    for step in (1, 2, 3):
        log.write(event="train", step=step, stage=0, tokens=step, flops=float(step), train_loss=1.0 / step)
    MetricsLog(tmp_path / "metrics.jsonl", truncate_after_step=2)
    assert [m["step"] for m in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]
    plot_loss_vs_flops(read_metrics(tmp_path / "metrics.jsonl"), tmp_path / "loss_vs_flops.png")
    assert (tmp_path / "loss_vs_flops.png").read_bytes()[:4] == b"\x89PNG"
    write_report(tmp_path, "bench", "# x", {"a": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.json", "bench.md", "loss_vs_flops.png", "metrics.jsonl"]


def test_text_table_rules():
    from progtrain.text import text_table

    assert text_table([("a", "bb"), (1, 2), (333, 4)], rules_after=(0, 1)).splitlines() == [
        "a    bb", "---  --", "1    2", "---  --", "333  4"]
