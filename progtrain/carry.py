"""Which files of a source checkpoint directory a grown checkpoint keeps, and why.

A checkpoint directory holds more than weights and ``config.json``: generation settings, tokenizer
files, sentence-transformers modules, custom model code, data cards. Growth invalidates only some of
them. :func:`plan_carry` decides every file of the source directory by one rule table
(:data:`RULES`, first match wins) into one of four actions:

* ``carry``   copied verbatim (the growth does not change it);
* ``update``  copied with the fields that depend on the grown sizes rewritten (e.g. the
  sentence-transformers pooling ``word_embedding_dimension``);
* ``rewrite`` not copied because the save writes a new one (weights, ``config.json``, the growth
  history, the model card, a tokenizer saved from the tokenizer object);
* ``drop``    not copied, because the growth invalidates it (exported weights, training state,
  metrics of the source's run, sentence-transformers modules built for the old width, unknown
  files too large to be anything but weights).

Files matching no rule are carried when small (the decision says so), so nothing a user added is
lost silently. :func:`carry_files` applies a plan inside a checkpoint being written; it never
overwrites a file the save itself wrote. :func:`carry_generation_config` carries the in-memory
generation settings from one model object to a rebuilt one.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

logger = logging.getLogger(__name__)

UNKNOWN_MAX_BYTES = 32 * 1024 * 1024
"""Unknown files up to this size are carried; larger ones are dropped (they are most likely
weights in a format progtrain does not know, which the growth invalidates)."""

ACTIONS = ("carry", "update", "rewrite", "drop")

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.txt",
    "vocab.json", "merges.txt", "*.model", "*.tiktoken", "chat_template.jinja", "chat_template.json",
    "additional_chat_templates/*",
)

# (rule name, path patterns (fnmatch on the relative POSIX path), action, reason). First match wins.
# The sentence-transformers module directories and the hidden-file rule are decided before the
# table (they depend on modules.json and on every path component).
RULES: tuple[tuple[str, tuple[str, ...], str, str], ...] = (
    ("config", ("config.json",), "rewrite", "rebuilt for the grown sizes"),
    ("growth-history", ("progtrain_growth.json",), "rewrite", "growth history, extended with this growth"),
    ("generation", ("generation_config.json",), "carry",
     "generation settings (token ids stay valid: growth does not change the vocabulary)"),
    ("model-card", ("README.md",), "rewrite", "describes the source model: a new model card is written"),
    ("tokenizer", TOKENIZER_FILES, "carry", "tokenizer (growth does not change the vocabulary)"),
    ("sentence-transformers", ("modules.json", "config_sentence_transformers.json", "sentence_bert_config.json"),
     "carry", "sentence-transformers pipeline settings"),
    ("custom-code", ("*.py",), "carry", "custom model code (config auto_map)"),
    ("training-state", ("optimizer.pt", "optimizer.bin", "scheduler.pt", "scaler.pt", "rng_state*.pth", "rng.pt",
                        "trainer_state.json", "training_args.bin", "births.pt", "scales.pt", "state.json",
                        "checkpoint-*/*", "checkpoints/*", "global_step*/*", "runs/*", "wandb/*"),
     "drop", "training state of the source's run: not valid for the grown model"),
    ("metrics", ("metrics.jsonl", "loss_vs_flops.png", "all_results.json", "train_results.json",
                 "eval_results.json"),
     "drop", "metrics of the source's training run (the growth history keeps the source path)"),
    ("exported-weights", ("onnx/*", "openvino/*", "coreml/*", "*.onnx", "*.onnx_data", "*.gguf", "*.tflite",
                          "*.mlmodel", "*.mlpackage/*", "openvino*.xml", "*.ot"),
     "drop", "weights exported for the source sizes: re-export the grown model"),
    ("weights", ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json", "*.h5", "*.msgpack",
                 "*.ckpt", "*.pt", "*.pth"),
     "rewrite", "weights of the source model: the grown weights are saved instead"),
    ("vcs", (".gitattributes",), "carry", "git attributes (LFS patterns)"),
)


@dataclass(frozen=True)
class CarryDecision:
    """What happens to one file of the source directory.

    Attributes:
        path: relative POSIX path in the source directory.
        action: one of :data:`ACTIONS`.
        rule: name of the rule that decided it (``unknown`` for a file no rule knows).
        reason: why, in words (printed by the CLI).
        content: the new text of an ``update``d file (None otherwise).
    """

    path: str
    action: str
    rule: str
    reason: str
    content: str | None = None

    @property
    def carried(self) -> bool:
        """True when the file ends up in the grown checkpoint (verbatim or updated)."""
        return self.action in ("carry", "update")


def _hidden_size(config: Any) -> int:
    from .arch import get_adapter

    return int(get_adapter(config).read_sizes(config).hidden)


def _match(path: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatch(path, p) for p in patterns)


def _read_json(f: Path) -> Any:
    try:
        return json.loads(f.read_text())
    except (OSError, ValueError):
        return None


def _st_modules(root: Path, old_hidden: int, new_hidden: int) -> dict[str, CarryDecision]:
    """Decisions for the files of the sentence-transformers module directories listed in
    ``modules.json``, and for ``modules.json`` itself when a module had to be removed from it."""
    modules = _read_json(root / "modules.json")
    if not isinstance(modules, list):
        return {}
    out: dict[str, CarryDecision] = {}
    kept: list[Any] = []
    removed: list[str] = []
    for m in modules:
        path = str(m.get("path", "")) if isinstance(m, dict) else ""
        kind = str(m.get("type", "")).rsplit(".", 1)[-1] if isinstance(m, dict) else ""
        if not path or Path(path).is_absolute() or ".." in Path(path).parts:
            kept.append(m)  # the transformer itself (files at the top level), or a path outside the directory
            continue
        path = Path(path).as_posix()  # "1_Pooling/" and "./1_Pooling" name the same directory
        d = root / path
        files = sorted(f for f in d.rglob("*") if f.is_file()) if d.is_dir() else []
        rel = [f.relative_to(root).as_posix() for f in files]
        cfg_rel = f"{path}/config.json"
        cfg = _read_json(root / cfg_rel)
        if kind == "Pooling" and isinstance(cfg, dict) and "word_embedding_dimension" in cfg:
            old = cfg["word_embedding_dimension"]
            for r in rel:
                out[r] = CarryDecision(r, "carry", "sentence-transformers", "sentence-transformers pooling module")
            if old != new_hidden:
                cfg = dict(cfg, word_embedding_dimension=new_hidden)
                out[cfg_rel] = CarryDecision(cfg_rel, "update", "sentence-transformers",
                                             f"word_embedding_dimension {old} -> {new_hidden}",
                                             json.dumps(cfg, indent=2) + "\n")
            kept.append(m)
        elif kind == "Normalize" or old_hidden == new_hidden:
            for r in rel:
                out[r] = CarryDecision(r, "carry", "sentence-transformers",
                                       f"sentence-transformers {kind or 'module'} (does not depend on the width)"
                                       if kind == "Normalize" else
                                       f"sentence-transformers {kind or 'module'} (the width is unchanged)")
            kept.append(m)
        else:
            why = (f"sentence-transformers {kind or 'module'} module built for width {old_hidden}, the grown "
                   f"width is {new_hidden}: removed from modules.json; re-create and train it on the grown model")
            for r in rel:
                out[r] = CarryDecision(r, "drop", "sentence-transformers", why)
            removed.append(path)
    if removed:
        out["modules.json"] = CarryDecision("modules.json", "update", "sentence-transformers",
                                            f"module(s) {', '.join(removed)} removed",
                                            json.dumps(kept, indent=2) + "\n")
    return out


def plan_carry(
    src_dir: str | os.PathLike,
    source_config: Any,
    target_config: Any,
    *,
    tokenizer_saved: bool = False,
    card_written: bool = False,
) -> list[CarryDecision]:
    """Decide every file under ``src_dir`` for a checkpoint of ``target_config`` grown from it.

    Args:
        src_dir: the source checkpoint directory (a hub id or missing directory gives ``[]``).
        source_config / target_config: the ``PretrainedConfig`` before and after growth (their
            hidden sizes, read by the family adapter, decide the width-dependent files).
        tokenizer_saved: the save writes the tokenizer from a tokenizer object, so the source's
            tokenizer files are ``rewrite`` (mixing two tokenizers' files would be inconsistent);
            False: they are carried verbatim.
        card_written: the save writes a new ``README.md`` (reason says so); otherwise the source's
            card is still not carried, because it describes the source model.

    Returns:
        One :class:`CarryDecision` per file, sorted by path.
    """
    root = Path(src_dir)
    if not root.is_dir():
        return []
    old_h, new_h = _hidden_size(source_config), _hidden_size(target_config)
    st = _st_modules(root, old_h, new_h)
    out: list[CarryDecision] = []
    for f in sorted(root.rglob("*")):
        if not f.is_file():
            continue
        rel = f.relative_to(root).as_posix()
        parts = rel.split("/")
        if rel in st:
            out.append(st[rel])
            continue
        if any(p.startswith(".") for p in parts) and rel != ".gitattributes":
            out.append(CarryDecision(rel, "drop", "hidden", "hidden file (download cache, lock or temporary file)"))
            continue
        for name, patterns, action, reason in RULES:
            if _match(rel, patterns):
                if name == "tokenizer" and tokenizer_saved:
                    action, reason = "rewrite", "the tokenizer is saved from the tokenizer object"
                elif name == "model-card" and not card_written:
                    action, reason = "drop", ("describes the source model: render a new card with "
                                              "progtrain.card.render_model_card")
                out.append(CarryDecision(rel, action, name, reason))
                break
        else:
            size = f.stat().st_size
            if size <= UNKNOWN_MAX_BYTES:
                out.append(CarryDecision(rel, "carry", "unknown", "not a known checkpoint file: carried as is"))
            else:
                out.append(CarryDecision(
                    rel, "drop", "unknown",
                    f"unknown file of {size / 2**20:.0f} MiB, most likely weights of the source sizes: "
                    f"copy it yourself if it is still valid"))
    return out


def carry_files(src_dir: str | os.PathLike, dst_dir: str | os.PathLike, plan: Sequence[CarryDecision]) -> list[str]:
    """Copy the ``carry`` files and write the ``update`` files of ``plan`` from ``src_dir`` into
    ``dst_dir``; a file the save already wrote there is kept (the saved object's version wins).
    Returns the relative paths written."""
    src, dst = Path(src_dir), Path(dst_dir)
    written: list[str] = []
    for d in plan:
        if not d.carried:
            logger.info("not carried: %s (%s: %s)", d.path, d.action, d.reason)
            continue
        target = dst / d.path
        if target.exists():
            logger.debug("%s written by the save, source copy not carried", d.path)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        if d.action == "update":
            target.write_text(d.content or "")
            logger.info("updated %s: %s", d.path, d.reason)
        else:
            shutil.copyfile(src / d.path, target)
            if d.rule == "unknown":
                logger.info("carried %s as is (not a known checkpoint file)", d.path)
        written.append(d.path)
    # empty module directories (e.g. 2_Normalize) are part of the pipeline too
    modules = _read_json(dst / "modules.json")
    if isinstance(modules, list):
        for m in modules:
            p = m.get("path") if isinstance(m, dict) else None
            if p and (src / p).is_dir():
                (dst / p).mkdir(parents=True, exist_ok=True)
    return written


def carry_generation_config(source: Any, target: Any) -> None:
    """Give ``target`` (a model rebuilt from a config) a copy of ``source``'s generation settings.

    A model built from a config gets a generation config derived from that config, which loses
    what ``generation_config.json`` held (several end-of-sequence ids, sampling defaults,
    ``max_new_tokens``). Nothing happens when either model cannot generate."""
    gc = getattr(source, "generation_config", None)
    if gc is None or not hasattr(target, "generation_config"):
        return
    can = getattr(target, "can_generate", None)
    if callable(can) and not can():
        return
    target.generation_config = copy.deepcopy(gc)
