"""The progressive pretraining loop.

One code path for one CPU process, DDP and DeepSpeed ZeRO-1/2/3: everything that depends on the
process/engine layout goes through :class:`progtrain.train.distributed.Engine`, so the loop reads as a
plain Accelerate loop (torchtitan's ``train.py`` shape)::

    run:  setup -> restore or init -> loaders -> logs -> for each step: grow if due -> train_step
          -> log -> evaluate -> checkpoint -> finish
    train_step:  for each micro-batch: forward -> backward -> (at the accumulation boundary) step

Everything that must survive a restart lives in one :class:`TrainState` (``state_dict()`` /
``load_state_dict()``). At each stage boundary::

    evaluate -> gather_full_state -> progtrain.grow -> optimizer surgery on the moments (stage option
    ``moments``) -> release -> new optimizer + scheduler -> prepare -> load_moments -> growth masks
    (stage option ``mask_steps``, :mod:`progtrain.train.masks`) -> evaluate
    -> checkpoint of the grown state (from the growth's result, not gathered back; under ZeRO-3 /
    FSDP2 from the grown model's shards, each rank its own) -> continue

The LR schedule is per run (linear warm-up, then cosine/linear/constant to ``min_lr_ratio`` at
``max_steps``) and a pure function of the global optimizer step, optionally re-warmed after a
growth. Data order depends only on the seed and the step (:mod:`progtrain.train.data`), so a run
resumed from any checkpoint follows the uninterrupted run's path.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from ..quiet import deepspeed_probe_off, transformers_bars_off

deepspeed_probe_off()  # before accelerate imports DeepSpeed: no accelerator banner on stdout

from accelerate.utils import gather_object, set_seed  # noqa: E402
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from ..arch import get_adapter
from ..arch.base import iter_params
from ..errors import ProgtrainConfigError, TrainingDivergedError
from ..growth import grow
from ..growth.calibration import fit_problems, input_limits
from ..hub import push_to_hub
from ..init import get_strategy
from ..io import atomic_write_text, load_model, model_class_for, remove_if_empty, save_checkpoint
from . import checkpoint as ckpt
from .config import RunConfig, StageConfig, check_trackers, initial_hf_config, schedule_changes
from .data import RunData, prepare_data
from .distributed import Engine, FullState, build_accelerator
from .masks import GrowthMasks, is_empty, layer_mask_spec, mask_spec
from .flops import flops_per_token, meta_model, stage_configs, total_params
from .lr_scales import compute_lr_scales, update_birth_stages
from .report import MetricsLog, format_stage_table, model_card, perplexity, plot_loss_vs_flops, read_metrics, stage_rows
from .surgery import grow_moments, update_scales
from .trainable import apply_trainable

logger = logging.getLogger(__name__)
#: what a user of the command line needs to read as the run goes (resume, growths, interruption): the CLI
#: shows it on stderr (progtrain.cli.console_logging); library users see it at INFO like any log
console = logging.getLogger("progtrain.console")


# ---------------------------------------------------------------------- pieces
def lr_factor(cfg: RunConfig, step: int) -> float:
    """LR multiplier of optimizer step ``step`` (0-based): warm-up, decay over the whole run, and the
    re-warm of the stage that contains ``step`` (if it asks for one)."""
    o, total = cfg.optim, cfg.train.max_steps
    if o.warmup_steps and step < o.warmup_steps:
        f = (step + 1) / o.warmup_steps
    else:
        t = (step - o.warmup_steps) / max(1, total - o.warmup_steps)
        t = min(max(t, 0.0), 1.0)
        if o.schedule == "cosine":
            f = o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
        elif o.schedule == "linear":
            f = 1 - (1 - o.min_lr_ratio) * t
        else:
            f = 1.0
    stage = cfg.stage_at(step)
    if stage > 0:
        st = cfg.stages[stage - 1]
        since = step - st.start_step
        if st.rewarm_steps and since < st.rewarm_steps:
            f *= (since + 1) / (st.rewarm_steps + 1)
    return f


def build_initial_model(cfg: RunConfig, tokenizer: Any) -> PreTrainedModel:
    """The stage-0 model: the given checkpoint, or a fresh model of ``model.family`` with the
    tokenizer's vocabulary and special-token ids (fp32, seeded by ``cfg.seed``)."""
    masked = cfg.model.task == "masked_lm"
    if cfg.model.checkpoint:
        # the run's blocks (and the calibration batches of data-driven growth, drawn from them) must fit
        # fp32 master weights whatever the checkpoint's dtype (mixed precision runs autocast on top)
        model, info = load_model(cfg.model.checkpoint, task=cfg.model.task, dtype="float32", output_loading_info=True)
        missing = set(info.get("missing_keys") or ())
        model.progtrain_fresh = sorted(n for n, _ in iter_params(model) if n in missing)
        if model.progtrain_fresh:
            logger.info("model.checkpoint has no %s: initialised by the run", ", ".join(model.progtrain_fresh))
        problems = fit_problems(input_limits(model), cfg.data.seq_len, tokenizer, masked=masked)
        if problems:
            raise ProgtrainConfigError(
                f"model.checkpoint {cfg.model.checkpoint} does not fit the run's data: {'; '.join(problems)}: "
                f"lower data.seq_len, or set data.tokenizer to the checkpoint's tokenizer"
            )
        return model
    hf = initial_hf_config(cfg)
    hf.vocab_size = len(tokenizer)
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        tid = getattr(tokenizer, key, None)
        if tid is not None:
            setattr(hf, key, int(tid))
    problems = fit_problems(input_limits(hf), cfg.data.seq_len)
    if problems:
        raise ProgtrainConfigError(
            f"model.config: {'; '.join(problems)} (data.seq_len): raise the model's positions or lower data.seq_len"
        )
    cls = model_class_for(hf, cfg.model.task)
    torch.manual_seed(cfg.seed)
    model = cls(hf)
    hf.architectures = [cls.__name__]
    return model.float()


def make_optimizer(model: PreTrainedModel, cfg: RunConfig) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (norm gains and biases undecayed)."""
    o = cfg.optim
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=o.lr, betas=tuple(o.betas), eps=o.eps)


def evaluate(model: Any, batches: Any, causal: bool, reduce: Any = None) -> float:
    """Mean loss per predicted token (nats) over ``batches``, token-weighted, in eval mode.

    ``causal``: labels are shifted inside the model (the first label of each row is not predicted).
    ``reduce`` (e.g. ``accelerator.reduce``) sums (loss * tokens, tokens) over processes."""
    was = model.training
    model.eval()
    tot = torch.zeros(2, dtype=torch.float64)
    dev = None
    with torch.no_grad():
        for b in batches:
            out = model(**b)
            labels = b["labels"]
            n = (labels[:, 1:] != -100).sum() if causal else (labels != -100).sum()
            tot += torch.stack([out.loss.detach().double().cpu() * n.cpu(), n.cpu().double()])
            dev = out.loss.device
    model.train(was)
    if reduce is not None:
        tot = reduce(tot.to(dev), reduction="sum").cpu()
    return float(tot[0] / tot[1]) if tot[1] > 0 else float("nan")


# ---------------------------------------------------------------------- state that survives a restart
@dataclass
class TrainState:
    """Everything a resumed run needs besides the model and the optimizer's moments (torchtitan's
    ``TrainState``): counters, the data position, the growth history, the per-element maps and this
    process's RNG streams. :meth:`state_dict` is what a checkpoint stores
    (:func:`progtrain.train.checkpoint.save_checkpoint`); :meth:`load_state_dict` restores it.

    Attributes:
        step: optimizer steps taken. The LR schedule, the stage and the growth masks' value are
            functions of it.
        stage: index of the stage being trained (0 = the initial model).
        samples: training sequences consumed, the data position (``step * train.batch_size``).
        tokens: training tokens consumed, all processes together.
        flops: training FLOPs spent (see :mod:`progtrain.train.flops`).
        wall_s: wall-clock seconds of the run before this process started.
        bad_batches: optimizer steps skipped for a non-finite loss.
        history: one growth record per growth so far (``GrowthResult.record`` + stage, name, step).
        births: ``{param name: int8 tensor}``, the stage at which each element was born.
        scales: ``{param name: tensor}``, this stage's ``match_dynamics`` update scales (or None).
        lr_scales: ``{param name: tensor}``, this stage's birth-stage LR scales (stage option
            ``lr_scales``), computed from the grown model at the growth (or None).
        masks: this stage's growth masks (:func:`progtrain.train.masks.mask_spec`: which modules,
            units and layers are masked, from which step, over how many steps; JSON), or None.
        fresh: names (in the current model) of the parameters the starting ``model.checkpoint`` did
            not contain, initialised by the run (``train.trainable: new`` trains them).
    """

    step: int = 0
    stage: int = 0
    samples: int = 0
    tokens: int = 0
    flops: float = 0.0
    wall_s: float = 0.0
    bad_batches: int = 0
    history: list[dict] = field(default_factory=list)
    births: dict[str, torch.Tensor] | None = None
    scales: dict[str, torch.Tensor] | None = None
    lr_scales: dict[str, torch.Tensor] | None = None
    masks: dict | None = None
    fresh: list[str] = field(default_factory=list)
    _t0: float = field(default_factory=time.perf_counter, repr=False)

    def start_clock(self) -> None:
        """Start timing this process's share of :meth:`elapsed`."""
        self._t0 = time.perf_counter()

    def elapsed(self) -> float:
        """Wall-clock seconds of the run so far, earlier processes included."""
        return self.wall_s + (time.perf_counter() - self._t0)

    def advance(self, batch_size: int, tokens: int, flops: float) -> None:
        """Count one optimizer step of ``batch_size`` sequences, ``tokens`` tokens and ``flops`` FLOPs."""
        self.step += 1
        self.samples += batch_size
        self.tokens += tokens
        self.flops += flops

    def state_dict(self) -> dict:
        """JSON-able counters and history, the tensor maps (``births``, ``scales``, ``lr_scales``) and
        this process's RNG states (``rng``, see :func:`progtrain.train.checkpoint.rng_state`)."""
        return {"step": self.step, "stage": self.stage, "samples": self.samples, "tokens": self.tokens,
                "flops": self.flops, "wall_s": self.elapsed(), "bad_batches": self.bad_batches,
                "history": self.history, "births": self.births, "scales": self.scales,
                "lr_scales": self.lr_scales, "masks": self.masks, "fresh": self.fresh, "rng": ckpt.rng_state()}

    def load_state_dict(self, sd: dict) -> None:
        """Restore what :meth:`state_dict` returned (``rng``: this process's entry; None keeps the
        current streams; ``lr_scales`` and ``masks`` None in checkpoints written before they were
        stored)."""
        self.step, self.stage, self.samples = int(sd["step"]), int(sd["stage"]), int(sd["samples"])
        self.tokens, self.flops, self.wall_s = sd["tokens"], sd["flops"], sd["wall_s"]
        self.bad_batches, self.history = sd["bad_batches"], list(sd["history"])
        self.births, self.scales, self.lr_scales = sd.get("births"), sd.get("scales"), sd.get("lr_scales")
        self.masks = sd.get("masks")
        self.fresh = list(sd.get("fresh") or [])
        if sd.get("rng"):
            ckpt.set_rng_state(sd["rng"])
        self.start_clock()


# ---------------------------------------------------------------------- the run
class ProgressiveTrainer:
    """Runs a :class:`RunConfig`. Use :func:`train`."""

    def __init__(self, cfg: RunConfig, resume: bool = False, allow_config_change: bool = False) -> None:
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.resume = resume
        self.allow_config_change = allow_config_change
        check_trackers(cfg.train.trackers)  # a missing tracker package stops here, naming its pip install
        self.state = TrainState()
        self.masks: GrowthMasks | None = None
        self.last_ckpt: str | None = None
        self.val_dl = None
        self._check_output_dir()

    def _check_output_dir(self) -> None:
        if self.resume:
            self._check_resume_schedule()
            return
        if self.out.exists() and any(self.out.iterdir()) and ((self.out / "metrics.jsonl").exists()
                                                              or (self.out / ckpt.CKPT_DIR).exists()):
            raise ProgtrainConfigError(
                f"output directory {self.out} already holds a run: pass --resume to continue it, or another --output-dir"
            )

    def _check_resume_schedule(self) -> None:
        """``--resume`` continues the recorded run: a changed length, batch, LR schedule or stage table
        would silently change its path, so it is refused unless ``allow_config_change``."""
        latest = ckpt.latest_checkpoint(self.out)
        if latest is None:
            return
        old = json.loads((latest / "state.json").read_text()).get("schedule")
        changes = schedule_changes(old, self.cfg.schedule()) if old is not None else []
        if not changes:
            return
        if self.allow_config_change:
            logger.warning("--resume with a changed config (allowed): %s", "; ".join(changes))
            return
        raise ProgtrainConfigError(
            f"--resume: the config differs from the run being resumed ({latest.name}): {'; '.join(changes[:4])}"
            f"{'; ...' if len(changes) > 4 else ''}. The LR schedule and the stage starts depend on it: resume "
            f"with the run's config, or pass --allow-config-change to continue with the new values"
        )

    # .................................................................. the loop
    def run(self, stop_at_step: int | None = None) -> dict:
        """Train to ``train.max_steps`` (or stop after ``stop_at_step`` optimizer steps, for tests
        and time-limited jobs; the last state is checkpointed). Returns a summary dict."""
        with transformers_bars_off():  # no "Writing model shards" bar at every checkpoint
            return self._run(stop_at_step)

    def _run(self, stop_at_step: int | None) -> dict:
        cfg, state = self.cfg, self.state
        created = not self.out.exists()
        try:
            self._setup()
            resumed = self._restore_or_init()
            batches = self._make_loaders()
            self._open_logs(resumed)
        except BaseException:
            if created:  # a failed start leaves no empty output directory behind
                remove_if_empty(self.out)
            raise
        stop = cfg.train.max_steps if stop_at_step is None else min(stop_at_step, cfg.train.max_steps)
        bar = tqdm(total=cfg.train.max_steps, initial=state.step, disable=not self.acc.is_main_process,
                   desc="train", dynamic_ncols=True)
        post: dict = {}  # the progress bar's postfix: training loss, stage, last validation perplexity
        with bar, _on_interrupt(self):
            while state.step < stop:
                if state.stage + 1 < len(self.starts) and state.step == self.starts[state.stage + 1]:
                    self._grow(state.stage + 1)
                train_loss, skipped = self.train_step(batches)
                bar.update(1)
                if state.step % cfg.train.log_interval == 0 or state.step == stop:
                    post.update(loss=f"{train_loss:.4f}", stage=state.stage)
                    bar.set_postfix(post, refresh=False)
                    self._log(event="train", train_loss=None if skipped else train_loss,
                              lr=self.engine.optimizer.param_groups[0]["lr"])
                if self.val_dl is not None and cfg.train.eval_interval and (
                        state.step % cfg.train.eval_interval == 0 or state.step == cfg.train.max_steps):
                    val = self._eval()
                    self._log(event="eval", val_loss=val, val_ppl=perplexity(val))
                    post.update(val_ppl=f"{perplexity(val) or float('nan'):.2f}")  # kept until the next evaluation
                    bar.set_postfix(post, refresh=False)
                if (cfg.train.checkpoint_interval and state.step % cfg.train.checkpoint_interval == 0) or (
                        state.step == stop and stop < cfg.train.max_steps):
                    self._checkpoint()
        if state.step < cfg.train.max_steps:
            return {"stopped_at": state.step, "checkpoint": self.last_ckpt}
        return self._finish()

    def train_step(self, batches: Iterator[dict]) -> tuple[float, bool]:
        """One optimizer step over ``train.grad_accum`` micro-batches: forward, backward, step.

        Returns the training loss (nats per predicted token: the micro-batches' mean losses averaged,
        then averaged over processes; 0.0 for a skipped step) and whether the step was skipped for a
        non-finite loss (no update then; :class:`TrainingDivergedError` past ``train.max_bad_batches``)."""
        cfg, acc, engine, state = self.cfg, self.acc, self.engine, self.state
        self._advance_masks()
        engine.set_update_scales(self._update_scales())
        loss_sum = torch.zeros((), dtype=torch.float64)
        skipped = False
        for _ in range(cfg.train.grad_accum):
            batch = next(batches)  # before accumulate(): the loader flags its last batch when fetching it
            with acc.accumulate(engine.model):
                loss = engine.model(**batch).loss
                skipped = not engine.all_finite(loss) or skipped
                if not skipped:
                    engine.backward(loss)
                    loss_sum += loss.detach().double().cpu()
                    if acc.sync_gradients:
                        engine.step()
                engine.zero_grad()
        if skipped:
            self._skip_step()
        state.advance(cfg.train.batch_size, cfg.tokens_per_step, self.flops_tok * cfg.tokens_per_step)
        engine.scheduler.step()
        return engine.mean(float(loss_sum) / cfg.train.grad_accum), skipped

    def _skip_step(self) -> None:
        """Count a skipped step; raise :class:`TrainingDivergedError` beyond ``train.max_bad_batches``."""
        cfg, state = self.cfg, self.state
        state.bad_batches += 1
        name = f" {cfg.stages[state.stage - 1].name}" if state.stage else ""
        msg = (f"non-finite loss at step {state.step + 1} (stage {state.stage}{name}); last good checkpoint: "
               f"{self.last_ckpt or 'none'}")
        if state.bad_batches > cfg.train.max_bad_batches:
            raise TrainingDivergedError(msg + ". Lower optim.lr or raise optim.warmup_steps, then resume from that "
                                         "checkpoint (--resume), or allow skips with train.max_bad_batches")
        logger.warning("%s: batch skipped (%d of %d allowed)", msg, state.bad_batches, cfg.train.max_bad_batches)

    # .................................................................. setup
    def _setup(self) -> None:
        cfg = self.cfg
        mp = cfg.train.mixed_precision
        if mp == "auto":
            mp = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
        self.acc = acc = build_accelerator(
            mixed_precision=mp, gradient_accumulation_steps=cfg.train.grad_accum,
            deepspeed_config=cfg.train.deepspeed_config, log_with=list(cfg.train.trackers) or None,
            project_dir=str(self.out), gradient_clipping=float(cfg.optim.max_grad_norm),
        )
        self.engine = Engine(acc, max_grad_norm=cfg.optim.max_grad_norm)
        self.world = acc.num_processes
        self.micro_global = cfg.train.batch_size // cfg.train.grad_accum
        if self.micro_global % self.world:
            raise ProgtrainConfigError(
                f"train.batch_size / train.grad_accum = {self.micro_global} sequences per micro-batch cannot be split "
                f"over {self.world} processes: make it a multiple of {self.world}"
            )
        self.micro = self.micro_global // self.world
        self.threads = cpu_threads(self.world) if acc.device.type == "cpu" else None
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        if any(s.lr_scales or s.born_warmup_steps or s.match_dynamics for s in cfg.stages):
            self.engine.check_update_scales()
        self.engine.check_trainable(cfg.train.trainable)
        self.starts = cfg.stage_starts()
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
        with acc.main_process_first():
            self.data: RunData = prepare_data(cfg, self.out)

    def _restore_or_init(self) -> Path | None:
        """Continue from the newest checkpoint (``--resume``) or build the stage-0 model; returns the
        checkpoint resumed from (None for a fresh start)."""
        resumed = ckpt.latest_checkpoint(self.out) if self.resume else None
        if self.resume and resumed is None:
            logger.warning("--resume: no checkpoint in %s, starting from the beginning", self.out)
        if resumed is not None:
            c = ckpt.load_checkpoint(resumed)
            if c.sharded:
                self.engine.check_resume_from_shards(resumed, c.state.get("engine"), c.state.get("world_size"))
            # the RNG streams are restored here, before the rebuild: building the model, the optimizer
            # and the engine draws no random numbers (tests/test_resume.py: bit-identical with dropout)
            self.state.load_state_dict(c.train_state(self.acc.process_index))
            self.last_ckpt = str(resumed)
            if c.sharded:  # ZeRO-3 / FSDP2: every rank reads its own shard into an empty model
                model = self._empty_model(resumed / ckpt.CONFIG_DIR)
                self._build(model, None, 0, empty=True)
                self.engine.load_sharded(resumed / ckpt.SHARDED_DIR)
            else:
                model = load_model(str(resumed / "model"), task=self.cfg.model.task, dtype="float32")
                self._build(model, c.moments, c.state["opt_step"])
            self._enter_stage(model)
            if self.acc.is_main_process:
                st = self.state.stage
                console.info("resumed from step %d (stage %d%s) of %s", self.state.step, st,
                             f" {self.cfg.stages[st - 1].name}" if st else "", resumed)
        else:
            set_seed(self.cfg.seed)
            model = build_initial_model(self.cfg, self.data.tokenizer)
            self.state.births = update_birth_stages(None, model, None, 0)
            self.state.fresh = list(getattr(model, "progtrain_fresh", []))
            self._build(model, None, 0)
        self.state.start_clock()
        return resumed

    def _empty_model(self, config_dir: Path) -> PreTrainedModel:
        """The checkpoint's model class and config, without values (:meth:`Engine.empty_model`)."""
        from transformers import AutoConfig, GenerationConfig

        config = AutoConfig.from_pretrained(config_dir)
        model = self.engine.empty_model(model_class_for(config, self.cfg.model.task), config)
        if (config_dir / "generation_config.json").is_file():
            model.generation_config = GenerationConfig.from_pretrained(config_dir)
        return model

    def _make_loaders(self) -> Iterator[dict]:
        """Prepare the training loader from the data position on, and the held-out one; returns the
        iterator over training micro-batches."""
        cfg, acc = self.cfg, self.acc
        B = cfg.train.batch_size
        loader = torch.utils.data.DataLoader(self.data.train_stream(self.state.samples, (cfg.train.max_steps - self.state.step) * B),
                                             batch_size=self.micro_global, shuffle=False,
                                             generator=torch.Generator().manual_seed(cfg.seed))
        self.train_dl = acc.prepare(loader)
        if cfg.train.eval_interval:
            n_val = min(cfg.train.eval_batches, len(self.data.val_blocks) // self.micro_global) * self.micro_global
            if n_val == 0:
                raise ProgtrainConfigError(
                    f"the held-out split has {len(self.data.val_blocks)} blocks, fewer than one evaluation batch of "
                    f"{self.micro_global}: raise data.val_fraction or set train.eval_interval=0"
                )
            vl = torch.utils.data.DataLoader(self.data.val_set(n_val),
                                             batch_size=self.micro_global, shuffle=False,
                                             generator=torch.Generator().manual_seed(cfg.seed))
            self.val_dl = acc.prepare(vl)
        return iter(self.train_dl)

    def _open_logs(self, resumed: Path | None) -> None:
        """metrics.jsonl (cut back to the checkpoint when resuming), run_info.json, trackers; the start
        row and, on a fresh start, the stage-0 evaluation."""
        cfg, acc, state = self.cfg, self.acc, self.state
        if acc.is_main_process:
            self.metrics = MetricsLog(self.out / "metrics.jsonl", truncate_after_step=state.step if resumed else None,
                                      growth_done=bool(resumed) and state.stage == cfg.stage_at(state.step))
            info = {"world_size": self.world, "engine": self.engine.kind, "device": str(acc.device),
                    "mixed_precision": str(acc.mixed_precision), "micro_batch_per_process": self.micro,
                    "torch_threads": torch.get_num_threads(),
                    "config": cfg.to_dict(), "config_file": cfg.source, "resumed_from": str(resumed) if resumed else None}
            atomic_write_text(self.out / "run_info.json", json.dumps(info, indent=1, default=str))
        if cfg.train.trackers:
            acc.init_trackers("progtrain", config={"max_steps": cfg.train.max_steps, "lr": cfg.optim.lr,
                                                   "batch_size": cfg.train.batch_size, "seq_len": cfg.data.seq_len})
        self._log(event="start", world_size=self.world, engine=self.engine.kind, params=self.n_params,
                  resumed=bool(resumed))
        if resumed is None and self.val_dl is not None:
            val = self._eval()
            self._log(event="eval", val_loss=val, val_ppl=perplexity(val))

    # .................................................................. model state
    def _build(self, model: PreTrainedModel, moments: dict | None, opt_step: int, empty: bool = False) -> None:
        """Optimizer + scheduler for ``model``, prepared; moments loaded when given. ``empty``: ``model``
        holds no values yet (a sharded checkpoint is loaded into the prepared engine next)."""
        cfg = self.cfg
        model.train()
        if cfg.model.task == "causal_lm":
            name_causal_loss(model)
        if cfg.train.gradient_checkpointing:  # a grown model is a new module: enabled again at every build
            # transformers 5 name (gradient_checkpointing_enable is its deprecated alias)
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        self.flops_tok = flops_per_token(model, cfg.data.seq_len)
        self.n_params = total_params(model)
        self._apply_trainable(model)
        opt = make_optimizer(model, cfg)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: lr_factor(cfg, self.state.step))
        self.engine.prepare(model, opt, sched, micro_batch_size=self.micro, empty=empty)
        if moments is not None:
            self.engine.load_moments(moments, opt_step)

    def _apply_trainable(self, model: PreTrainedModel) -> None:
        """``train.trainable``: freeze what does not train (``requires_grad`` False), so the optimizer
        built next holds only the trainable parameters. A model that a growth replaces at this very
        step (a stage at step 0) never trains: it is left as it is (its optimizer is never stepped)."""
        spec, state = self.cfg.train.trainable, self.state
        if spec == "all":
            return
        if state.stage + 1 < len(self.starts) and self.starts[state.stage + 1] == state.step:
            return
        n_train, n_frozen = apply_trainable(model, spec, state.births, state.fresh)
        if self.acc.is_main_process:
            console.info("train.trainable=%s: %s parameters train, %s frozen", spec if isinstance(spec, str) else list(spec),
                         f"{n_train:,}", f"{n_frozen:,}")

    def _stage_config(self) -> StageConfig | None:
        return self.cfg.stages[self.state.stage - 1] if self.state.stage > 0 else None

    def _enter_stage(self, model: PreTrainedModel) -> None:
        """What a stage adds to the plain model, from the state: the birth-stage LR scales (computed
        from ``model`` when the state has none: at the growth, or resuming from an older checkpoint)
        and the growth masks of its new structure, at their value for ``state.step``."""
        st, state = self._stage_config(), self.state
        self.masks = None
        if st is None:
            return
        if st.lr_scales is not None and state.lr_scales is None and state.births is not None:
            state.lr_scales = compute_lr_scales(model, state.births, mode=st.lr_scales.mode,
                                                clamp=tuple(st.lr_scales.clamp), group=st.lr_scales.group)
        if state.masks is None and st.fade_in_steps and state.history:  # a checkpoint from before masks were stored
            positions = state.history[-1].get("new_layer_positions") or []
            state.masks = layer_mask_spec(positions, start_step=st.start_step, steps=st.fade_in_steps) if positions else None
        spec = state.masks
        if not is_empty(spec) and state.step < spec["start_step"] + spec["steps"]:
            self.masks = GrowthMasks(self.acc.unwrap_model(self.engine.model), spec, step=state.step)

    def _advance_masks(self) -> None:
        """Set the growth masks' value for this step; drop them once it reaches 1 (hooks removed)."""
        if self.masks is not None:
            self.masks.set_step(self.state.step)
            self.masks = self.masks if self.masks.active else None

    def _mask_spec(self, st: StageConfig, res: Any) -> dict | None:
        """The growth masks a stage asks for (``mask_steps``: FFN units, heads and layers;
        ``fade_in_steps``: layers only), or None."""
        steps = st.mask_steps or st.fade_in_steps
        if not steps:
            return None
        parts = ("ffn", "heads", "layers") if st.mask_steps else ("layers",)
        spec = mask_spec(res.model, res.param_maps, start_step=st.start_step, steps=steps, parts=parts)
        if st.mask_steps and res.source_sizes.hidden != res.target_sizes.hidden and not getattr(res.maps, "preserve", True):
            logger.warning("stage %s: hidden size %d -> %d is not masked (see progtrain.train.masks); with init %r "
                           "this growth changes the function", st.name, res.source_sizes.hidden,
                           res.target_sizes.hidden, st.init)
        return None if is_empty(spec) else spec

    def _update_scales(self) -> dict[str, torch.Tensor] | None:
        """Per-element update multipliers for this step (None: every element takes the plain AdamW
        update): ``match_dynamics`` scales x birth-stage LR scales x the born elements' warm-up ramp."""
        st, state = self._stage_config(), self.state
        if st is None:
            return None
        base = dict(state.scales) if state.scales is not None else None
        if st.lr_scales is not None and state.births is not None:
            full = state.lr_scales
            base = full if base is None else {n: base[n] * full[n] for n in base}
        since = state.step - st.start_step
        if st.born_warmup_steps and since < st.born_warmup_steps and state.births is not None:
            ramp = since / st.born_warmup_steps
            base = base or {n: torch.ones_like(b, dtype=torch.float32) for n, b in state.births.items()}
            base = {n: torch.where(state.births[n] == state.stage, base[n] * ramp, base[n]) for n in base}
        return base

    # .................................................................. growth
    def _grow(self, idx: int) -> None:
        """Stage boundary: grow the model to stage ``idx``, carry the optimizer state over, rebuild
        the engine, log the growth and checkpoint the grown state."""
        cfg, state = self.cfg, self.state
        st = cfg.stages[idx - 1]
        before = self._eval() if self.val_dl is not None else None
        t0 = time.perf_counter()
        full = self.engine.gather_full_state(main_only=True)  # FSDP2, ZeRO-3: only the main process holds it
        res = self.engine.grow(full, lambda model: self._grow_model(model, st, idx))
        moments = grow_moments(full.moments, res.param_maps, mode=st.moments) if full.moments is not None else {}
        old_shapes = {n: tuple(p.shape) for n, p in full.model.named_parameters()}
        state.births = update_birth_stages(state.births, res.model, res.param_maps, idx)
        fresh = set(state.fresh)
        state.fresh = sorted(n for n, pm in res.param_maps.items() if pm.old_name in fresh)
        state.scales = update_scales(res.param_maps, old_shapes, born_scale=1.0) if st.match_dynamics else None
        state.lr_scales = None
        state.masks = self._mask_spec(st, res)
        state.history.append(dict(res.record, stage=idx, stage_name=st.name, step=state.step))
        # a sharded engine writes the boundary checkpoint from the grown model's shards: nothing is kept
        grown = None if self.engine.sharded_checkpoints else FullState(self.engine.keep_for_save(res.model), moments,
                                                                       full.step)
        step = full.step
        del full
        self.engine.release()
        state.stage = idx
        self._build(res.model, moments, step)
        del moments
        self._enter_stage(res.model)
        # the engine holds the grown model (FSDP2: a sharded copy, ZeRO-3: partitioned in place); the full one is freed
        res.model = None
        growth_s = time.perf_counter() - t0  # gather, grow, optimizer surgery, rebuild; not the two evaluations
        after = self._eval() if self.val_dl is not None else None
        # exact: the grown model's measured deviation without masks; masked: new structure enters through masks
        self._log(event="growth", name=st.name, val_loss_before=before, val_loss_after=after, exact=res.exact,
                  masked=state.masks is not None,
                  params=self.n_params, sizes=res.target_sizes.as_dict(), deviation=(res.deviation or {}).get("rel"),
                  growth_s=round(growth_s, 4))
        ramp = (st.mask_steps or st.fade_in_steps) if state.masks is not None else 0
        if ramp and not res.exact:  # the record says what the run did: the unmasked deviation, then the masks
            rec = state.history[-1]
            rec["mask_steps"] = ramp
            measured = f"; validation loss right before / after the growth {before:.4f} / {after:.4f}" if before is not None else ""
            rec["notes"] = [n for n in rec.get("notes") or [] if "fade_in_steps" not in n] + [
                f"the deviation is the unmasked grown model's: in training the new structure entered through masks "
                f"ramped 0 -> 1 over {ramp} steps{measured}"]
        if self.acc.is_main_process:
            dev = f"deviation {(res.deviation or {}).get('rel', float('nan')):.2e}"
            console.info("step %d: grew to stage %d (%s), %s parameters, %s%s", state.step, idx, st.name,
                         f"{self.n_params:,}", "exact" if res.exact else (f"{dev} unmasked, masks ramp over {ramp} steps"
                                                                          if ramp else dev),
                         f"; val loss {before:.4f} -> {after:.4f}" if before is not None else "")
        self._checkpoint(boundary=True, full=grown)

    def _grow_model(self, model: PreTrainedModel, st: StageConfig, idx: int) -> Any:
        """``progtrain.grow`` of the gathered model as stage ``idx`` asks (same result on every rank)."""
        cfg = self.cfg
        strategy = get_strategy(st.init, **(st.init_kwargs or {}))
        data = None
        if strategy.needs_data:
            data = self.data.calibration_batches(st.calib_batches, self.micro_global, self.state.step * cfg.train.batch_size)
        seed = cfg.seed + idx if st.seed is None else st.seed
        return grow(model, st.grow, init=strategy, seed=seed, data=data)

    # .................................................................. helpers
    def _eval(self) -> float:
        return evaluate(self.engine.model, self.val_dl, self.cfg.model.task == "causal_lm", reduce=self.acc.reduce)

    def _log(self, **row: Any) -> None:
        state = self.state
        row.setdefault("step", state.step)
        row.setdefault("stage", state.stage)
        row.setdefault("tokens", state.tokens)
        row.setdefault("flops", state.flops)
        row.setdefault("wall_s", round(state.elapsed(), 3))
        if self.acc.is_main_process:
            line = self.metrics.write(**row)
            if self.cfg.train.trackers:
                self.acc.log({k: v for k, v in line.items() if isinstance(v, (int, float)) and v is not None},
                             step=state.step)

    def _checkpoint(self, boundary: bool = False, full: FullState | None = None) -> None:
        """Checkpoint the run: ``full`` (a stage boundary's grown state) or the engine's state gathered
        now (collective), with the :class:`TrainState` and every rank's RNG streams. A sharded engine
        (ZeRO-3, FSDP2) writes its shards instead, each rank its own, and gathers nothing."""
        if self.engine.sharded_checkpoints:
            sd = self.state.state_dict()
            rng = gather_object([sd.pop("rng")])
            state = {**sd, "boundary": boundary, "world_size": self.world, "engine": self.engine.kind,
                     "schedule": self.cfg.schedule()}
            path = ckpt.save_sharded_checkpoint(self.out, engine=self.engine, model=self.acc.unwrap_model(self.engine.model),
                                                opt_step=self.engine.adam_step(), state=state, rng=rng)
            self.last_ckpt = str(path)
            if self.acc.is_main_process:
                ckpt.prune_checkpoints(self.out, self.cfg.train.keep_checkpoints)
            self.acc.wait_for_everyone()
            return
        full = full if full is not None else self.engine.gather_full_state(main_only=True)
        sd = self.state.state_dict()
        rng = gather_object([sd.pop("rng")])
        if self.acc.is_main_process:
            state = {**sd, "boundary": boundary, "world_size": self.world, "engine": self.engine.kind,
                     "schedule": self.cfg.schedule()}
            path = ckpt.save_checkpoint(self.out, model=full.model, moments=full.moments, opt_step=full.step,
                                        state=state, rng=rng)
            self.last_ckpt = str(path)
            ckpt.prune_checkpoints(self.out, self.cfg.train.keep_checkpoints)
        self.acc.wait_for_everyone()
        del full

    # .................................................................. outputs
    def _finish(self) -> dict:
        """The final model (with card, metrics and plot), the run's README.md and stage table; the Hub
        push when the config asks for one. Returns the run's summary."""
        cfg, acc, state = self.cfg, self.acc, self.state
        full = self.engine.full_model_for_save()
        summary: dict = {"output_dir": str(self.out), "world_size": self.world, "engine": self.engine.kind}
        if acc.is_main_process:
            self._log(event="end")
            metrics = read_metrics(self.out / "metrics.jsonl")
            plot_loss_vs_flops(metrics, self.out / "loss_vs_flops.png")
            rows = stage_rows(metrics, self._stage_info())
            evals = [m["val_loss"] for m in metrics if m["event"] == "eval" and m.get("val_loss") is not None]
            final = {"val_loss": evals[-1] if evals else None, "perplexity": perplexity(evals[-1] if evals else None),
                     "tokens": state.tokens, "flops": state.flops, "steps": state.step, "wall_s": round(state.elapsed(), 1)}
            history = source_history(cfg.model.checkpoint) + state.history  # the source's growths first
            card = model_card(full.config, history, rows, final, self.data.source, cfg)
            # the final dir carries the run's metrics and plot too, so it is complete for the Hub
            extra = {"README.md": card, "metrics.jsonl": (self.out / "metrics.jsonl").read_text()}
            # a run started from a checkpoint keeps its other files (generation settings travel with
            # the model object; sentence-transformers modules, custom code, ... are carried here)
            save_checkpoint(full, self.out / "final", tokenizer=self._tokenizer_for(full), history=history,
                            extra_files=extra, overwrite=True, carry_from=cfg.model.checkpoint)
            if (self.out / "loss_vs_flops.png").exists():
                shutil.copyfile(self.out / "loss_vs_flops.png", self.out / "final" / "loss_vs_flops.png")
            atomic_write_text(self.out / "README.md", card)
            print("\n" + format_stage_table(rows))
            loss = "n/a" if final["val_loss"] is None else f"{final['val_loss']:.4f}"
            ppl = "n/a" if final["perplexity"] is None else f"{final['perplexity']:.3f}"
            print(f"\nfinal validation loss {loss} nats/token, perplexity {ppl}; "
                  f"{state.tokens:,} tokens, {state.flops:.3e} FLOPs, {final['wall_s']} s; model in {self.out / 'final'}")
            summary.update(final=final, stages=rows, model_dir=str(self.out / "final"))
            if cfg.push_to_hub is not None:
                p = cfg.push_to_hub
                summary["pushed"] = push_to_hub(self.out / "final", p.repo_id, private=p.private,
                                                revision=p.revision, commit_message=p.commit_message)
                print(f"pushed to {summary['pushed']}")
        acc.wait_for_everyone()
        if cfg.train.trackers:
            acc.end_training()
        return summary

    def _tokenizer_for(self, model: PreTrainedModel) -> Any:
        """The run's tokenizer with ``model_max_length`` = the positions ``model`` serves, so that
        ``pipeline``/``generate`` truncate to what the model can embed instead of failing with an
        index error past it."""
        tok = self.data.tokenizer
        limit = input_limits(model).max_positions
        if tok is not None and limit is not None and tok.model_max_length > limit:
            tok.model_max_length = int(limit)
        return tok

    def _stage_info(self) -> list[dict]:
        confs = stage_configs(self.cfg, self.data.tokenizer and len(self.data.tokenizer))
        out = []
        for i, c in enumerate(confs):
            out.append({"stage": i, "name": "initial" if i == 0 else self.cfg.stages[i - 1].name,
                        "sizes": {k: v for k, v in get_adapter(c).read_sizes(c).as_dict().items() if k != "head_dim"},
                        "params": total_params(meta_model(c, self.cfg.model.task)),
                        "init": "" if i == 0 else self.cfg.stages[i - 1].init})
        return out


def source_history(checkpoint: str | None) -> list[dict]:
    """The growth history saved with the run's starting ``model.checkpoint`` (``progtrain_growth.json``,
    local directory or hub id; [] for a fresh model or a checkpoint progtrain never grew). A run's
    final history is this list followed by the run's own growths."""
    if not checkpoint:
        return []
    from ..io import GROWTH_FILE, read_growth_history

    if Path(checkpoint).exists():
        return read_growth_history(checkpoint)
    try:
        from huggingface_hub import hf_hub_download

        return read_growth_history(Path(hf_hub_download(checkpoint, GROWTH_FILE)).parent)
    except Exception as e:  # no such file in the repo (never grown), or offline with nothing cached
        logger.info("no growth history for model.checkpoint %s (%s)", checkpoint, type(e).__name__)
        return []


def name_causal_loss(model: PreTrainedModel) -> None:
    """Set ``model.loss_type = "ForCausalLM"`` where transformers left it None: transformers 5 derives it
    from the class name, GPT2LMHeadModel's matches nothing, and every forward with labels then warned
    "loss_type=None ... Using the default loss: ForCausalLMLoss" (the same loss, named here)."""
    if getattr(model, "loss_type", "") is None:
        model.loss_type = "ForCausalLM"


def cpu_threads(world_size: int) -> int | None:
    """Intra-op threads for each process of a CPU run when ``OMP_NUM_THREADS`` is unset (None: leave
    torch's choice): the CPUs this process may use, one kept for the rest of the system, shared by
    the processes, at least 1. On a 2-core machine that is 1: measured on the tiny GPT-2 of
    configs/gpt2_tiny_progressive.yaml (widths 64 and 128, batch 16 x 128), one thread ran a step
    3-5x faster than two while the other core was busy."""
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, (cpus - 1) // max(1, world_size))


@contextlib.contextmanager
def _on_interrupt(trainer: ProgressiveTrainer) -> Iterator[None]:
    """On Ctrl-C: say where the run stopped and how to continue it, then let the interrupt through."""
    try:
        yield
    except KeyboardInterrupt:
        if trainer.acc.is_main_process:
            console.info("interrupted at step %d (stage %d); the last checkpoint is %s: run the same command with "
                         "--resume to continue from it", trainer.state.step, trainer.state.stage,
                         trainer.last_ckpt or "none (the run restarts from step 0)")
        raise


def train(cfg: RunConfig, resume: bool = False, stop_at_step: int | None = None,
          allow_config_change: bool = False) -> dict:
    """Run a progressive pretraining config end to end (see :class:`ProgressiveTrainer`).

    ``resume``: continue from the newest checkpoint in the output directory; a config whose
    :meth:`~progtrain.train.config.RunConfig.schedule` differs from the checkpoint's raises
    :class:`~progtrain.errors.ProgtrainConfigError` unless ``allow_config_change``.

    Returns a summary: output directory, world size, engine kind, final metrics and stage rows."""
    return ProgressiveTrainer(cfg, resume=resume, allow_config_change=allow_config_change).run(stop_at_step=stop_at_step)
