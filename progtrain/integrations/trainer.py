r"""Progressive training inside ``transformers.Trainer``: :class:`ProgressiveTrainer`.

A drop-in ``Trainer`` subclass that applies a progtrain growth schedule while it trains::

    trainer = ProgressiveTrainer(
        model=model, args=TrainingArguments(..., max_steps=600), train_dataset=ds,
        stages=[{"start_step": 200, "grow": {"hidden_size": 128, "num_heads": 8}},
                {"start_step": 400, "grow": {"num_layers": 4}, "rewarm_steps": 20}],
    )
    trainer.train()

``stages`` takes the entries of a run YAML's ``stages:`` list (:class:`progtrain.train.config.StageConfig`
fields; :func:`load_stages` reads them from a run YAML), so one schedule serves ``progtrain train`` and
``Trainer``.

**What happens at a growth.** At the first micro-batch of optimizer step ``start_step`` (the
gradients are zero there) :meth:`ProgressiveTrainer.training_step` grows the model with
:func:`progtrain.grow` and then:

- **the model object is kept**: the grown model's child modules and its config are moved into the
  ``PreTrainedModel`` that ``Trainer`` holds (``Trainer._inner_training_loop`` keeps that object in a
  local variable, so it cannot be replaced); under DDP the ``DistributedDataParallel`` wrapper is
  rebuilt in place (its ``__init__`` is run again on the same object, which re-buckets the grown
  parameters and broadcasts rank 0's weights);
- **the optimizer object is kept**: each parameter group's ``params`` are swapped for the grown
  parameters (in ``named_parameters`` order, each in the group of its source parameter, which is the
  order ``Trainer.create_optimizer`` gives a fresh model of the grown size, so a saved
  ``optimizer.pt`` loads into it on resume), Adam's moments are carried with
  :func:`progtrain.train.surgery.grow_moments` (old elements keep theirs at their new positions, times
  the copy factor ``c = 1/(k s)`` derived there; born elements start at zero) and the step count is
  kept;
- **the LR scheduler object is kept**, so the LR continues on the run-wide schedule
  (``TrainingArguments.lr_scheduler_type`` over ``max_steps``); a stage's ``rewarm_steps`` multiplies
  it by ``(since + 1) / (rewarm_steps + 1)`` for the first ``rewarm_steps`` steps of the stage, as in
  ``progtrain train``.

**Per-stage options.** ``grow``, ``init``, ``init_kwargs``, ``seed``, ``rewarm_steps``,
``fade_in_steps`` (MSG-style fade-in of new blocks, :mod:`progtrain.train.masks`), ``moments``
(:func:`~progtrain.train.surgery.grow_moments`) and
``calib_batches`` (batches of the training set handed to data-driven init strategies) are honoured;
a stage starts at ``start_step`` or at ``start`` (a fraction of ``TrainingArguments.max_steps``, rounded to the
nearest step as in ``progtrain train``: :func:`progtrain.train.config.fraction_to_step`).
``lr_scales``, ``born_warmup_steps``, ``match_dynamics`` (per-element update scales that would have to
survive ``Trainer``'s checkpoints), ``mask_steps`` and ``start_tokens`` are refused with an error naming the option.

**Checkpoint / resume.** ``Trainer``'s own checkpoints hold the grown model (its ``config.json`` has
the grown sizes). :meth:`ProgressiveTrainer.train` with ``resume_from_checkpoint`` reads the
checkpoint's step, checks that its config has the sizes the schedule gives that step, and rebuilds
the model at that size (a fresh model of the same class from the checkpoint's config, moved into the
model object) before ``Trainer`` loads the weights, optimizer and scheduler. A checkpoint saved at a
growth step holds the model *before* that growth (the growth runs at the start of the step), and
the resumed run grows it again at the same point. Resumed runs match uninterrupted ones to the bit
on CPU (tests/test_trainer_integration.py).

**Not supported**: DeepSpeed and FSDP (their engines own flat copies of the parameters; use
``progtrain train``), ``model_init`` and an optimizer passed in through ``optimizers=`` (the
optimizer must be one ``Trainer`` builds, so a resume can rebuild it at the grown size), optimizers
other than Adam/AdamW without AMSGrad, ``nn.DataParallel`` (several GPUs in one process).

**transformers version.** Written against transformers 5.24.0 (``trainer.py``). Overridden:
``Trainer.__init__``, ``train``, ``training_step``, ``create_optimizer``, ``create_scheduler``
(public methods). Read: ``Trainer.model_wrapped``, ``is_deepspeed_enabled``, ``is_fsdp_enabled``,
``optimizer`` / ``lr_scheduler`` / ``state`` / ``accelerator`` (public attributes),
``Accelerator.ddp_handler`` (public), the ``torch.optim.Optimizer`` ``param_groups`` / ``state``, the
``DistributedDataParallel`` attributes ``device_ids``, ``output_device``, ``process_group`` and
``require_backward_grad_sync``, and ``config._attn_implementation`` (to rebuild a model with the
attention kernel it had). No private ``Trainer`` method or attribute is used.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import torch
from transformers import PreTrainedModel, Trainer
from transformers.trainer_callback import TrainerState
from transformers.trainer_utils import get_last_checkpoint

from ..arch import get_adapter
from ..arch.base import iter_params
from ..errors import ProgtrainConfigError
from ..growth.spec import GrowthSpec, plan_growth
from ..train.config import StageConfig, _build, fraction_to_step, read_run_yaml
from ..train.surgery import MOMENT_KEYS, MOMENT_MODES, grow_moments

logger = logging.getLogger(__name__)

TRAINER_STATE_NAME = "trainer_state.json"  # transformers.trainer.TRAINER_STATE_NAME

#: StageConfig options ProgressiveTrainer cannot honour, with the reason given in the error
_UNSUPPORTED = {
    "lr_scales": "per-birth-stage update scales",
    "born_warmup_steps": "per-element update ramps",
    "match_dynamics": "per-element update scales",
    "mask_steps": "masks of new FFN units and heads kept in the run's state; fade_in_steps masks new layers",
}


def load_stages(path: str | os.PathLike) -> list[dict]:
    """The ``stages:`` list of a progtrain run YAML (for ``ProgressiveTrainer(stages=...)``).

    Raises:
        ProgtrainConfigError: the file is missing, is not YAML, has no ``stages`` list, or sets
            ``train.trainable`` other than ``all`` (ProgressiveTrainer does not apply it: a grown
            parameter trains when its source trained).
    """
    p = Path(path)
    d = read_run_yaml(p)
    trainable = (d.get("train") or {}).get("trainable", "all") if isinstance(d, dict) else "all"
    if trainable not in ("all", None):
        raise ProgtrainConfigError(
            f"{p}: train.trainable={trainable!r} is not applied by ProgressiveTrainer (a grown parameter trains "
            f"when its source trained, so new blocks copied from frozen ones stay frozen): run it with `progtrain "
            f"train`, or remove train.trainable and freeze parameters yourself (requires_grad_(False))"
        )
    stages = d.get("stages") if isinstance(d, dict) else None
    if not isinstance(stages, list) or not stages:
        raise ProgtrainConfigError(f"{p} has no stages: list (the growth schedule); add one or pass stages= directly")
    return stages


def _parse_stage(i: int, entry: Any, max_steps: int) -> StageConfig:
    """One ``stages:`` entry as a StageConfig with ``start_step`` resolved; refuses what Trainer cannot do."""
    if isinstance(entry, StageConfig):
        entry = dataclasses.asdict(entry)
    if not isinstance(entry, dict):
        raise ProgtrainConfigError(f"stages[{i}] must be a mapping like {{start_step: 200, grow: {{hidden_size: 128}}}}, "
                                   f"got {type(entry).__name__}")
    d = dict(entry)
    fields = {f.name for f in dataclasses.fields(StageConfig)}
    frac = d.get("start")
    if "start" not in fields:
        d.pop("start", None)
    st = _build(StageConfig, d, f"stages[{i}]")
    name = st.name or f"stage{i + 1}"
    st.name = name
    for key, what in _UNSUPPORTED.items():
        if getattr(st, key, None):
            raise ProgtrainConfigError(
                f"stages[{i}] ({name}).{key}: ProgressiveTrainer does not support {key} ({what}); remove it, or "
                f"train with `progtrain train` which does"
            )
    if st.moments not in MOMENT_MODES:
        raise ProgtrainConfigError(f"stages[{i}] ({name}).moments={st.moments!r} is not one of {', '.join(MOMENT_MODES)}")
    if st.start_tokens is not None:
        raise ProgtrainConfigError(
            f"stages[{i}] ({name}).start_tokens: ProgressiveTrainer counts optimizer steps; give start_step, or start "
            f"(a fraction of TrainingArguments.max_steps)"
        )
    given = [k for k, v in (("start_step", st.start_step), ("start", frac)) if v is not None]
    if len(given) != 1:
        raise ProgtrainConfigError(f"stages[{i}] ({name}): give exactly one of start_step or start (a fraction of the run)")
    if frac is not None:
        fraction_to_step(frac, 1, f"stages[{i}] ({name}).start")  # refuses a non-fraction before max_steps is asked
        if max_steps <= 0:
            raise ProgtrainConfigError(
                f"stages[{i}] ({name}).start={frac} is a fraction of the run: set TrainingArguments.max_steps, or give "
                f"start_step"
            )
        st.start_step = fraction_to_step(frac, max_steps, f"stages[{i}] ({name}).start")
        st.start = None
    if isinstance(st.start_step, bool) or not isinstance(st.start_step, int) or st.start_step < 1:
        raise ProgtrainConfigError(f"stages[{i}] ({name}).start_step must be a positive integer, got {st.start_step!r}")
    for key in ("rewarm_steps", "fade_in_steps", "calib_batches"):
        v = getattr(st, key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ProgtrainConfigError(f"stages[{i}] ({name}).{key} must be a non-negative integer, got {v!r}")
    if not isinstance(st.grow, (dict, GrowthSpec)) or not st.grow:
        raise ProgtrainConfigError(f"stages[{i}] ({name}): grow must map sizes to grow (e.g. grow: {{hidden_size: 128}})")
    return st


def _spec(st: Any) -> GrowthSpec:
    """A stage's growth request as a :class:`GrowthSpec` (run configs already hold one; a dict is converted)."""
    return st.grow if isinstance(st.grow, GrowthSpec) else GrowthSpec.from_dict(dict(st.grow))


def _rng_fork() -> contextlib.AbstractContextManager:
    """Leave the global RNGs as they were (growth and rebuilds must not shift the data order)."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    return torch.random.fork_rng(devices=devices)


class ProgressiveTrainer(Trainer):
    """A ``transformers.Trainer`` that grows its model on a progtrain schedule (see the module docstring).

    Args:
        *args, **kwargs: those of ``transformers.Trainer``; ``model`` is the initial (stage-0)
            ``PreTrainedModel`` of a family progtrain supports.
        stages: the growth schedule: ``stages:`` entries of a run YAML (dicts, or
            :class:`~progtrain.train.config.StageConfig`), each with ``start_step`` (an optimizer step,
            > 0) or ``start`` (a fraction of ``TrainingArguments.max_steps``) and ``grow``
            (:class:`~progtrain.growth.GrowthSpec` keys), in order.

    Attributes:
        stages: the parsed schedule (``start_step`` resolved).
        stage: the index of the stage the model is in (0 = the initial model).
        growth_history: one record per growth done by this object (``progtrain.grow``'s record plus
            ``stage``, ``stage_name``, ``step``).

    Raises:
        ProgtrainConfigError: a bad or unsupported stage option, sizes the family's config rejects, an
            unknown init strategy, DeepSpeed/FSDP, ``model_init``, ``optimizers=``, or several GPUs in
            one process, all before training.
    """

    def __init__(self, *args: Any, stages: Sequence[Any] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.model_init is not None:
            raise ProgtrainConfigError("ProgressiveTrainer does not support model_init: pass the initial model as model=")
        if self.optimizer is not None or self.lr_scheduler is not None:
            raise ProgtrainConfigError(
                "ProgressiveTrainer builds its own optimizer and scheduler (a resume must rebuild them at the grown "
                "size): drop optimizers=, choose them with TrainingArguments (optim=adamw_torch, lr_scheduler_type=...)"
            )
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise ProgtrainConfigError(
                "ProgressiveTrainer supports one process or DDP; DeepSpeed and FSDP keep flat copies of the parameters "
                "that a growth invalidates: train with `progtrain train` (it rebuilds the engine), or drop "
                "deepspeed=/fsdp= from TrainingArguments"
            )
        if self.args.n_gpu > 1:
            raise ProgtrainConfigError(
                "ProgressiveTrainer does not support nn.DataParallel (several GPUs in one process): launch one process "
                "per GPU with torchrun or accelerate launch"
            )
        if not isinstance(self.model, PreTrainedModel):
            raise ProgtrainConfigError(
                f"ProgressiveTrainer grows a transformers PreTrainedModel, got {type(self.model).__name__}"
            )
        if not stages:
            raise ProgtrainConfigError("ProgressiveTrainer needs stages= (the growth schedule; see load_stages)")
        self.stages = [_parse_stage(i, s, self.args.max_steps) for i, s in enumerate(stages)]
        self._validate_schedule()
        self.stage = 0
        self.growth_history: list[dict] = []
        self._fade = None
        self._fade_start = 0

    # .................................................................. schedule
    def _validate_schedule(self) -> None:
        """Start steps in order inside the run; every growth's sizes (and grown config) valid; init
        strategies known; fade-ins inside their stage."""
        from ..init import get_strategy

        max_steps = self.args.max_steps
        prev = 0
        for i, st in enumerate(self.stages):
            if st.start_step <= prev:
                raise ProgtrainConfigError(
                    f"stages[{i}] ({st.name}) starts at step {st.start_step}, not after the previous stage (step {prev}): "
                    f"list stages in order with strictly increasing start steps"
                )
            if max_steps > 0 and st.start_step >= max_steps:
                raise ProgtrainConfigError(
                    f"stages[{i}] ({st.name}) starts at step {st.start_step}, at or after TrainingArguments.max_steps="
                    f"{max_steps}: start it earlier or raise max_steps"
                )
            prev = st.start_step
            try:
                get_strategy(st.init, **(st.init_kwargs or {}))
            except ProgtrainConfigError as e:
                raise ProgtrainConfigError(f"stages[{i}] ({st.name}): {e}") from None
        for i, st in enumerate(self.stages):
            end = self.stages[i + 1].start_step if i + 1 < len(self.stages) else max_steps
            if st.fade_in_steps and end > 0 and st.start_step + st.fade_in_steps > end:
                raise ProgtrainConfigError(
                    f"stages[{i}] ({st.name}).fade_in_steps={st.fade_in_steps} runs past step {end} (the next stage or "
                    f"max_steps): use at most {end - st.start_step}"
                )
        adapter = get_adapter(self.model)
        hf = self.model.config
        self._sizes = [adapter.read_sizes(hf)]
        self._positions: list[list[int]] = [[]]
        for i, st in enumerate(self.stages):
            try:
                plan = plan_growth(hf, _spec(st), st.init, st.init_kwargs)
            except ProgtrainConfigError as e:
                raise ProgtrainConfigError(f"stages[{i}] ({st.name}): {e}") from None
            hf = plan.target_config
            self._positions.append(list(plan.new_layer_positions))
            self._sizes.append(plan.target_sizes)

    def stage_at(self, step: int) -> int:
        """The stage that optimizer step ``step`` (0-based) trains in: the number of growths with
        ``start_step <= step``."""
        return sum(1 for st in self.stages if st.start_step <= step)

    # .................................................................. Trainer hooks
    def create_optimizer(self, model: Any = None) -> torch.optim.Optimizer:
        """``Trainer.create_optimizer``, then a check that the optimizer's state can be carried
        across a growth (Adam/AdamW without AMSGrad)."""
        opt = super().create_optimizer(model)
        inner = getattr(opt, "optimizer", opt)
        if not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)) or any(g.get("amsgrad") for g in inner.param_groups):
            raise ProgtrainConfigError(
                f"ProgressiveTrainer carries Adam's exp_avg/exp_avg_sq across a growth, and TrainingArguments.optim="
                f"{self.args.optim!r} builds {type(inner).__name__}"
                f"{' with amsgrad' if isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)) else ''}: use "
                f"optim='adamw_torch' (or adamw_torch_fused)"
            )
        return opt

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None) -> Any:
        """``Trainer.create_scheduler`` (the run-wide schedule), times each stage's re-warm ramp
        (``rewarm_steps``): LR(step) *= (since + 1) / (rewarm_steps + 1) for the first
        ``rewarm_steps`` steps of the stage."""
        created = self.lr_scheduler is None
        sched = super().create_scheduler(num_training_steps, optimizer)
        if created and any(st.rewarm_steps for st in self.stages):
            if not isinstance(sched, torch.optim.lr_scheduler.LambdaLR):
                raise ProgtrainConfigError(
                    f"stages' rewarm_steps needs a LambdaLR schedule and lr_scheduler_type={self.args.lr_scheduler_type!r} "
                    f"builds {type(sched).__name__}: use linear, cosine, constant_with_warmup, ... or drop rewarm_steps"
                )
            # the LRs the scheduler set at construction (step 0) need no re-warm factor: stages start at step >= 1
            sched.lr_lambdas = [self._with_rewarm(f) for f in sched.lr_lambdas]
        return sched

    def _with_rewarm(self, base: Any) -> Any:
        stages = self.stages

        def lr_lambda(step: int) -> float:
            f = base(step)
            idx = sum(1 for st in stages if st.start_step <= step)
            if idx > 0:
                st = stages[idx - 1]
                since = step - st.start_step
                if st.rewarm_steps and since < st.rewarm_steps:
                    f *= (since + 1) / (st.rewarm_steps + 1)
            return f

        return lr_lambda

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        """Grow when this micro-batch opens the step a stage starts at, set the fade-in mask of the
        stage's new blocks, then ``Trainer.training_step``."""
        step = self.state.global_step
        while self.stage < len(self.stages) and self.stages[self.stage].start_step <= step:
            self.grow_to_stage(self.stage + 1)
        if self._fade is not None:
            self._fade.set_step(step - self._fade_start)
            if not self._fade.active:
                self._fade = None
        return super().training_step(model, inputs, num_items_in_batch)

    def train(self, resume_from_checkpoint: str | bool | None = None, trial: Any = None,
              ignore_keys_for_eval: list[str] | None = None, **kwargs: Any) -> Any:
        """``Trainer.train``; with ``resume_from_checkpoint`` the model is first rebuilt at the size of
        the checkpoint's stage (see the module docstring).

        Raises:
            ProgtrainConfigError: the checkpoint's model sizes are not those the schedule gives its
                step, or a fresh (non-resumed) run on a model this object already grew.
        """
        ckpt = resume_from_checkpoint
        if ckpt is True:
            ckpt = get_last_checkpoint(self.args.output_dir)
            if ckpt is None:  # Trainer raises its own error
                ckpt = True
        if isinstance(ckpt, (str, os.PathLike)):
            ckpt = str(ckpt)
            self._restore_stage(ckpt)
        elif ckpt in (None, False) and self.stage != 0:
            raise ProgtrainConfigError(
                f"this ProgressiveTrainer already grew its model to stage {self.stage}: resume from a checkpoint "
                f"(train(resume_from_checkpoint=...)) or build a new trainer with the initial model"
            )
        return super().train(resume_from_checkpoint=ckpt, trial=trial, ignore_keys_for_eval=ignore_keys_for_eval, **kwargs)

    # .................................................................. growth
    def _unwrapped(self) -> PreTrainedModel:
        return self.accelerator.unwrap_model(self.model)

    def grow_to_stage(self, idx: int) -> None:
        """Grow the model from stage ``idx - 1`` to stage ``idx`` in place, carrying Adam's moments.

        Called by :meth:`training_step` at the first micro-batch of the stage's ``start_step`` (the
        gradients are zero there); call it yourself only between optimizer steps."""
        from .. import grow
        from ..init import get_strategy

        if idx != self.stage + 1:
            raise ValueError(f"grow_to_stage({idx}) from stage {self.stage}: stages are applied one after another")
        st = self.stages[idx - 1]
        m = self._unwrapped()
        opt = getattr(self.optimizer, "optimizer", self.optimizer)
        old_named = dict(iter_params(m))
        group_of = {id(p): gi for gi, g in enumerate(opt.param_groups) for p in g["params"]}
        moments, step = {}, None
        for name, p in old_named.items():
            s = opt.state.get(p, {})
            if all(k in s for k in MOMENT_KEYS):
                moments[name] = {k: s[k] for k in MOMENT_KEYS}
                step = s.get("step", step)
        strategy = get_strategy(st.init, **(st.init_kwargs or {}))
        data = self._calibration_batches(st.calib_batches) if strategy.needs_data else None
        seed = self.args.seed + idx if st.seed is None else st.seed
        device = next(m.parameters()).device
        with _rng_fork():
            res = grow(m, _spec(st), init=strategy, seed=seed, data=data)
        new = res.model.to(device)
        grown_moments = grow_moments(moments, res.param_maps, mode=st.moments)
        del moments
        self._move_into(m, new)

        # the optimizer: same object and groups, grown parameters, carried moments, same step count
        new_named = dict(iter_params(m))
        by_id = {id(p): n for n, p in new_named.items()}
        groups: list[list[torch.nn.Parameter]] = [[] for _ in opt.param_groups]
        for _, p in m.named_parameters():  # the order Trainer.create_optimizer uses
            name = by_id[id(p)]
            gi = group_of.get(id(old_named[res.param_maps[name].old_name]))
            if gi is None:  # its source was not trained
                p.requires_grad_(False)
            else:
                groups[gi].append(p)
        state: defaultdict = defaultdict(dict)
        for g, params in zip(opt.param_groups, groups):
            g["params"] = params
            for p in params:
                if step is None:
                    continue  # no state yet: Adam initialises it at its next step
                mo = grown_moments[by_id[id(p)]]
                state[p] = {"step": step.clone() if torch.is_tensor(step) else step,
                            **{k: mo[k].to(device=p.device, dtype=p.dtype) for k in MOMENT_KEYS}}
        opt.state = state
        del grown_moments

        self._rewrap_ddp(m)
        self.stage = idx
        self._fade = None
        if st.fade_in_steps and res.record["new_layer_positions"]:
            self._start_fade(idx, since=0)
        record = dict(res.record, stage=idx, stage_name=st.name, step=self.state.global_step)
        self.growth_history.append(record)
        dev = (res.deviation or {}).get("rel")
        logger.info("growth to stage %d (%s) at step %d: %d -> %d parameters%s", idx, st.name, self.state.global_step,
                    record["params_before"], record["params_after"],
                    "" if dev is None else f", max|dlogits| {dev:.2e} of max|logits| ({'exact' if res.exact else 'approximate'})")
        logs = {"growth_stage": float(idx), "num_parameters": float(record["params_after"])}
        if dev is not None:
            logs["growth_rel_dlogits"] = float(dev)
        self.log(logs)

    def _start_fade(self, idx: int, since: int) -> None:
        from ..train.masks import LayerFade

        st = self.stages[idx - 1]
        self._fade = LayerFade(self._unwrapped(), self._positions[idx], st.fade_in_steps)
        self._fade_start = st.start_step
        self._fade.set_step(since)
        if not self._fade.active:
            self._fade = None

    def _move_into(self, m: PreTrainedModel, new: PreTrainedModel) -> None:
        """Give ``m`` (the object Trainer and its wrappers hold) the modules, parameters, buffers and
        config of ``new`` (same class); re-enable activation checkpointing if Trainer turned it on."""
        if type(new) is not type(m):
            raise RuntimeError(f"grown model is a {type(new).__name__}, the trainer's a {type(m).__name__}")
        for name, child in new.named_children():
            setattr(m, name, child)
        for name, p in new.named_parameters(recurse=False):
            setattr(m, name, p)
        for name, b in new.named_buffers(recurse=False):
            setattr(m, name, b)
        m.config = new.config
        if getattr(self.args, "activation_checkpointing", False):
            kw = dict(getattr(self.args, "activation_checkpointing_kwargs", None) or {})
            every, offload = kw.pop("every_n_layers", 1), kw.pop("offload", False)
            m.activation_checkpointing_enable(activation_checkpointing_kwargs=kw or None, every_n_layers=every,
                                              offload=offload)

    def _rewrap_ddp(self, m: PreTrainedModel) -> None:
        """Rebuild the DDP wrapper around the grown ``m`` in place (same object: Trainer's loop holds it)."""
        wrapped = self.model_wrapped
        if not isinstance(wrapped, torch.nn.parallel.DistributedDataParallel):
            return
        sync = wrapped.require_backward_grad_sync
        handler = self.accelerator.ddp_handler
        kwargs = handler.to_kwargs() if handler is not None else {}
        torch.nn.parallel.DistributedDataParallel.__init__(
            wrapped, m, device_ids=wrapped.device_ids, output_device=wrapped.output_device,
            process_group=wrapped.process_group, **kwargs)
        if handler is not None:
            handler.register_comm_hook(wrapped)
        wrapped.require_backward_grad_sync = sync  # inside accelerator.no_sync while accumulating

    def _calibration_batches(self, n: int) -> list[dict]:
        """``n`` batches of the training set for a data-driven init strategy (global RNGs untouched)."""
        if n < 1:
            return []
        with _rng_fork():
            dl = self.get_train_dataloader()
            return [self._prepare_inputs(b) for b in itertools.islice(dl, n)]

    # .................................................................. resume
    def _restore_stage(self, ckpt: str) -> None:
        """Rebuild the model at the size of checkpoint ``ckpt``'s stage (before Trainer loads it)."""
        state_file = os.path.join(ckpt, TRAINER_STATE_NAME)
        if not os.path.isfile(state_file):
            return  # not a Trainer checkpoint: Trainer reports it
        step = TrainerState.load_from_json(state_file).global_step
        # a checkpoint saved at step N holds the model before the growths that start at step N
        idx = sum(1 for st in self.stages if st.start_step < step)
        m = self._unwrapped()
        adapter = get_adapter(m)
        cfg = type(m.config).from_pretrained(ckpt)
        got, want = adapter.read_sizes(cfg), self._sizes[idx]
        if got != want:
            raise ProgtrainConfigError(
                f"checkpoint {ckpt} (step {step}) holds a model of sizes {got.as_dict()}, but the stages put step {step} "
                f"in stage {idx} with sizes {want.as_dict()}: resume with the stages the run was trained with"
            )
        if adapter.read_sizes(m.config) != want or idx != self.stage:
            attn = getattr(m.config, "_attn_implementation", None)
            if attn is not None:
                cfg._attn_implementation = attn
            with _rng_fork():
                new = type(m)(cfg)
            new.to(device=next(m.parameters()).device, dtype=next(m.parameters()).dtype)
            new.train(m.training)
            self._move_into(m, new)
            self.model_wrapped = m
            self.optimizer = self.lr_scheduler = None  # rebuilt by Trainer for the new parameters
            logger.info("resuming from %s (step %d): model rebuilt at stage %d sizes %s", ckpt, step, idx, want.as_dict())
        self.stage = idx
        self._fade = None
        if idx > 0:
            st = self.stages[idx - 1]
            if st.fade_in_steps and self._positions[idx]:
                self._start_fade(idx, since=step - st.start_step)


__all__ = ["ProgressiveTrainer", "load_stages"]
