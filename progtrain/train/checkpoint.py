"""Full training-state checkpoints, written atomically, loaded safely.

Layout of ``<output_dir>/checkpoints/step-00000200/`` (complete once the directory exists, because
it is renamed into place with :func:`progtrain.io.atomic_dir`)::

    model/            the full model, standard HF safetensors checkpoint (any world size can load it)
    optimizer.pt      {"moments": {param name: {"exp_avg", "exp_avg_sq"}}, "step": int} (full, fp32)
    births.pt         {param name: int8 tensor}: the stage at which each element was born
    scales.pt         {param name: tensor}: per-element update scales active in this stage (if any)
    lr_scales.pt      {param name: tensor}: this stage's birth-stage LR scales (if it asks for them),
                      as computed at its growth
    rng.pt            {"torch": ..., "cuda": [...], "python": ..., "numpy": ...} per rank
    state.json        step, stage, samples consumed (data position), tokens, FLOPs, wall seconds,
                      bad batches, growth history, boundary flag

``.pt`` files hold only tensors, numbers and strings and are read with
``torch.load(weights_only=True)``. The LR schedule is a pure function of the global step, so
``state.json`` is its state. What goes in is :meth:`progtrain.train.engine.TrainState.state_dict`
(plus the model, the moments and the engine's layout).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..io import atomic_dir, json_default

logger = logging.getLogger(__name__)

CKPT_DIR = "checkpoints"
_NAME = re.compile(r"^step-(\d+)$")
#: state entries that are per-element tensor maps ({param name: tensor}), each in its own file
TENSOR_MAPS = {"births": "births.pt", "scales": "scales.pt", "lr_scales": "lr_scales.pt"}


@dataclass
class Checkpoint:
    """A loaded checkpoint: ``state`` is state.json plus ``opt_step``; ``births``/``scales``/
    ``lr_scales`` the tensor maps (None when absent); ``rng`` one entry per rank that saved it."""

    path: Path
    state: dict
    moments: dict
    births: dict | None
    scales: dict | None
    rng: list | None
    lr_scales: dict | None = None

    def train_state(self, rank: int) -> dict:
        """What :meth:`progtrain.train.engine.TrainState.load_state_dict` takes, for process
        ``rank`` (a rank beyond the saved ones takes the last rank's RNG streams)."""
        rng = self.rng[min(rank, len(self.rng) - 1)] if self.rng else None
        return {**self.state, "births": self.births, "scales": self.scales, "lr_scales": self.lr_scales, "rng": rng}


def checkpoint_dir(output_dir: str | os.PathLike, step: int) -> Path:
    return Path(output_dir) / CKPT_DIR / f"step-{step:08d}"


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(output_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and (p / "state.json").is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint, or None."""
    cks = list_checkpoints(output_dir)
    return cks[-1] if cks else None


def rng_state() -> dict:
    """This process's RNG states (torch CPU and CUDA, python, numpy) as tensors/JSON-able values."""
    import numpy as np

    st = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": json.dumps(random.getstate()),
        "numpy": json.dumps([st[0], st[1].tolist(), int(st[2]), int(st[3]), float(st[4])]),
    }


def set_rng_state(st: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    import numpy as np

    torch.set_rng_state(st["torch"])
    if st.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])
    py = json.loads(st["python"])
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = json.loads(st["numpy"])
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))


def save_checkpoint(
    output_dir: str | os.PathLike,
    *,
    model: Any,
    moments: dict,
    opt_step: int,
    state: dict,
    rng: list[dict],
) -> Path:
    """Write one checkpoint atomically (main process only) and return its path.

    ``state``: JSON-able entries for state.json (``step`` names the directory) plus the tensor maps of
    :data:`TENSOR_MAPS` (None: no file); ``rng``: one :func:`rng_state` per rank."""
    final = checkpoint_dir(output_dir, int(state["step"]))
    maps = {k: state[k] for k in TENSOR_MAPS if k in state}
    json_state = {k: v for k, v in state.items() if k not in TENSOR_MAPS}
    with atomic_dir(final, overwrite=True) as tmp:
        model.save_pretrained(tmp / "model", safe_serialization=True)
        torch.save({"moments": moments, "step": int(opt_step)}, tmp / "optimizer.pt")
        for key, value in maps.items():
            if value is not None:
                torch.save(value, tmp / TENSOR_MAPS[key])
        torch.save(rng, tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps(json_state, indent=1, default=json_default))
    logger.info("checkpoint saved: %s", final)
    return final


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a checkpoint's state, moments, tensor maps and RNG (model weights are loaded by the caller
    from ``path/model``)."""
    p = Path(path)
    opt = torch.load(p / "optimizer.pt", weights_only=True, map_location="cpu")
    maps = {k: torch.load(p / f, weights_only=True) if (p / f).exists() else None for k, f in TENSOR_MAPS.items()}
    rng = torch.load(p / "rng.pt", weights_only=True) if (p / "rng.pt").exists() else None
    state = json.loads((p / "state.json").read_text())
    state["opt_step"] = int(opt["step"])
    return Checkpoint(p, state, opt["moments"], maps["births"], maps["scales"], rng, maps["lr_scales"])


def prune_checkpoints(output_dir: str | os.PathLike, keep: int) -> None:
    """Delete the oldest interval checkpoints beyond ``keep``; stage-boundary ones are kept."""
    if keep <= 0:
        return
    interval = []
    for p in list_checkpoints(output_dir):
        st = json.loads((p / "state.json").read_text())
        if not st.get("boundary"):
            interval.append(p)
    for p in interval[:-keep]:
        shutil.rmtree(p, ignore_errors=True)
