"""Run scripts under ``accelerate launch`` (or as one plain process) for the distributed tests.

The launch recipes are the ones in ``launch/`` (see ``launch/README.md``); the environment is the
offline, CPU one the tests need: HF offline, ``DS_ACCELERATOR=cpu``, ``OMP_NUM_THREADS=1``, a free
rendezvous port per launch (other test runs may share the machine), and no ``ACCELERATE_*`` /
``RANK`` variables leaking in from the caller. Output goes to a log file whose tail is shown when
the run fails or times out.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH_DIR = REPO / "launch"

#: mode -> accelerate config in launch/ (None: one plain ``python`` process)
MODES = {
    "single": None,
    "ddp": "cpu_ddp2.yaml",
    "zero1": "cpu_zero1.yaml",
    "zero2": "cpu_zero2.yaml",
    "zero3": "cpu_zero3.yaml",
    "fsdp2": "cpu_fsdp2.yaml",
}

_LEAKY = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")


def launch_env(mode: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a run in ``mode`` (a key of :data:`MODES`)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_") and k not in _LEAKY}
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TRANSFORMERS_VERBOSITY="error",
        TOKENIZERS_PARALLELISM="false",
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
    )
    if mode == "ddp":
        env["ACCELERATE_USE_CPU"] = "1"  # DDP on CPU (never with DeepSpeed: that would be plain DDP)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.update(extra or {})
    return env


def free_port() -> int:
    """A TCP port that was free a moment ago (for the rendezvous of one launch)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(mode: str, script: str | os.PathLike, args: list[str]) -> list[str]:
    """The command line that runs ``script`` in ``mode``: ``python -m accelerate.commands.launch
    --config_file launch/<mode config> --main_process_port <free> script args`` or ``python script``."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; one of {sorted(MODES)}")
    config = MODES[mode]
    if config is None:
        return [sys.executable, str(script), *args]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(LAUNCH_DIR / config),
            "--main_process_port", str(free_port()), str(script), *args]


def run_launch(mode: str, script: str | os.PathLike, args: list[str], log_path: str | os.PathLike, *,
               timeout: float = 420.0, env: dict[str, str] | None = None) -> float:
    """Run ``script`` in ``mode`` from the repository root (launch configs name their DeepSpeed JSON
    relative to it), logging stdout+stderr to ``log_path``. Fails the test with the log's tail on a
    non-zero exit or after ``timeout`` seconds (the whole process group is killed). Returns the wall
    time in seconds."""
    cmd = launch_command(mode, script, args)
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=launch_env(mode, env), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            pytest.fail(f"{mode} run timed out after {timeout:.0f} s: {' '.join(cmd)}\n{tail(log_path)}")
    if rc != 0:
        pytest.fail(f"{mode} run failed (exit {rc}): {' '.join(cmd)}\n{tail(log_path)}")
    return time.perf_counter() - t0


def tail(path: str | os.PathLike, n: int = 60) -> str:
    """The last ``n`` lines of a log file."""
    lines = Path(path).read_text(errors="replace").splitlines()
    return "\n".join(lines[-n:])
