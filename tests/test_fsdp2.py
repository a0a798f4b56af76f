"""Growth under FSDP2 (``fully_shard``, DTensor parameters) with 2 CPU processes over gloo
(``launch/cpu_fsdp2.yaml``), compared with one process: the low-level engine functions
(tests/dist_scripts/grow_midway.py) and the whole training loop with two growths, stopped after the
first growth and resumed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys

import pytest
import torch
import transformers as T
from _launch import REPO, run_launch

from progtrain.errors import ProgtrainConfigError

GROW_MIDWAY = REPO / "tests" / "dist_scripts" / "grow_midway.py"
TRAIN_RUN = REPO / "tests" / "dist_scripts" / "train_run.py"

#: the default tiny GPT-2 run, shrunk: 6 steps, growth (wide) at 2 and (deep) at 4
OVERRIDES = {
    "train.max_steps": 6, "train.batch_size": 8, "train.eval_interval": 3, "train.eval_batches": 2,
    "train.checkpoint_interval": 0, "train.log_interval": 1, "data.max_chars": 60000, "data.vocab_size": 300,
    "data.seq_len": 32, "data.val_fraction": 0.05, "stages.0.start_step": 2, "stages.1.start_step": 4,
    # the main job widens with `random` (not exact); these tests check function preservation on 2 processes
    "stages.0.init": "function_preserving",
}


def _train(mode: str, out, *extra: str, overrides: dict | None = None) -> None:
    args = ["--config", "configs/gpt2_tiny_progressive.yaml", "--output-dir", str(out / "run"), *extra]
    for k, v in {**OVERRIDES, **(overrides or {})}.items():
        args += ["--set", f"{k}={v}"]
    run_launch(mode, TRAIN_RUN, args, out / f"log{len(list(out.glob('log*')))}.txt")


def _metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _train_losses(run) -> list[float]:
    return [m["train_loss"] for m in _metrics(run) if m["event"] == "train"]


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    _train("single", out)
    return out / "run"


@pytest.fixture(scope="module")
def fsdp2_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2")
    _train("fsdp2", out)
    return out / "run"


@pytest.mark.slow
def test_fsdp2_grow_midway_matches_single(tmp_path):
    """gather (parameter by parameter) -> grow -> re-shard -> load the moments into the sharded Adam
    state; same losses as one process, before and after the growth."""
    from test_distributed import _check_run

    res = {}
    for mode in ("single", "fsdp2"):
        out = tmp_path / mode
        out.mkdir()
        run_launch(mode, GROW_MIDWAY, ["--out", str(out)], out / "log.txt")
        res[mode] = json.loads((out / "result.json").read_text())
        _check_run(res[mode], out)
    f, s = res["fsdp2"], res["single"]
    assert f["world_size"] == 2 and f["engine_kind"] == "fsdp2"
    assert len(f["losses"]) == len(s["losses"])
    for step, (a, b) in enumerate(zip(f["losses"], s["losses"])):
        assert abs(a - b) <= 1e-4, f"fsdp2 step {step}: loss {a} vs single-process {b}"


@pytest.mark.slow
def test_fsdp2_training_loop_grows_like_single(fsdp2_run, single_run):
    info = json.loads((fsdp2_run / "run_info.json").read_text())
    assert info["world_size"] == 2 and info["engine"] == "fsdp2"
    growths = [m for m in _metrics(fsdp2_run) if m["event"] == "growth"]
    assert [g["step"] for g in growths] == [2, 4]
    for g in growths:  # function preserving through gather -> grow -> re-shard, on 2 processes
        assert g["val_loss_after"] == pytest.approx(g["val_loss_before"], rel=1e-5)
    a, b = _train_losses(fsdp2_run), _train_losses(single_run)
    assert len(a) == len(b) == OVERRIDES["train.max_steps"]
    assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-4
    model = T.AutoModelForCausalLM.from_pretrained(fsdp2_run / "final").eval()
    assert type(model).__name__ == "GPT2LMHeadModel"
    assert (model.config.n_embd, model.config.n_head, model.config.n_layer) == (128, 8, 4)
    ref = T.AutoModelForCausalLM.from_pretrained(single_run / "final").eval()
    sa, sb = model.state_dict(), ref.state_dict()
    assert max((sa[k] - sb[k]).abs().max().item() for k in sb) <= 1e-4


def check_sharded_checkpoint(path, engine: str, world: int = 2) -> None:
    """``path`` is a sharded checkpoint of ``engine``: one shard file per rank, no full model or moments."""
    assert not (path / "model").exists() and not (path / "optimizer.pt").exists()
    assert (path / "config" / "config.json").is_file()
    assert json.loads((path / "state.json").read_text())["engine"] == engine
    if engine == "fsdp2":
        found = sorted(p.name for p in (path / "sharded").glob("*.distcp"))
        assert found == [f"__{r}_0.distcp" for r in range(world)]
    else:
        found = sorted(p.name for p in (path / "sharded" / "zero").glob("zero_pp_rank_*_optim_states.pt"))
        assert found == [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(world)]


def same_weights(a, b) -> bool:
    """Whether two saved final models hold the same tensors, bit for bit."""
    from safetensors.torch import load_file

    sa, sb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.slow
def test_fsdp2_resume_across_growth_is_bit_identical(fsdp2_run, single_run, tmp_path):
    """Stopped after the first growth (step 3): every checkpoint is sharded (each rank's DCP shard, no
    full model); the stage boundary's (step 2) holds the grown model. Resumed from it: the same loss
    path, float for float, through the second growth, and the same final weights, bit for bit."""
    from progtrain.train.checkpoint import load_full_model

    _train("fsdp2", tmp_path, "--stop-at", "3")
    run = tmp_path / "run"
    boundary, last = run / "checkpoints" / "step-00000002", run / "checkpoints" / "step-00000003"
    for path in (boundary, last):
        check_sharded_checkpoint(path, "fsdp2")
    assert json.loads((boundary / "state.json").read_text())["boundary"] is True
    grown = load_full_model(boundary)  # consolidated in this process from the two ranks' shards
    assert (grown.config.n_embd, grown.config.n_layer) == (128, 2)
    ref = T.AutoModelForCausalLM.from_pretrained(single_run / "checkpoints" / "step-00000002" / "model")
    sa, sb = grown.state_dict(), ref.state_dict()
    assert sa.keys() == sb.keys() and max((sa[k] - sb[k]).abs().max().item() for k in sb) <= 1e-5
    shutil.rmtree(last)  # resume from the boundary checkpoint itself
    _train("fsdp2", tmp_path, "--resume")
    assert _train_losses(run) == _train_losses(fsdp2_run)
    assert same_weights(run / "final", fsdp2_run / "final")


def test_fsdp2_refuses_unsupported_launch_options(monkeypatch):
    from progtrain.train.fsdp import settings_from_env

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setenv("FSDP_OFFLOAD_PARAMS", "true")
    with pytest.raises(ProgtrainConfigError, match="fsdp_offload_params"):
        settings_from_env()


def test_fsdp2_with_deepspeed_config_is_refused(monkeypatch):
    from progtrain.train.distributed import build_accelerator

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    with pytest.raises(ProgtrainConfigError, match="FSDP2"):
        build_accelerator(deepspeed_config={"zero_optimization": {"stage": 3}})


def test_fsdp2_refuses_update_scales():
    """Per-element update scales need full parameters on every rank; FSDP2 shards them."""
    from progtrain.train.distributed import Engine

    engine = Engine.__new__(Engine)  # the check reads the engine kind only
    engine.kind = "fsdp2"
    with pytest.raises(ProgtrainConfigError, match="fsdp2 shards them"):
        engine.check_update_scales()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_two_machines_over_loopback(mode, single_run, tmp_path):
    """A real 2-machine launch on one host: ``accelerate launch --num_machines 2 --machine_rank 0|1
    --main_process_ip 127.0.0.1`` (one process per "machine", as launch/slurm_multinode.sh runs one
    launch per node), with both growths: world size 2 and the single-process loss path."""
    import subprocess

    from _launch import LAUNCH_DIR, free_port, launch_env, tail

    port = free_port()
    args = ["--config", "configs/gpt2_tiny_progressive.yaml", "--output-dir", str(tmp_path / "run")]
    for k, v in OVERRIDES.items():
        args += ["--set", f"{k}={v}"]
    procs, logs = [], []
    for rank in (0, 1):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(LAUNCH_DIR / ("cpu_ddp2.yaml" if mode == "ddp" else "cpu_fsdp2.yaml")),
               "--num_machines", "2", "--num_processes", "2", "--machine_rank", str(rank),
               "--main_process_ip", "127.0.0.1", "--main_process_port", str(port), str(TRAIN_RUN), *args]
        logs.append(tmp_path / f"machine{rank}.txt")
        with open(logs[-1], "w") as log:
            procs.append(subprocess.Popen(cmd, cwd=REPO, env=launch_env(mode), stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True))
    try:
        codes = [p.wait(timeout=420) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert codes == [0, 0], "\n".join(tail(log) for log in logs)
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())
    assert info["world_size"] == 2 and info["engine"] == mode
    a, b = _train_losses(tmp_path / "run"), _train_losses(single_run)
    assert len(a) == len(b) == OVERRIDES["train.max_steps"]
    assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-4
    assert [m["step"] for m in _metrics(tmp_path / "run") if m["event"] == "growth"] == [2, 4]


def test_resume_from_unreadable_shards_is_refused():
    """Another engine's shards, or ZeRO-3's at another world size, stop the resume with one message;
    FSDP2's DCP files re-shard to any world size."""
    from types import SimpleNamespace

    from progtrain.train.distributed import Engine

    def engine(kind):
        e = Engine.__new__(Engine)  # the check reads the engine kind and the world size only
        e.kind, e.accelerator = kind, SimpleNamespace(num_processes=2)
        return e

    with pytest.raises(ProgtrainConfigError, match="holds zero3 shards of 2 processes, this run is fsdp2"):
        engine("fsdp2").check_resume_from_shards("ck", "zero3", 2)
    with pytest.raises(ProgtrainConfigError, match="and world size"):
        engine("zero3").check_resume_from_shards("ck", "zero3", 4)
    engine("fsdp2").check_resume_from_shards("ck", "fsdp2", 4)
    engine("zero3").check_resume_from_shards("ck", "zero3", 2)
