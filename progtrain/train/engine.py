"""The progressive pretraining loop.

One code path for one CPU process, DDP and DeepSpeed ZeRO-1/2/3: everything that depends on the
process/engine layout goes through :mod:`progtrain.train.distributed`. At each stage boundary::

    evaluate -> gather_full_state -> progtrain.grow -> optimizer surgery on the moments -> release
    -> new optimizer + scheduler -> prepare -> load_moments -> evaluate -> checkpoint -> continue

The LR schedule is per run (linear warm-up, then cosine/linear/constant to ``min_lr_ratio`` at
``max_steps``) and a pure function of the global optimizer step, optionally re-warmed after a
growth. Data order depends only on the seed and the step (:mod:`progtrain.train.data`), so a run
resumed from any checkpoint follows the uninterrupted run's path.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from ..errors import ProgtrainConfigError
from . import checkpoint as ckpt
from .config import RunConfig
from .data import RunData, prepare_data
from .flops import flops_per_token, total_params
from .report import MetricsLog, format_stage_table, model_card, perplexity, plot_loss_vs_flops, read_metrics, stage_rows
from .surgery import grow_moments, update_scales

logger = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """A non-finite loss beyond ``train.max_bad_batches``; the message names the step, the stage and
    the last good checkpoint."""


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
    from ..growth.calibration import fit_problems, input_limits
    from ..io import load_model, model_class_for
    from .config import initial_hf_config

    masked = cfg.model.task == "masked_lm"
    if cfg.model.checkpoint:
        # the run's blocks (and the calibration batches of data-driven growth, drawn from them) must fit
        model = load_model(cfg.model.checkpoint, task=cfg.model.task)
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


def _import_lr_scales():
    try:
        from . import lr_scales
    except ImportError:
        return None
    return lr_scales


# ---------------------------------------------------------------------- the run
class ProgressiveTrainer:
    """Runs a :class:`RunConfig`. Use :func:`train`."""

    def __init__(self, cfg: RunConfig, resume: bool = False) -> None:
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.resume = resume
        self._check_output_dir()

    def _check_output_dir(self) -> None:
        if self.resume:
            return
        if self.out.exists() and any(self.out.iterdir()) and ((self.out / "metrics.jsonl").exists()
                                                              or (self.out / ckpt.CKPT_DIR).exists()):
            raise ProgtrainConfigError(
                f"output directory {self.out} already holds a run: pass --resume to continue it, or another --output-dir"
            )

    # .................................................................. setup
    def _setup(self) -> None:
        from . import distributed as D

        cfg = self.cfg
        mp = cfg.train.mixed_precision
        if mp == "auto":
            mp = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
        self.acc = acc = D.build_accelerator(
            mixed_precision=mp, gradient_accumulation_steps=cfg.train.grad_accum,
            deepspeed_config=cfg.train.deepspeed_config, log_with=list(cfg.train.trackers) or None,
            project_dir=str(self.out), gradient_clipping=float(cfg.optim.max_grad_norm),
        )
        self.D = D
        self.world = acc.num_processes
        self.engine = D.engine_kind(acc)
        self.micro_global = cfg.train.batch_size // cfg.train.grad_accum
        if self.micro_global % self.world:
            raise ProgtrainConfigError(
                f"train.batch_size / train.grad_accum = {self.micro_global} sequences per micro-batch cannot be split "
                f"over {self.world} processes: make it a multiple of {self.world}"
            )
        self.micro = self.micro_global // self.world
        needs_scales = any(s.lr_scales or s.born_warmup_steps or s.match_dynamics for s in cfg.stages)
        if needs_scales and self.engine in ("zero3", "fsdp"):
            raise ProgtrainConfigError(
                f"lr_scales / born_warmup_steps / match_dynamics scale each element's update, which needs full "
                f"parameters on every rank; {self.engine} shards them: use DDP or ZeRO-1/2, or remove those stage options"
            )
        self.lr_scales = _import_lr_scales()
        if needs_scales and self.lr_scales is None:
            raise ProgtrainConfigError(
                "a stage asks for lr_scales / born_warmup_steps / match_dynamics, which need "
                "progtrain.train.lr_scales (not in this build): remove those stage options"
            )
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
        with acc.main_process_first():
            self.data: RunData = prepare_data(cfg, self.out)

    # .................................................................. model state
    def _build(self, model: PreTrainedModel, moments: dict | None, opt_step: int) -> None:
        """Optimizer + scheduler for ``model``, prepared; moments loaded when given."""
        cfg = self.cfg
        model.train()
        self.flops_tok = flops_per_token(model, cfg.data.seq_len)
        self.n_params = total_params(model)
        opt = make_optimizer(model, cfg)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: lr_factor(cfg, self.step))
        self.model, self.opt, self.sched = self.D.prepare(self.acc, model, opt, sched, micro_batch_size=self.micro)
        if moments is not None:
            self.D.load_moments(self.acc, self.model, self.opt, moments, opt_step)
        self._named = dict(self.acc.unwrap_model(self.model).named_parameters())

    def _scaler(self) -> Any:
        """The update scaler for this step (None when every element takes the plain AdamW update)."""
        if self.lr_scales is None:
            return None
        st = self.cfg.stages[self.stage - 1] if self.stage > 0 else None
        scales = None
        if st is not None:
            base = dict(self.stage_scales) if self.stage_scales is not None else None
            if st.lr_scales is not None and self.births is not None:
                full = self._birth_scale_cache
                base = full if base is None else {n: base[n] * full[n] for n in base}
            since = self.step - st.start_step
            if st.born_warmup_steps and since < st.born_warmup_steps and self.births is not None:
                ramp = since / st.born_warmup_steps
                base = base or {n: torch.ones_like(b, dtype=torch.float32) for n, b in self.births.items()}
                base = {n: torch.where(self.births[n] == self.stage, base[n] * ramp, base[n]) for n in base}
            scales = base
        if scales is None:
            return None
        hooks = {}
        if self.engine in ("zero1", "zero2"):  # the optimizer updates DeepSpeed's fp32 partitions
            get_param, set_param = self.lr_scales.zero_param_hooks()
            hooks = {"get_param": get_param, "set_param": set_param}
        return self.lr_scales.UpdateScaler(self.opt, self._named, scales, **hooks)

    # .................................................................. growth
    def _grow(self, idx: int) -> None:
        from .. import grow
        from ..init import get_strategy

        cfg, acc = self.cfg, self.acc
        st = cfg.stages[idx - 1]
        before = self._eval() if self.val_dl is not None else None
        t0 = time.perf_counter()
        full = self.D.gather_full_state(acc, self.model, self.opt)
        strategy = get_strategy(st.init, **(st.init_kwargs or {}))
        data = None
        if strategy.needs_data:
            data = self.data.calibration_batches(st.calib_batches, self.micro_global, self.step * cfg.train.batch_size)
        seed = cfg.seed + idx if st.seed is None else st.seed
        res = grow(full.model, st.grow, init=strategy, seed=seed, data=data)
        moments = grow_moments(full.moments, res.param_maps, factors=True)
        old_shapes = {n: tuple(p.shape) for n, p in full.model.named_parameters()}
        if self.lr_scales is not None:
            self.births = self.lr_scales.update_birth_stages(self.births, res.model, res.param_maps, idx)
        self.stage_scales = update_scales(res.param_maps, old_shapes, born_scale=1.0) if st.match_dynamics else None
        opt_step = full.step
        self.history.append(dict(res.record, stage=idx, stage_name=st.name, step=self.step))
        del full
        self.D.release(acc)
        self.model = self.opt = self.sched = None
        self.stage = idx
        self._build(res.model, moments, opt_step)
        if st.lr_scales is not None and self.lr_scales is not None:
            self._birth_scale_cache = self.lr_scales.compute_lr_scales(
                res.model, self.births, mode=st.lr_scales.mode, clamp=tuple(st.lr_scales.clamp), group=st.lr_scales.group)
        growth_s = time.perf_counter() - t0  # gather, grow, optimizer surgery, rebuild; not the two evaluations
        self._start_fade(st, res.record["new_layer_positions"], 0)
        after = self._eval() if self.val_dl is not None else None
        self._log(event="growth", name=st.name, val_loss_before=before, val_loss_after=after, exact=res.exact,
                  params=self.n_params, sizes=res.target_sizes.as_dict(), deviation=(res.deviation or {}).get("rel"),
                  growth_s=round(growth_s, 4))
        if before is not None:
            logger.info("growth to stage %d (%s) at step %d: val loss %.6f -> %.6f", idx, st.name, self.step, before, after)
        self._checkpoint(boundary=True)

    def _start_fade(self, st: Any, positions: list[int], since: int) -> None:
        """Fade the stage's new blocks in (stage option ``fade_in_steps``), ``since`` steps into it."""
        self.fade = None
        if st.fade_in_steps and positions and since < st.fade_in_steps:
            from .fade import LayerFade

            self.fade = LayerFade(self.acc.unwrap_model(self.model), positions, st.fade_in_steps)
            self.fade.set_step(since)

    # .................................................................. helpers
    def _eval(self) -> float:
        return evaluate(self.model, self.val_dl, self.cfg.model.task == "causal_lm", reduce=self.acc.reduce)

    def _log(self, **row: Any) -> None:
        row.setdefault("step", self.step)
        row.setdefault("stage", self.stage)
        row.setdefault("tokens", self.tokens)
        row.setdefault("flops", self.flops)
        row.setdefault("wall_s", round(self.wall(), 3))
        if self.acc.is_main_process:
            line = self.metrics.write(**row)
            if self.cfg.train.trackers:
                self.acc.log({k: v for k, v in line.items() if isinstance(v, (int, float)) and v is not None}, step=self.step)

    def _checkpoint(self, boundary: bool = False) -> None:
        from accelerate.utils import gather_object

        full = self.D.gather_full_state(self.acc, self.model, self.opt)
        rng = gather_object([ckpt.rng_state()])
        if self.acc.is_main_process:
            state = {"step": self.step, "stage": self.stage, "samples": self.step * self.cfg.train.batch_size,
                     "tokens": self.tokens, "flops": self.flops, "wall_s": self.wall(), "bad_batches": self.bad,
                     "history": self.history, "boundary": boundary, "world_size": self.world, "engine": self.engine}
            path = ckpt.save_checkpoint(self.out, model=full.model, moments=full.moments, opt_step=full.step,
                                        state=state, births=self.births, scales=self.stage_scales, rng=rng)
            self.last_ckpt = str(path)
            ckpt.prune_checkpoints(self.out, self.cfg.train.keep_checkpoints)
        self.acc.wait_for_everyone()
        del full

    # .................................................................. main loop
    def run(self, stop_at_step: int | None = None) -> dict:
        """Train to ``train.max_steps`` (or stop after ``stop_at_step`` optimizer steps, for tests
        and time-limited jobs; the last state is checkpointed). Returns a summary dict."""
        from tqdm.auto import tqdm

        from ..io import load_model

        self._setup()
        cfg, acc = self.cfg, self.acc
        self.births = self.stage_scales = self._birth_scale_cache = self.fade = None
        self.history: list[dict] = []
        self.bad = 0
        self.last_ckpt = None
        resumed = ckpt.latest_checkpoint(self.out) if self.resume else None
        if self.resume and resumed is None:
            logger.warning("--resume: no checkpoint in %s, starting from the beginning", self.out)
        wall0 = 0.0
        if resumed is not None:
            c = ckpt.load_checkpoint(resumed)
            s = c.state
            self.step, self.stage, self.tokens, self.flops = s["step"], s["stage"], s["tokens"], s["flops"]
            self.bad, self.history, wall0 = s["bad_batches"], s["history"], s["wall_s"]
            self.births, self.stage_scales, self.last_ckpt = c.births, c.scales, str(resumed)
            model = load_model(str(resumed / "model"), task=cfg.model.task)
            self._build(model, c.moments, s["opt_step"])
            st = cfg.stages[self.stage - 1] if self.stage > 0 else None
            if st is not None and st.lr_scales is not None and self.lr_scales is not None:
                self._birth_scale_cache = self.lr_scales.compute_lr_scales(
                    model, self.births, mode=st.lr_scales.mode, clamp=tuple(st.lr_scales.clamp), group=st.lr_scales.group)
            if st is not None and self.history:
                self._start_fade(st, self.history[-1].get("new_layer_positions") or [], self.step - st.start_step)
            if c.rng:
                ckpt.set_rng_state(c.rng[min(acc.process_index, len(c.rng) - 1)])
            logger.info("resumed from %s at step %d (stage %d)", resumed, self.step, self.stage)
        else:
            self.step = self.stage = self.tokens = 0
            self.flops = 0.0
            from accelerate.utils import set_seed

            set_seed(cfg.seed)
            model = build_initial_model(cfg, self.data.tokenizer)
            if self.lr_scales is not None:
                self.births = self.lr_scales.update_birth_stages(None, model, None, 0)
            self._build(model, None, 0)
        t_start = time.perf_counter()
        self.wall = lambda: wall0 + (time.perf_counter() - t_start)

        B = cfg.train.batch_size
        loader = torch.utils.data.DataLoader(self.data.train_stream(self.step * B, (cfg.train.max_steps - self.step) * B),
                                             batch_size=self.micro_global, shuffle=False,
                                             generator=torch.Generator().manual_seed(cfg.seed))
        self.train_dl = acc.prepare(loader)
        self.val_dl = None
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
        if acc.is_main_process:
            self.metrics = MetricsLog(self.out / "metrics.jsonl", truncate_after_step=self.step if resumed else None,
                                     growth_done=bool(resumed) and self.stage == cfg.stage_at(self.step))
            info = {"world_size": self.world, "engine": self.engine, "device": str(acc.device),
                    "mixed_precision": str(acc.mixed_precision), "micro_batch_per_process": self.micro,
                    "config": cfg.to_dict(), "config_file": cfg.source, "resumed_from": str(resumed) if resumed else None}
            tmp = self.out / "run_info.json.tmp"
            tmp.write_text(json.dumps(info, indent=1, default=str))
            os.replace(tmp, self.out / "run_info.json")
        if cfg.train.trackers:
            acc.init_trackers("progtrain", config={"max_steps": cfg.train.max_steps, "lr": cfg.optim.lr,
                                                   "batch_size": B, "seq_len": cfg.data.seq_len})
        self._log(event="start", world_size=self.world, engine=self.engine, params=self.n_params, resumed=bool(resumed))
        if resumed is None and self.val_dl is not None:
            self._log(event="eval", val_loss=self._eval())

        starts = cfg.stage_starts()
        bar = tqdm(total=cfg.train.max_steps, initial=self.step, disable=not acc.is_main_process, desc="train",
                   dynamic_ncols=True)
        it = iter(self.train_dl)
        stop = cfg.train.max_steps if stop_at_step is None else min(stop_at_step, cfg.train.max_steps)
        tps = cfg.tokens_per_step
        while self.step < stop:
            nxt = self.stage + 1
            if nxt < len(starts) and self.step == starts[nxt]:
                self._grow(nxt)
            if self.fade is not None:
                self.fade.set_step(self.step - cfg.stages[self.stage - 1].start_step)
                self.fade = self.fade if self.fade.active else None
            scaler = self._scaler()
            loss_sum = torch.zeros((), dtype=torch.float64)
            skipped = False
            for _ in range(cfg.train.grad_accum):
                batch = next(it)
                with acc.accumulate(self.model):
                    out = self.model(**batch)
                    loss = out.loss
                    finite = torch.isfinite(loss.detach()).float()
                    finite = acc.reduce(finite, reduction="sum") if self.world > 1 else finite
                    if float(finite) < self.world:
                        skipped = True
                    if not skipped:
                        if scaler is not None and self.engine.startswith("zero") and acc.sync_gradients:
                            scaler.snapshot()  # DeepSpeed runs its optimizer step inside backward
                        acc.backward(loss)
                        loss_sum += loss.detach().double().cpu()
                    if acc.sync_gradients and not skipped:
                        if cfg.optim.max_grad_norm:
                            acc.clip_grad_norm_(self.model.parameters(), cfg.optim.max_grad_norm)
                        if scaler is not None and self.engine.startswith("zero"):
                            self.opt.step()  # a no-op wrapper: the step already ran in backward
                            scaler.apply()
                        else:
                            (scaler or self.opt).step()
                    self.opt.zero_grad(set_to_none=True)
            if skipped:
                self.bad += 1
                msg = (f"non-finite loss at step {self.step + 1} (stage {self.stage}"
                       f"{' ' + cfg.stages[self.stage - 1].name if self.stage else ''}); last good checkpoint: "
                       f"{self.last_ckpt or 'none'}")
                if self.bad > cfg.train.max_bad_batches:
                    bar.close()
                    raise TrainingDiverged(msg + f". Lower optim.lr or raise optim.warmup_steps, then resume from "
                                                 f"that checkpoint (--resume), or allow skips with train.max_bad_batches")
                logger.warning("%s: batch skipped (%d of %d allowed)", msg, self.bad, cfg.train.max_bad_batches)
            self.step += 1
            self.sched.step()
            self.tokens += tps
            self.flops += self.flops_tok * tps
            train_loss = float(loss_sum) / cfg.train.grad_accum
            if self.world > 1:
                train_loss = float(acc.reduce(torch.tensor(train_loss, device=acc.device), reduction="mean"))
            bar.update(1)
            if self.step % cfg.train.log_interval == 0 or self.step == stop:
                bar.set_postfix(loss=f"{train_loss:.4f}", stage=self.stage, refresh=False)
                self._log(event="train", train_loss=None if skipped else train_loss, lr=self.opt.param_groups[0]["lr"])
            if self.val_dl is not None and cfg.train.eval_interval and (
                    self.step % cfg.train.eval_interval == 0 or self.step == cfg.train.max_steps):
                self._log(event="eval", val_loss=self._eval())
            if (cfg.train.checkpoint_interval and self.step % cfg.train.checkpoint_interval == 0) or (
                    self.step == stop and stop < cfg.train.max_steps):
                self._checkpoint()
        bar.close()
        if self.step < cfg.train.max_steps:
            return {"stopped_at": self.step, "checkpoint": self.last_ckpt}
        return self._finish()

    # .................................................................. outputs
    def _finish(self) -> dict:
        from ..io import save_checkpoint

        cfg, acc = self.cfg, self.acc
        full = self.D.full_model_for_save(acc, self.model)
        summary: dict = {"output_dir": str(self.out), "world_size": self.world, "engine": self.engine}
        if acc.is_main_process:
            self._log(event="end")
            metrics = read_metrics(self.out / "metrics.jsonl")
            plot_loss_vs_flops(metrics, self.out / "loss_vs_flops.png")
            infos = self._stage_info()
            rows = stage_rows(metrics, infos)
            evals = [m["val_loss"] for m in metrics if m["event"] == "eval" and m.get("val_loss") is not None]
            final = {"val_loss": evals[-1] if evals else None, "perplexity": perplexity(evals[-1] if evals else None),
                     "tokens": self.tokens, "flops": self.flops, "steps": self.step, "wall_s": round(self.wall(), 1)}
            card = model_card(full.config, self.history, rows, final, self.data.source, cfg)
            # the final dir carries the run's metrics and plot too, so it is complete for the Hub
            extra = {"README.md": card, "metrics.jsonl": (self.out / "metrics.jsonl").read_text()}
            # a run started from a checkpoint keeps its other files (generation settings travel with
            # the model object; sentence-transformers modules, custom code, ... are carried here)
            save_checkpoint(full, self.out / "final", tokenizer=self.data.tokenizer, history=self.history,
                            extra_files=extra, overwrite=True, carry_from=cfg.model.checkpoint)
            if (self.out / "loss_vs_flops.png").exists():
                shutil.copyfile(self.out / "loss_vs_flops.png", self.out / "final" / "loss_vs_flops.png")
            tmp = self.out / "README.md.tmp"
            tmp.write_text(card)
            os.replace(tmp, self.out / "README.md")
            table = format_stage_table(rows)
            print("\n" + table)
            print(f"\nfinal validation loss {final['val_loss']}, perplexity {final['perplexity']}; "
                  f"{self.tokens:,} tokens, {self.flops:.3e} FLOPs, {final['wall_s']} s; model in {self.out / 'final'}")
            summary.update(final=final, stages=rows, model_dir=str(self.out / "final"))
            if cfg.push_to_hub is not None:
                from ..hub import push_to_hub

                p = cfg.push_to_hub
                summary["pushed"] = push_to_hub(self.out / "final", p.repo_id, private=p.private,
                                                revision=p.revision, commit_message=p.commit_message)
                print(f"pushed to {summary['pushed']}")
        acc.wait_for_everyone()
        if cfg.train.trackers:
            acc.end_training()
        return summary

    def _stage_info(self) -> list[dict]:
        from ..arch import get_adapter
        from .flops import meta_model, stage_configs

        confs = stage_configs(self.cfg, self.data.tokenizer and len(self.data.tokenizer))
        out = []
        for i, c in enumerate(confs):
            out.append({"stage": i, "name": "initial" if i == 0 else self.cfg.stages[i - 1].name,
                        "sizes": {k: v for k, v in get_adapter(c).read_sizes(c).as_dict().items() if k != "head_dim"},
                        "params": total_params(meta_model(c, self.cfg.model.task)),
                        "init": "" if i == 0 else self.cfg.stages[i - 1].init})
        return out


def train(cfg: RunConfig, resume: bool = False, stop_at_step: int | None = None) -> dict:
    """Run a progressive pretraining config end to end (see :class:`ProgressiveTrainer`).

    Returns a summary: output directory, world size, engine kind, final metrics and stage rows."""
    return ProgressiveTrainer(cfg, resume=resume).run(stop_at_step=stop_at_step)
