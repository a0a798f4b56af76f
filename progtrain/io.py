"""Checkpoint I/O: atomic directory writes, safe (safetensors-only) loading, growth history."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import transformers
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

from .errors import ProgtrainConfigError, config_error_text, config_errors

logger = logging.getLogger(__name__)

GROWTH_FILE = "progtrain_growth.json"
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5", "flax_model.msgpack")


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to ``final``; on success rename it to ``final``.

    On any exception the temporary directory is removed and ``final`` is left as it was, so a
    reader never sees a half-written checkpoint. With ``overwrite`` an existing ``final`` is
    replaced (moved aside first, deleted after the rename); without it an existing non-empty
    ``final`` is an error.

    Everything in it gets the permissions the process umask gives a newly created file or
    directory (see :func:`honour_umask`), although ``mkdtemp`` and safetensors create theirs 0700
    and 0600.
    """
    final = Path(final)
    check_output_dir(final, overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        _fsync_dir(tmp)
        honour_umask(tmp)
        old = None
        if final.exists():
            old = final.parent / f".{final.name}.old-{os.getpid()}"
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_output_dir(path: str | os.PathLike, overwrite: bool = False) -> None:
    """Refuse an existing non-empty output directory unless ``overwrite`` (checked before any work).

    Raises:
        ProgtrainConfigError: ``path`` exists, is not empty and ``overwrite`` is False.
    """
    path = Path(path)
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise ProgtrainConfigError(f"output directory {path} exists and is not empty: pass --overwrite or another path")


def atomic_write(final: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Write one file through a temporary file next to ``final`` renamed into place.

    ``write(tmp)`` writes the temporary file (named ``.<final name>.tmp-XXXX<final suffix>``, so a
    writer that picks its format from the suffix, e.g. matplotlib's ``savefig``, sees ``final``'s);
    it is then flushed to disk, given the umask's mode and renamed to ``final``, so a reader sees the
    old file or the whole new one, never half of it. On any exception the temporary file is removed
    and ``final`` is left as it was. Returns ``final``. (A directory: :func:`atomic_dir`.)
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.tmp-", suffix=final.suffix, dir=final.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        honour_umask(tmp)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return final


def atomic_write_text(final: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``final`` atomically (:func:`atomic_write`); returns ``final``."""
    return atomic_write(final, lambda tmp: tmp.write_text(text))


def json_default(o: Any) -> Any:
    """``json.dumps(..., default=json_default)``: arrays and tensors (anything with ``tolist``) as
    lists, everything else as its ``str``."""
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


def current_umask() -> int:
    """The process umask (read from ``/proc/self/status`` where there is one, else set and restored)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(root: str | os.PathLike) -> None:
    """Give ``root`` and everything under it the mode a plain ``mkdir`` / ``open(..., "w")`` would
    have given it under the current umask: directories ``0o777 & ~umask``, files ``0o666 & ~umask``
    (``0o777 & ~umask`` for files that are executable by their owner). Temp-file-and-rename writers
    (``tempfile.mkdtemp``: 0700, safetensors: 0600) otherwise leave outputs unreadable to a shared
    cluster's group. Symbolic links are left alone."""
    mask = current_umask()
    root = Path(root)
    paths = [root] + sorted(root.rglob("*")) if root.is_dir() else [root]
    for p in paths:
        st = p.lstat()
        if stat.S_ISLNK(st.st_mode):
            continue
        full = 0o777 if stat.S_ISDIR(st.st_mode) or st.st_mode & stat.S_IXUSR else 0o666
        want = full & ~mask
        if stat.S_IMODE(st.st_mode) != want:
            os.chmod(p, want)


def _fsync_dir(path: Path) -> None:
    for f in path.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def check_safe_weights(path: str | os.PathLike, task: str | None = None) -> None:
    """Refuse a local checkpoint directory whose weights exist only in pickle-based formats.

    Raises:
        ProgtrainConfigError: one line naming the pickle files and the conversion command
            (:func:`conversion_command`), which loads the checkpoint with its own class so that no
            weight (e.g. an LM head) is dropped.
    """
    p = Path(path)
    if not p.is_dir():
        return
    has_st = any(p.glob("*.safetensors")) or (p / "model.safetensors.index.json").exists()
    pickles = [n for n in PICKLE_WEIGHTS if (p / n).exists()]
    if pickles and not has_st:
        raise ProgtrainConfigError(
            f"{p} has only pickle-based weights ({', '.join(pickles)}); progtrain loads safetensors only. "
            f"Convert once in a trusted environment: {conversion_command(p, task)}"
        )


AUTO_CLASS_FOR_TASK = {
    "causal_lm": "AutoModelForCausalLM",
    "masked_lm": "AutoModelForMaskedLM",
    "base": "AutoModel",
    None: "AutoModel",
}


def conversion_command(path: str | os.PathLike, task: str | None = None) -> str:
    """A Python statement that re-saves the checkpoint at ``path`` with safetensors weights.

    It loads the checkpoint with its own class, ``config.json`` ``architectures[0]`` (a transformers
    class, or custom code through the config's ``auto_map`` with ``trust_remote_code=True``), so
    every weight is kept; only when the config names no class it falls back to the Auto class of
    ``task`` (causal_lm, masked_lm, base), with a hint to pick the task's Auto class."""
    p = str(path)
    try:
        config = json.loads((Path(p) / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    config = config if isinstance(config, dict) else {}
    archs = config.get("architectures") or []
    arch = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else None
    auto_map = config.get("auto_map") if isinstance(config.get("auto_map"), dict) else {}
    cls, extra, hint = None, "", ""
    if arch and hasattr(transformers, arch):
        cls = arch
    elif arch and auto_map:
        keys = [k for k, v in auto_map.items() if k.startswith("AutoModel") and str(v).split(".")[-1] == arch]
        keys = keys or [k for k in auto_map if k.startswith("AutoModel")]
        if keys:
            cls, extra = keys[0], ", trust_remote_code=True"
    if cls is None:
        cls = AUTO_CLASS_FOR_TASK.get(task, "AutoModel")
        if task is None:
            hint = (" (config.json names no architecture: if the checkpoint has a task head, use that task's "
                    "Auto class, e.g. AutoModelForCausalLM, so the head is kept)")
    return f"from transformers import {cls}; {cls}.from_pretrained({p!r}{extra}).save_pretrained({p!r}){hint}"


def model_class_for(config: Any, task: str | None = None) -> type[PreTrainedModel]:
    """The transformers class to load a checkpoint as: ``config.architectures[0]`` when it names a
    transformers class, else the Auto class for ``task`` (causal_lm, masked_lm, base)."""
    archs = getattr(config, "architectures", None) or []
    if archs and hasattr(transformers, archs[0]) and task is None:
        return getattr(transformers, archs[0])
    auto = {
        "causal_lm": transformers.AutoModelForCausalLM,
        "masked_lm": transformers.AutoModelForMaskedLM,
        None: transformers.AutoModel,
        "base": transformers.AutoModel,
    }[task]
    return auto._model_mapping[type(config)]


DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``None`` for ``"auto"``/``None`` (keep the source's dtype), else the ``torch.dtype`` named by
    ``dtype`` (one of :data:`DTYPE_CHOICES`). Raises ProgtrainConfigError for any other value."""
    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, str):
        name = dtype.removeprefix("torch.")
        if name not in DTYPE_CHOICES:
            raise ProgtrainConfigError(f"dtype {dtype!r} is not supported: use one of {', '.join(DTYPE_CHOICES)}")
        return getattr(torch, name)
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ProgtrainConfigError(f"dtype {dtype} is not supported: use one of {', '.join(DTYPE_CHOICES)}")
    return dtype


def load_hf_config(path: str | os.PathLike, task: str | None = None, name: str | None = None) -> PretrainedConfig:
    """The transformers config of the checkpoint at ``path`` (local directory or Hub id), after
    :func:`check_safe_weights`. ``name`` is how messages name ``path`` (e.g. ``"model.checkpoint"``).

    Raises:
        ProgtrainConfigError: one line: pickle-only weights, no loadable config (missing, unreadable,
            not on the Hub), or a config transformers rejects as invalid (:func:`config_error_text`).
    """
    check_safe_weights(path, task)
    where = f"{name} {str(path)!r}" if name else repr(str(path))
    try:
        return AutoConfig.from_pretrained(path)
    except OSError as e:
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise ProgtrainConfigError(
            f"{where}: cannot load a model config ({first}): pass a checkpoint directory or Hub id"
        ) from None
    except config_errors() as e:
        raise ProgtrainConfigError(f"{where}: its config is invalid ({config_error_text(e)}): fix its config.json") from None


def load_model(path: str, task: str | None = None, dtype: str | torch.dtype = "auto", **kwargs: Any) -> PreTrainedModel:
    """Load a checkpoint (local directory or hub id) with safetensors only.

    ``dtype="auto"`` (default) keeps the dtype the checkpoint was saved in (its config's ``dtype``,
    else its weights'), as plain ``transformers`` does; ``"float32"``, ``"bfloat16"``, ``"float16"``
    or a ``torch.dtype`` loads it in that dtype instead.
    """
    config = load_hf_config(path, task)
    cls = model_class_for(config, task)
    want = resolve_dtype(dtype)
    return cls.from_pretrained(path, config=config, use_safetensors=True, dtype=want or "auto", **kwargs)


# files of which a saved tokenizer has at least one (transformers' tokenizer_config.json / tokenizer.json,
# or the vocabulary files of older checkpoints)
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "vocab.json", "vocab.txt", "tokenizer.model",
                   "spiece.model", "sentencepiece.bpe.model")


def load_tokenizer(path: str) -> Any | None:
    """The tokenizer saved with a checkpoint, or None when there is none.

    A local directory without any tokenizer file (``TOKENIZER_FILES``) has none: transformers 5 would
    otherwise build an empty tokenizer from the model config alone (one token, every text -> []).
    """
    if Path(path).is_dir() and not any((Path(path) / f).exists() for f in TOKENIZER_FILES):
        logger.info("no tokenizer files in %s", path)
        return None
    try:
        return transformers.AutoTokenizer.from_pretrained(path)
    except Exception as e:  # no tokenizer files: a model-only checkpoint is fine
        logger.info("no tokenizer loaded from %s (%s)", path, type(e).__name__)
        return None


def read_growth_history(path: str | os.PathLike) -> list[dict]:
    """The growth records saved with a checkpoint (empty list when it was never grown)."""
    f = Path(path) / GROWTH_FILE
    if not f.exists():
        return []
    return list(json.loads(f.read_text()).get("history", []))


def save_checkpoint(
    model: PreTrainedModel,
    out_dir: str | os.PathLike,
    tokenizer: Any | None = None,
    history: list[dict] | None = None,
    extra_files: dict[str, str] | None = None,
    overwrite: bool = False,
    carry_from: str | os.PathLike | None = None,
    max_shard_size: int | str | None = None,
) -> Path:
    """Save a standard HF checkpoint (safetensors) atomically, with tokenizer and growth history.

    Weights above ``max_shard_size`` (bytes or e.g. ``"5GB"``; None: transformers' default, 50 GB)
    are written as several ``model-0000i-of-0000n.safetensors`` with a ``model.safetensors.index.json``
    (``save_pretrained``'s sharding), which ``from_pretrained`` reads as one checkpoint.

    ``history`` is written to ``progtrain_growth.json``; ``extra_files`` maps file names to text
    contents (e.g. a model card ``README.md``). ``carry_from``: the source checkpoint directory
    whose other files (generation settings, tokenizer files when ``tokenizer`` is None,
    sentence-transformers modules with the embedding width updated, custom code, unknown small
    files) are carried into the new checkpoint, decided by :func:`progtrain.carry.plan_carry`;
    files the save writes itself are never overwritten. Returns the final directory.
    """
    from .bake import baked_copy

    model = baked_copy(model)  # parametrised modules are saved as plain tensors
    out = Path(out_dir)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True,
                              **({} if max_shard_size is None else {"max_shard_size": max_shard_size}))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if history is not None:
            from . import __version__

            (tmp / GROWTH_FILE).write_text(
                json.dumps({"progtrain_version": __version__, "history": history}, indent=2, default=json_default)
            )
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        if carry_from is not None and Path(carry_from).is_dir():
            from .carry import carry_files, plan_carry

            try:
                source_config = AutoConfig.from_pretrained(carry_from)
            except (OSError, ValueError) as e:
                raise ProgtrainConfigError(
                    f"carry_from {str(carry_from)!r} has no loadable config.json ({str(e).splitlines()[0]}): "
                    f"pass the source checkpoint directory"
                ) from None
            plan = plan_carry(carry_from, source_config, model.config, tokenizer_saved=tokenizer is not None,
                              card_written="README.md" in (extra_files or {}))
            carry_files(carry_from, tmp, plan)
    logger.info("saved %s to %s", type(model).__name__, out)
    return out


def remove_if_empty(path: str | os.PathLike) -> None:
    """Remove the directory ``path`` when it holds no file (only empty directories, or nothing): what a
    command that failed before writing anything leaves behind."""
    path = Path(path)
    if path.is_dir() and not any(p.is_file() or p.is_symlink() for p in path.rglob("*")):
        shutil.rmtree(path, ignore_errors=True)
