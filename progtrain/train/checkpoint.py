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

Under ZeRO-3 and FSDP2 no rank ever holds the full model and moments to write ``model/`` and
``optimizer.pt``: there each rank writes its own shard through the engine's sharded save
(:func:`save_sharded_checkpoint`), and ``model/`` and ``optimizer.pt`` are replaced by::

    config/           the model's config.json (+ generation_config.json), no weights
    sharded/          the engine's shards (:func:`progtrain.train.distributed.save_sharded`): DCP files
                      (FSDP2) or a DeepSpeed checkpoint (ZeRO-3); Adam's step is in state.json (opt_step)

with the other files as above. ``--resume`` reads them back with the same engine
(:meth:`~progtrain.train.distributed.Engine.load_sharded`); :func:`load_full_model` consolidates one
in a single process. A stage boundary's checkpoint is written from the grown model's shards.

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
#: a sharded checkpoint's directories: the engine's shards, the model's config
SHARDED_DIR, CONFIG_DIR = "sharded", "config"
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

    @property
    def sharded(self) -> bool:
        """Whether the model and optimizer state are engine shards (``sharded/``, no ``moments``)."""
        return (self.path / SHARDED_DIR).is_dir()

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
    with atomic_dir(final, overwrite=True) as tmp:
        model.save_pretrained(tmp / "model", safe_serialization=True)
        torch.save({"moments": moments, "step": int(opt_step)}, tmp / "optimizer.pt")
        _write_rest(tmp, state, rng)
    logger.info("checkpoint saved: %s", final)
    return final


def _write_rest(tmp: Path, state: dict, rng: list[dict]) -> None:
    """The tensor maps, the RNG streams and state.json of a checkpoint into ``tmp``."""
    for key, file in TENSOR_MAPS.items():
        if state.get(key) is not None:
            torch.save(state[key], tmp / file)
    torch.save(rng, tmp / "rng.pt")
    json_state = {k: v for k, v in state.items() if k not in TENSOR_MAPS}
    (tmp / "state.json").write_text(json.dumps(json_state, indent=1, default=json_default))


def save_sharded_checkpoint(output_dir: str | os.PathLike, *, engine: Any, model: Any, opt_step: int,
                            state: dict, rng: list[dict] | None) -> Path:
    """Write one checkpoint of a sharded engine (ZeRO-3, FSDP2) atomically: every rank writes its own
    shard into the same temporary directory (``engine.save_sharded``, no full gather), then the main
    process adds the unwrapped ``model``'s config and generation config (no weights), the tensor
    maps, ``rng`` and state.json and renames the directory into place. Collective: every rank calls it (``state``/``rng`` are read on the main
    process only); the directory must be on a file system every rank sees. Returns its path.

    ``state`` as for :func:`save_checkpoint`; ``opt_step`` (Adam's step count) goes into state.json."""
    from contextlib import ExitStack

    from accelerate.utils import broadcast_object_list

    acc = engine.accelerator
    final = checkpoint_dir(output_dir, int(state["step"])) if acc.is_main_process else None
    with ExitStack() as stack:
        name = [str(stack.enter_context(atomic_dir(final, overwrite=True))) if acc.is_main_process else None]
        broadcast_object_list(name, from_process=0)
        tmp = Path(name[0])
        engine.save_sharded(tmp / SHARDED_DIR)
        acc.wait_for_everyone()  # every shard on disk before the directory is completed and renamed
        if acc.is_main_process:
            gen = getattr(model, "generation_config", None)
            model.config.save_pretrained(tmp / CONFIG_DIR)
            if gen is not None:
                gen.save_pretrained(tmp / CONFIG_DIR)
            _write_rest(tmp, {**state, "opt_step": int(opt_step)}, rng)
    acc.wait_for_everyone()
    if acc.is_main_process:
        logger.info("sharded checkpoint saved: %s", final)
    return checkpoint_dir(output_dir, int(state["step"]))


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a checkpoint's state, moments, tensor maps and RNG (model weights are loaded by the caller
    from ``path/model``; a sharded checkpoint has ``moments`` None, its state in ``path/sharded``)."""
    p = Path(path)
    maps = {k: torch.load(p / f, weights_only=True) if (p / f).exists() else None for k, f in TENSOR_MAPS.items()}
    rng = torch.load(p / "rng.pt", weights_only=True) if (p / "rng.pt").exists() else None
    state = json.loads((p / "state.json").read_text())
    moments = None
    if not (p / SHARDED_DIR).is_dir():
        opt = torch.load(p / "optimizer.pt", weights_only=True, map_location="cpu")
        state["opt_step"], moments = int(opt["step"]), opt["moments"]
    return Checkpoint(p, state, moments, maps["births"], maps["scales"], rng, maps["lr_scales"])


def load_full_model(path: str | os.PathLike, task: str | None = None) -> Any:
    """The full model of a checkpoint in one process (fp32, CPU): ``path/model`` as it is, or a
    sharded checkpoint's shards consolidated (:func:`progtrain.train.distributed.full_weights_from_shards`).
    ``task`` as for :func:`progtrain.io.load_model`
    (None: from the config's ``architectures``).

    Raises:
        ProgtrainConfigError: a sharded checkpoint from an engine this function cannot read."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, GenerationConfig

    from ..errors import ProgtrainConfigError
    from ..io import load_model, model_class_for
    from .distributed import full_weights_from_shards

    p = Path(path)
    if not (p / SHARDED_DIR).is_dir():
        return load_model(str(p / "model"), task=task, dtype="float32")
    weights = full_weights_from_shards(p / SHARDED_DIR, json.loads((p / "state.json").read_text()).get("engine"))
    config = AutoConfig.from_pretrained(p / CONFIG_DIR)
    with init_empty_weights(include_buffers=False):  # buffers as the class computes them (e.g. rotary inv_freq)
        model = model_class_for(config, task)(config)
    model.load_state_dict(weights, strict=False, assign=True)
    model.tie_weights()
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise ProgtrainConfigError(f"{p}: the shards lack {left[:5]}; the checkpoint is incomplete")
    if (p / CONFIG_DIR / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(p / CONFIG_DIR)
    return model.float().eval()


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
