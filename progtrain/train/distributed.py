"""Distributed execution for the training engine: the one place that knows how a model, its optimizer
and its scheduler are wrapped (single process, DDP, DeepSpeed ZeRO-1/2/3), how to get the full
model and Adam's moments out of them and back in across a growth, and where the optimizer step
runs. :class:`Engine` puts all of it behind one interface for the training loop; the functions
below are its parts, usable on their own. FSDP2 (``fully_shard``) is sharded by progtrain itself,
see :mod:`progtrain.train.fsdp`. Under FSDP2 and ZeRO-3 a growth's full state lives on the main process
only (``gather_full_state(main_only=True)``, :meth:`Engine.grow`) and the other ranks receive their
shards (ZeRO-3: :func:`prepare` partitions the model one parameter at a time, values from the main
process; :func:`load_moments` broadcasts the main's moments one tensor at a time), so a growth's extra
memory on those ranks is bounded by the largest parameter, not by the model.

The engine's life cycle around a growth::

    acc = build_accelerator(...)
    model, opt, sched = prepare(acc, model, opt, sched, micro_batch_size=b)   # dataloaders: once, by the engine
    ...train...
    full = gather_full_state(acc, model, opt)          # every rank: full fp32 CPU model + moments + step
    result = progtrain.grow(full.model, ...)           # same on every rank (same seed)
    moments = {name: {k: pmap.map_tensor(full.moments[pmap.old_name][k]) ...}}  (or train.surgery)
    model, opt, sched = release(acc, model, opt, sched)  # drop engine / wrapped objects, keep process group
    model, opt, sched = prepare(acc, result.model, new_opt, new_sched, micro_batch_size=b)
    load_moments(acc, model, opt, moments, full.step)
    ...train...
    final = full_model_for_save(acc, model)            # every rank calls it; main gets the model

Moments are keyed by the names of ``model.named_parameters()`` of the unwrapped model (for a plain
HF model: the plain HF parameter names, a tied head once under the embedding). Tensors in a
:class:`FullState` are fp32 on the CPU. On CPU the process group is gloo; see ``launch/README.md``
for the launch commands that really give 2 processes with the engine asked for. ``deepspeed`` is
imported inside the functions that run under it only: it is an optional dependency whose import
takes seconds.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from dataclasses import dataclass
from typing import Callable

import torch
from accelerate import Accelerator, init_empty_weights
from accelerate.utils import DataLoaderConfiguration, DistributedType, InitProcessGroupKwargs
from transformers import PreTrainedModel

from ..carry import carry_generation_config
from ..errors import ProgtrainConfigError
from . import fsdp
from .lr_scales import UpdateScaler

logger = logging.getLogger(__name__)

ENGINE_KINDS = ("single", "ddp", "zero1", "zero2", "zero3", "fsdp2")
#: engines whose training checkpoints are written shard by shard, each rank its own (:meth:`Engine.save_sharded`)
SHARDED_KINDS = ("zero3", "fsdp2")
#: the tag (sub-directory) of a DeepSpeed checkpoint inside a progtrain checkpoint's ``sharded/``
ZERO_TAG = "zero"
MOMENT_KEYS = ("exp_avg", "exp_avg_sq")
_TRUE = ("1", "true", "yes")


@dataclass
class FullState:
    """The training state a growth needs, identical on every rank.

    Attributes:
        model: the unwrapped model with full weights, fp32, on the CPU (a copy: growing or editing
            it does not touch the running engine).
        moments: ``{param name: {"exp_avg": T, "exp_avg_sq": T}}``, full fp32 CPU tensors shaped like
            the parameters (zeros before the first optimizer step).
        step: Adam's step count (optimizer steps taken so far).
    """

    model: PreTrainedModel
    moments: dict[str, dict[str, torch.Tensor]]
    step: int


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUE


def _on_cpu() -> bool:
    return _env_true("ACCELERATE_USE_CPU") or not torch.cuda.is_available()


def _load_ds_config(deepspeed_config: dict | str) -> dict:
    """The DeepSpeed config as a dict (from a dict or a JSON file path), with the batch keys the
    Accelerator fills ("auto") added when absent."""
    if isinstance(deepspeed_config, (str, os.PathLike)):
        path = os.fspath(deepspeed_config)
        if not os.path.isfile(path):
            raise ProgtrainConfigError(
                f"deepspeed_config file {path!r} does not exist; give the path of a DeepSpeed JSON "
                f"(e.g. launch/ds_zero2.json) or a dict"
            )
        try:
            with open(path) as f:
                cfg = json.load(f)
        except json.JSONDecodeError as e:
            raise ProgtrainConfigError(f"deepspeed_config {path!r} is not valid JSON ({e}); fix the file") from None
    elif isinstance(deepspeed_config, dict):
        cfg = copy.deepcopy(deepspeed_config)
    else:
        raise ProgtrainConfigError(
            f"deepspeed_config must be a dict or a JSON path, got {type(deepspeed_config).__name__}"
        )
    stage = cfg.get("zero_optimization", {}).get("stage")
    if stage not in (1, 2, 3):
        raise ProgtrainConfigError(
            f"deepspeed_config has zero_optimization.stage={stage!r}; set it to 1, 2 or 3 "
            f"(for plain data parallel use DDP: launch/cpu_ddp2.yaml or launch/multi_gpu.yaml)"
        )
    for key in ("train_micro_batch_size_per_gpu", "train_batch_size", "gradient_accumulation_steps"):
        cfg.setdefault(key, "auto")
    cfg.setdefault("steps_per_print", 10**9)
    return cfg


def build_accelerator(
    *,
    mixed_precision: str = "no",
    gradient_accumulation_steps: int = 1,
    deepspeed_config: dict | str | None = None,
    log_with: list[str] | None = None,
    project_dir: str | None = None,
    gradient_clipping: float | None = None,
) -> Accelerator:
    """Build the run's :class:`accelerate.Accelerator`.

    On CPU the process group is gloo. Batches are split (``split_batches=True``): the dataloader's
    batch size is the GLOBAL batch, cut into one micro-batch per process, so the data order and the
    global batch are the same for any world size. DeepSpeed comes from the ``accelerate launch``
    config (environment) or, when given, from ``deepspeed_config`` (dict or JSON path; it takes
    precedence). ``gradient_clipping`` (max global grad norm, 0 = off) is written into the DeepSpeed
    config, where DeepSpeed clips inside its step; None keeps Accelerate's default (1.0). Without
    DeepSpeed it is ignored (clip with ``accelerator.clip_grad_norm_``).

    Raises:
        ProgtrainConfigError: bad arguments, or a launch that silently runs the wrong thing
            (several processes not synchronised, DeepSpeed asked for but plain DDP running).
    """
    if mixed_precision not in ("no", "fp16", "bf16"):
        raise ProgtrainConfigError(f"mixed_precision={mixed_precision!r}; use 'no', 'bf16' or 'fp16'")
    if mixed_precision == "fp16" and _on_cpu():
        raise ProgtrainConfigError("mixed_precision='fp16' needs a GPU; on CPU use 'no' (fastest here) or 'bf16'")
    if not isinstance(gradient_accumulation_steps, int) or gradient_accumulation_steps < 1:
        raise ProgtrainConfigError(
            f"gradient_accumulation_steps={gradient_accumulation_steps!r}; give an integer >= 1"
        )
    if gradient_clipping is not None and gradient_clipping < 0:
        raise ProgtrainConfigError(f"gradient_clipping={gradient_clipping}; give a max norm >= 0 (0 = off)")
    want_fsdp2 = fsdp.fsdp2_requested()
    if want_fsdp2 and deepspeed_config is not None:
        raise ProgtrainConfigError(
            "the launch config asks for FSDP2 and train.deepspeed_config for DeepSpeed; choose one (remove "
            "train.deepspeed_config, or launch with a DeepSpeed config such as launch/cpu_zero3.yaml)"
        )
    fsdp2_settings = fsdp.settings_from_env() if want_fsdp2 else None
    if want_fsdp2:
        # progtrain shards the model itself (progtrain/train/fsdp.py), on GPUs and CPUs alike: the
        # Accelerator runs as plain multi-process and never wraps the model
        os.environ["ACCELERATE_USE_FSDP"] = "false"
    want_ds = deepspeed_config is not None or _env_true("ACCELERATE_USE_DEEPSPEED")
    if want_ds and _env_true("ACCELERATE_USE_CPU"):
        raise ProgtrainConfigError(
            "DeepSpeed was asked for with ACCELERATE_USE_CPU=1, which makes accelerate silently run plain "
            "DDP; unset ACCELERATE_USE_CPU (DeepSpeed finds the CPU itself; set DS_ACCELERATOR=cpu), "
            "see launch/README.md"
        )
    kwargs: dict = {}
    if deepspeed_config is not None:
        from accelerate.utils import DeepSpeedPlugin

        kwargs["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=_load_ds_config(deepspeed_config))
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if _on_cpu() and world > 1:  # a backend in a single process makes accelerate expect a process group
        kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]
    if not want_ds and world > 1 and not torch.cuda.is_available():
        kwargs["cpu"] = True  # several processes on a CPU-only machine: DDP (MULTI_CPU), not unsynchronised
    acc = Accelerator(
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=gradient_accumulation_steps,
        dataloader_config=DataLoaderConfiguration(split_batches=True),
        log_with=log_with,
        project_dir=project_dir,
        **kwargs,
    )
    acc.progtrain_fsdp2 = fsdp2_settings  # read by engine_kind()
    if world > 1 and acc.distributed_type == DistributedType.NO:
        raise ProgtrainConfigError(
            f"{world} processes were launched but accelerate runs them unsynchronised (no DDP); on a "
            f"CPU-only machine launch DDP with ACCELERATE_USE_CPU=1 (launch/cpu_ddp2.yaml), see launch/README.md"
        )
    if acc.distributed_type == DistributedType.DEEPSPEED:
        _configure_deepspeed_plugin(acc.state.deepspeed_plugin, gradient_clipping)
    logger.info("accelerator: %s, %d process(es), engine %s", acc.distributed_type, acc.num_processes,
                engine_kind(acc))
    return acc


def _configure_deepspeed_plugin(plugin, gradient_clipping: float | None) -> None:
    """Check the ZeRO stage; write the clipping norm and a quiet ``steps_per_print`` into the config."""
    if plugin.zero_stage not in (1, 2, 3):
        raise ProgtrainConfigError(
            f"DeepSpeed ZeRO stage {plugin.zero_stage} is not supported; use stage 1, 2 or 3, or DDP"
        )
    if gradient_clipping is not None:
        plugin.deepspeed_config["gradient_clipping"] = float(gradient_clipping)
    plugin.deepspeed_config.setdefault("steps_per_print", 10**9)
    if plugin.deepspeed_config.get("steps_per_print") == float("inf"):
        plugin.deepspeed_config["steps_per_print"] = 10**9


def engine_kind(accelerator: Accelerator) -> str:
    """What runs the model: "single" (one process), "ddp" (several processes, DDP), "zero1" |
    "zero2" | "zero3" (DeepSpeed ZeRO stage), "fsdp2" (progtrain's FSDP2, :mod:`.fsdp`), or "fsdp"
    (accelerate's FSDP1, no growth)."""
    if _is_fsdp2(accelerator):
        return "fsdp2"
    dt = accelerator.distributed_type
    if dt == DistributedType.DEEPSPEED:
        return f"zero{accelerator.state.deepspeed_plugin.zero_stage}"
    if dt == DistributedType.FSDP:
        return "fsdp"
    return "ddp" if accelerator.num_processes > 1 else "single"


def _is_deepspeed(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def _is_fsdp2(accelerator: Accelerator) -> bool:
    return getattr(accelerator, "progtrain_fsdp2", None) is not None


def _no_fsdp(accelerator: Accelerator, what: str) -> None:
    if accelerator.distributed_type == DistributedType.FSDP:
        raise ProgtrainConfigError(
            f"{what} is not supported under FSDP version 1; set fsdp_version: 2 in the accelerate config "
            f"(launch/fsdp.yaml) for sharded growth runs"
        )


def prepare(accelerator: Accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
            scheduler, *, micro_batch_size: int, empty: bool = False) -> tuple:
    """(Re)prepare ``model``/``optimizer``/``scheduler`` (``scheduler`` may be None) for the
    accelerator's engine and return them wrapped, in that order.

    ``micro_batch_size`` is the per-process batch (samples) of one forward/backward; DeepSpeed needs
    it in its config because dataloaders are prepared once by the engine and never re-prepared at a
    growth. Call :func:`release` before preparing a grown model. ``empty``: ``model`` is an
    :meth:`Engine.empty_model` whose values a sharded checkpoint loads next (:func:`load_sharded`);
    under FSDP2 nothing is broadcast then.

    Under FSDP2 and ZeRO-3 the values come from the MAIN process: on the other ranks ``model`` may be
    a meta-device skeleton of the same class and config (:meth:`Engine.grow`), and each parameter is
    materialised, filled from the main process and sharded in turn (ZeRO-3: :func:`partition_zero3`),
    so no rank but the main one holds the full model.
    """
    if not isinstance(micro_batch_size, int) or micro_batch_size < 1:
        raise ProgtrainConfigError(f"micro_batch_size={micro_batch_size!r}; give the per-process batch, an int >= 1")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ProgtrainConfigError(
            f"prepare() takes a torch optimizer, got {type(optimizer).__name__}; build it on the unwrapped model"
        )
    if _is_deepspeed(accelerator):
        cfg = accelerator.state.deepspeed_plugin.deepspeed_config
        current = cfg.get("train_micro_batch_size_per_gpu", "auto")
        if current not in ("auto", micro_batch_size):
            raise ProgtrainConfigError(
                f"DeepSpeed config has train_micro_batch_size_per_gpu={current} but the run's micro-batch "
                f"is {micro_batch_size}; set it to \"auto\" in the DeepSpeed config"
            )
        ga = accelerator.gradient_accumulation_steps
        cfg["train_micro_batch_size_per_gpu"] = micro_batch_size
        cfg["gradient_accumulation_steps"] = ga
        cfg["train_batch_size"] = micro_batch_size * ga * accelerator.num_processes
    if _is_fsdp2(accelerator):
        model, optimizer = fsdp.shard_model(model, optimizer, device=accelerator.device,
                                            settings=accelerator.progtrain_fsdp2,
                                            mixed_precision=str(accelerator.mixed_precision), from_main=not empty)
        out = accelerator.prepare(optimizer, *([scheduler] if scheduler is not None else []))
        out = (model, *(out if isinstance(out, tuple) else (out,)))
        return out if scheduler is not None else (out[0], out[1], None)
    if engine_kind(accelerator) == "zero3":
        partition_zero3(accelerator, model, optimizer, empty=empty)
    objs = [model, optimizer] + ([scheduler] if scheduler is not None else [])
    out = accelerator.prepare(*objs)
    if scheduler is None:
        return out[0], out[1], None
    return tuple(out)


def _zero_init_config(accelerator: Accelerator) -> dict:
    """The run's DeepSpeed config for ``deepspeed.zero.Init``: the plugin's, with the values still
    ``"auto"`` (filled by accelerate when it builds the engine, none of them read by ``zero.Init``)
    left out. Call it after :func:`prepare` has written the batch sizes."""

    def drop_auto(d: dict) -> dict:
        return {k: drop_auto(v) if isinstance(v, dict) else v for k, v in d.items() if v != "auto"}

    return drop_auto(accelerator.state.deepspeed_plugin.deepspeed_config)


def _zero_param_dtype(accelerator: Accelerator) -> torch.dtype | None:
    """The dtype DeepSpeed's engine casts the parameters of a model it partitions itself to (fp16 or
    bf16 when enabled in the DeepSpeed config, accelerate's mixed precision where that says "auto"),
    or None (kept as they are: fp32)."""
    cfg = accelerator.state.deepspeed_plugin.deepspeed_config
    mp = str(accelerator.mixed_precision)
    for key, dtype, modes in (("fp16", torch.float16, ("fp16",)), ("bf16", torch.bfloat16, ("bf16", "fp8"))):
        enabled = cfg.get(key, {}).get("enabled", False)
        if (mp in modes) if enabled == "auto" else str(enabled).lower() == "true":
            return dtype
    return None


def _on_main(accelerator: Accelerator, fn: Callable[[], object]):
    """``fn()`` on the main process (None on the others); an exception it raises is raised on every
    rank (collective: the other ranks would otherwise wait for the main one in the next collective)."""
    from accelerate.utils import broadcast_object_list

    out, error = None, [None]
    if accelerator.is_main_process:
        try:
            out = fn()
        except Exception as e:  # noqa: BLE001 - sent to the other ranks, raised everywhere below
            error = [e]
    if accelerator.num_processes > 1:
        broadcast_object_list(error, from_process=0)
    if error[0] is not None:
        raise error[0]
    return out


def partition_zero3(accelerator: Accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *,
                    empty: bool = False) -> None:
    """Partition ``model``'s parameters for DeepSpeed ZeRO-3 in place, one parameter at a time, with
    the MAIN process's values, before ``accelerator.prepare`` builds the engine on it.

    On the main process ``model`` holds the full weights (fp32, CPU); on the others it may be a
    :func:`~progtrain.train.fsdp.meta_skeleton` of the same class and config (names and shapes only).
    Each parameter is materialised (a meta one as an uninitialised tensor of its shape, cast to the
    run's mixed-precision dtype as DeepSpeed casts a model it partitions itself), then broadcast from
    the main process and cut to this rank's partition by DeepSpeed (``deepspeed.zero.Init(module=...)``
    for the first, ``convert_to_zero_parameters`` for the rest: the way DeepSpeed's engine converts a
    model), so each rank holds one full parameter at a time on top of its partitions. Buffers are
    broadcast from the main process and moved to the device. A meta parameter is replaced by a new
    ``Parameter`` (ties kept, ``requires_grad`` kept) and ``optimizer``'s param groups are pointed at
    it. The engine then finds every parameter partitioned and converts nothing. Parameters already
    partitioned (built under ``zero.Init``) are left as they are. Collective: every rank calls it.

    ``empty``: the model is an :meth:`Engine.empty_model` on every rank (a sharded checkpoint loads the
    values next); the main process's uninitialised values are broadcast.

    Raises:
        ProgtrainConfigError: the ranks' models differ in parameter or buffer names or shapes, or the
            main process's model has meta parameters outside ``empty``.
    """
    import deepspeed
    from accelerate.utils import broadcast_object_list

    main = accelerator.is_main_process
    device = accelerator.device
    cast = _zero_param_dtype(accelerator)
    slots: dict[int, list[tuple[torch.nn.Module, str]]] = {}
    order: list[tuple[str, torch.nn.Parameter]] = []
    for mname, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if id(p) not in slots:
                slots[id(p)] = []
                order.append((f"{mname}.{pname}" if mname else pname, p))
            slots[id(p)].append((module, pname))
    buffers = list(model.named_buffers())
    mine = ([(n, tuple(p.shape)) for n, p in order], [(n, tuple(b.shape)) for n, b in buffers])

    def main_layout():
        if not empty and any(p.is_meta for _, p in order):
            raise ProgtrainConfigError(
                "the main process's model has parameters on the meta device; under ZeRO-3 it must hold the "
                "values (the other ranks may pass a skeleton), or prepare it with empty=True")
        return mine, [b.dtype for _, b in buffers]

    layout = [_on_main(accelerator, main_layout)]
    broadcast_object_list(layout, from_process=0)
    (want, buffer_dtypes) = layout[0]
    if want != mine:
        raise ProgtrainConfigError(
            f"ZeRO-3: this rank's model ({type(model).__name__}) has other parameters or buffers than the main "
            f"process's; every rank must prepare the same class and config (the main process's values are used)")
    replaced: dict[int, torch.nn.Parameter] = {}
    first = None
    for _, p in order:
        if hasattr(p, "ds_id"):
            continue
        if p.is_meta:
            new = torch.nn.Parameter(torch.empty(p.shape, dtype=cast if cast and p.is_floating_point() else p.dtype,
                                                 device=device), requires_grad=p.requires_grad)
            for module, pname in slots[id(p)]:
                module._parameters[pname] = new
            replaced[id(p)] = p = new
        elif cast is not None and p.is_floating_point() and p.dtype != cast:
            p.data = p.data.to(cast)
        if first is None:  # DeepSpeed's converter (config, process group, offload device) lives on its params
            holder = torch.nn.Module()
            holder.register_parameter("p", p)
            deepspeed.zero.Init(module=holder, config_dict_or_path=_zero_init_config(accelerator))
            first = p
        else:  # broadcast from the main process, keep this rank's partition, free the full tensor
            first.convert_to_zero_parameters(param_list=[p])
    for group in optimizer.param_groups:
        group["params"] = [replaced.get(id(p), p) for p in group["params"]]
    with torch.no_grad():
        for (name, b), dtype in zip(buffers, buffer_dtypes):
            full = fsdp._broadcast_from_main(b if main else None, tuple(b.shape), dtype, device)
            owner, _, attr = name.rpartition(".")
            model.get_submodule(owner)._buffers[attr] = full


def release(accelerator: Accelerator, *objects) -> tuple:
    """Drop the prepared model/optimizer/scheduler (and the DeepSpeed engine with its partitions)
    before a rebuild, through ``Accelerator.free_memory`` (accelerate's public API); returns
    ``objects`` as Nones, so ``model, opt, sched = release(acc, model, opt, sched)`` drops the
    caller's references too. The process group and the prepared dataloaders keep working (only
    accelerate's list of them is emptied, which ``save_state`` alone reads). ``free_memory`` also
    resets the accumulation counter ``accelerator.step`` to 0; a growth happens between optimizer
    steps, where that counter is a multiple of ``gradient_accumulation_steps``, so the micro-batches
    on which gradients sync do not move.

    The optimizers' Adam state is cleared first: a released DeepSpeed ZeRO-3 engine and its optimizer
    stay alive after ``free_memory`` (measured with ``gc`` under DeepSpeed 0.19.8: reachable only
    through references ``gc`` cannot follow), and their moments would otherwise outlive the rebuild."""
    for obj in objects:
        base = _base_optimizer(obj) if obj is not None else None
        if isinstance(base, torch.optim.Optimizer):
            base.state.clear()
    return tuple(accelerator.free_memory(*objects))


def _base_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer that holds the state: inside Accelerate's wrapper and, under DeepSpeed,
    inside the ZeRO optimizer (whose params are the flat fp32 partitions)."""
    opt = getattr(optimizer, "optimizer", optimizer)  # AcceleratedOptimizer / DeepSpeedOptimizerWrapper
    inner = getattr(opt, "optimizer", None)  # DeepSpeed ZeRO optimizer -> torch optimizer
    return inner if isinstance(inner, torch.optim.Optimizer) else opt


def _named_params(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return list(model.named_parameters())


def _check_adam(base: torch.optim.Optimizer) -> None:
    if "betas" not in base.defaults:
        raise ProgtrainConfigError(
            f"optimizer {type(base).__name__} keeps no Adam moments; growth surgery needs Adam/AdamW"
        )


def _state_step(accelerator: Accelerator, base: torch.optim.Optimizer) -> int:
    """Adam's step count, the same on every rank (a rank whose partitions hold no state yet reads 0)."""
    step = 0
    for st in base.state.values():
        if "step" in st:
            s = st["step"]
            step = int(s.item() if torch.is_tensor(s) else s)
            break
    if accelerator.num_processes > 1:
        step = int(accelerator.gather(torch.tensor([step], device=accelerator.device)).max().item())
    return step


def _link_zero12_state(zero, base: torch.optim.Optimizer) -> None:
    """Point every ZeRO-1/2 parameter's fragment at its group's current Adam state (no-op for ZeRO-3,
    which reads the state directly). DeepSpeed links them once, right after the FIRST param group's
    first step, when the other groups have no state yet, so with several param groups (decay /
    no-decay) ``safe_get/set_full_optimizer_state`` fail for the later groups; linking again from the
    current state fixes that."""
    lp_groups = getattr(zero, "bit16_groups", None)
    flats = getattr(zero, "single_partition_of_fp32_groups", None)
    if lp_groups is None or flats is None:
        return
    from deepspeed.utils import lazy_init_hp_params_optimizer_state

    for lp, flat in zip(lp_groups, flats):
        lazy_init_hp_params_optimizer_state(lp, flat, base.state)
    zero._hp_optimizer_states_linked = True


def _full_ds_tensor(p: torch.nn.Parameter, key: str | None) -> torch.Tensor:
    """Full fp32 value (key None) or optimizer state of a DeepSpeed-managed parameter (collective)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    t = safe_get_full_fp32_param(p) if key is None else safe_get_full_optimizer_state(p, key)
    if t is None:  # frozen parameter: not in the optimizer
        if key is not None:
            return torch.zeros(p.ds_shape if hasattr(p, "ds_shape") else p.shape, dtype=torch.float32)
        if hasattr(p, "ds_id"):
            import deepspeed

            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                return p.detach().float().cpu().clone()
        return p.detach().float().cpu().clone()
    return t.detach().float().cpu().clone()


def _rebuilt_model(unwrapped: PreTrainedModel, values: dict[str, torch.Tensor]) -> PreTrainedModel:
    """A fresh fp32 CPU copy of ``unwrapped`` (same class and config) holding ``values`` (full
    parameter tensors by name) and the same buffers."""
    config = copy.deepcopy(unwrapped.config)
    with init_empty_weights():
        fresh = fsdp.plain_class(unwrapped)(config)
    _, unexpected = fresh.load_state_dict(dict(values), strict=False, assign=True)
    fresh.tie_weights()
    carry_generation_config(unwrapped, fresh)
    old_buffers = dict(unwrapped.named_buffers())
    for name, _ in list(fresh.named_buffers()):  # persistent or not (e.g. rotary inv_freq)
        if name in old_buffers:
            owner, _, attr = name.rpartition(".")
            setattr(fresh.get_submodule(owner), attr, old_buffers[name].detach().cpu().clone())
    left = [n for n, p in fresh.named_parameters() if p.is_meta]
    if unexpected or left:
        raise ProgtrainConfigError(
            f"cannot rebuild {type(unwrapped).__name__} from its gathered weights (unexpected {unexpected}, "
            f"unset {left}); parametrised models are not supported under DeepSpeed, bake them first (progtrain.bake)"
        )
    fresh.float()
    fresh.train(unwrapped.training)
    return fresh


def _ds_full_params(unwrapped: torch.nn.Module, *, keep: bool = True) -> dict[str, torch.Tensor]:
    """Every parameter's full fp32 CPU value by name, gathered one at a time (collective); with
    ``keep`` False each is dropped once gathered (a rank that only takes part) and ``{}`` returned."""
    values = {}
    for name, p in _named_params(unwrapped):
        t = _full_ds_tensor(p, None)
        if keep:
            values[name] = t
        del t
    return values


def _grows_on_main(accelerator: Accelerator) -> bool:
    """Whether a growth's full state is built on the main process only (the engines that shard the
    parameters: FSDP2, ZeRO-3); the others keep full parameters on every rank and grow everywhere."""
    return _is_fsdp2(accelerator) or engine_kind(accelerator) == "zero3"


def gather_full_state(accelerator: Accelerator, model: torch.nn.Module, optimizer, *,
                      main_only: bool = False) -> FullState:
    """Collect the full model (fp32, CPU, a copy), full Adam moments by parameter name and the step
    count, on every rank. Collective under DeepSpeed and FSDP2: every rank must call it.

    ``main_only``: under FSDP2 and ZeRO-3 the full state is built on the main process only, gathered
    one parameter (and its moments) at a time; the other ranks take part in each gather, drop the
    tensor, and get a meta-device skeleton of the model (names and shapes, no memory) and
    ``moments=None``. Ignored by the other engines (every rank gets the full state)."""
    _no_fsdp(accelerator, "gather_full_state")
    unwrapped = accelerator.unwrap_model(model)
    base = _base_optimizer(optimizer)
    _check_adam(base)
    step = _state_step(accelerator, base)
    named = _named_params(unwrapped)
    moments: dict[str, dict[str, torch.Tensor]] = {}
    keep = accelerator.is_main_process or not (main_only and _grows_on_main(accelerator))
    skeleton = None if keep else fsdp.meta_skeleton(fsdp.plain_class(unwrapped), unwrapped.config, like=unwrapped)
    if _is_fsdp2(accelerator):  # one parameter and its moments at a time (collective gathers)
        values = {}
        for name, p in named:
            st = base.state.get(p, {})
            for key in (None,) + MOMENT_KEYS:
                t = fsdp.full_tensor(p.detach() if key is None else st[key]) if key is None or key in st else None
                if keep:
                    t = torch.zeros(p.shape, dtype=torch.float32) if t is None else t.float().cpu()
                    if key is None:
                        values[name] = t
                    else:
                        moments.setdefault(name, {})[key] = t
                del t
    elif _is_deepspeed(accelerator):  # one parameter, then its moments, at a time (collective gathers)
        values = _ds_full_params(unwrapped, keep=keep)
        if step > 0:
            _link_zero12_state(getattr(optimizer, "optimizer", optimizer), base)
        for name, p in named:
            if step == 0 or not p.requires_grad:
                if keep:
                    shape = tuple(p.ds_shape) if hasattr(p, "ds_shape") else tuple(p.shape)
                    moments[name] = {k: torch.zeros(shape, dtype=torch.float32) for k in MOMENT_KEYS}
                continue
            for k in MOMENT_KEYS:
                t = _full_ds_tensor(p, k)
                if keep:
                    moments.setdefault(name, {})[k] = t
                del t
    else:
        full = copy.deepcopy(unwrapped).float().cpu()
        for name, p in named:
            st = base.state.get(p, {})
            moments[name] = {
                k: (st[k].detach().float().cpu().clone() if k in st else torch.zeros(p.shape, dtype=torch.float32))
                for k in MOMENT_KEYS
            }
        return FullState(model=full, moments=moments, step=step)
    if not keep:
        _on_main(accelerator, lambda: None)  # the main process's rebuild below may fail: wait for its word
        return FullState(model=skeleton, moments=None, step=step)
    rebuild = lambda: _rebuilt_model(unwrapped, values)  # noqa: E731
    full = _on_main(accelerator, rebuild) if main_only and _grows_on_main(accelerator) else rebuild()
    return FullState(model=full, moments=moments, step=step)


def _step_tensor(like, step: int):
    if torch.is_tensor(like):
        return torch.tensor(float(step), dtype=like.dtype, device=like.device)
    return torch.tensor(float(step), dtype=torch.float32)


def _flat_partitions(zero, base: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The flat fp32 partitions a ZeRO optimizer keeps its Adam state for (ZeRO-3 empties the base
    optimizer's param groups outside its step, so they are read from the ZeRO optimizer)."""
    for attr in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups"):
        flats = getattr(zero, attr, None)
        if flats:
            return [p for p in flats if p is not None]
    return [p for group in base.param_groups for p in group["params"]]


def _check_moment_shapes(moments: dict[str, dict[str, torch.Tensor]], shapes: dict[str, tuple[int, ...]]) -> None:
    """Refuse moments keyed by a parameter the model lacks or shaped unlike their parameter."""
    unknown = sorted(set(moments) - set(shapes))
    if unknown:
        raise ProgtrainConfigError(
            f"moments given for parameters the model does not have: {unknown[:5]}; key them by the grown "
            f"model's parameter names (GrowthResult.param_maps)"
        )
    for name, per in moments.items():
        for k, t in per.items():
            if tuple(t.shape) != shapes[name]:
                raise ProgtrainConfigError(
                    f"moment {k!r} of {name!r} has shape {tuple(t.shape)}, the parameter {shapes[name]}; "
                    f"map the moments to the grown shapes (ParamMap.map_tensor)"
                )


def load_moments(accelerator: Accelerator, model: torch.nn.Module, optimizer,
                 moments: dict[str, dict[str, torch.Tensor]], step: int) -> None:
    """After :func:`prepare`, write full moments (``{param name: {"exp_avg", "exp_avg_sq"}}``, full
    shapes) into the possibly partitioned optimizer state and set Adam's step count to ``step``.
    Parameters absent from ``moments`` get zero moments. Collective under DeepSpeed and FSDP2; under
    FSDP2 and ZeRO-3 the main process's ``moments`` are used (the others may pass ``{}``): each tensor
    is broadcast from it in turn and cut to this rank's shard, one full tensor in memory at a time."""
    _no_fsdp(accelerator, "load_moments")
    unwrapped = accelerator.unwrap_model(model)
    base = _base_optimizer(optimizer)
    _check_adam(base)
    named = _named_params(unwrapped)
    shapes = {n: tuple(p.ds_shape) if hasattr(p, "ds_shape") else tuple(p.shape) for n, p in named}
    _check_moment_shapes(moments, shapes)
    step = int(step)
    amsgrad = any(g.get("amsgrad", False) for g in base.param_groups)
    keys = MOMENT_KEYS + (("max_exp_avg_sq",) if amsgrad else ())

    def init_state(p: torch.Tensor) -> None:
        st = base.state[p]
        if not st:
            for k in keys:
                st[k] = torch.zeros_like(p, memory_format=torch.preserve_format)
        st["step"] = _step_tensor(st.get("step"), step)

    present = None
    if _grows_on_main(accelerator):  # the main process's moments, broadcast one tensor at a time
        from accelerate.utils import broadcast_object_list

        present = [sorted((n, k) for n, per in moments.items() for k in per) if accelerator.is_main_process else None]
        broadcast_object_list(present, from_process=0)
        present = set(present[0])

    def main_moment(name: str, k: str) -> torch.Tensor:
        """The main process's full fp32 moment ``k`` of ``name`` on every rank (zeros when it has none)."""
        if (name, k) not in present:
            return torch.zeros(shapes[name], dtype=torch.float32, device=accelerator.device)
        value = moments[name][k].detach().float() if accelerator.is_main_process else None
        return fsdp._broadcast_from_main(value, shapes[name], torch.float32, accelerator.device)

    if _is_fsdp2(accelerator):
        for name, p in named:
            if not p.requires_grad:
                continue
            init_state(p)
            st = base.state[p]
            for k in keys:
                if (name, k) in present:
                    value = moments[name][k].detach().float() if accelerator.is_main_process else None
                    st[k] = fsdp.broadcast_moment(value, st[k])
                else:
                    st[k].zero_()
    elif _is_deepspeed(accelerator):
        from deepspeed.utils import safe_set_full_optimizer_state

        zero = getattr(optimizer, "optimizer", optimizer)
        for p in _flat_partitions(zero, base):
            init_state(p)
        _link_zero12_state(zero, base)
        for name, p in named:
            if not p.requires_grad:
                continue
            per = moments.get(name, {})
            for k in keys:
                if present is not None:  # ZeRO-3
                    value = main_moment(name, k)
                else:
                    value = per.get(k)
                    value = torch.zeros(shapes[name], dtype=torch.float32) if value is None else value
                safe_set_full_optimizer_state(p, value.detach().float().to(accelerator.device), k)
                del value
    else:
        for name, p in named:
            if not p.requires_grad:
                continue
            init_state(p)
            st = base.state[p]
            per = moments.get(name, {})
            for k in keys:
                value = per.get(k)
                if value is None:
                    st[k].zero_()
                else:
                    st[k].copy_(value.detach().to(dtype=st[k].dtype, device=st[k].device))


def full_model_for_save(accelerator: Accelerator, model: torch.nn.Module) -> PreTrainedModel | None:
    """The full unwrapped model on the main process (None on the others), ready for
    ``progtrain.io.save_checkpoint``. Under DeepSpeed a fresh fp32 CPU copy gathered from the
    partitions (collective: every rank must call it); under FSDP2 the same, gathered parameter by
    parameter; otherwise the unwrapped model itself."""
    if _is_fsdp2(accelerator):
        unwrapped = accelerator.unwrap_model(model)
        values = {}
        for name, p in _named_params(unwrapped):
            t = fsdp.full_tensor(p.detach())
            if accelerator.is_main_process:
                values[name] = t.float().cpu()
            del t
        return _rebuilt_model(unwrapped, values) if accelerator.is_main_process else None
    if accelerator.distributed_type == DistributedType.FSDP:
        state = accelerator.get_state_dict(model)  # collective; full state dict on the main process
        if not accelerator.is_main_process:
            return None
        unwrapped = accelerator.unwrap_model(model)
        return _rebuilt_model(unwrapped, {k: v.float().cpu() for k, v in state.items()})
    unwrapped = accelerator.unwrap_model(model)
    if _is_deepspeed(accelerator):  # gathered one parameter at a time, kept on the main process only
        values = _ds_full_params(unwrapped, keep=accelerator.is_main_process)
        return _rebuilt_model(unwrapped, values) if accelerator.is_main_process else None
    return unwrapped if accelerator.is_main_process else None


def save_sharded(accelerator: Accelerator, model, optimizer, path: str | os.PathLike) -> None:
    """Write the prepared model's and optimizer's state to the directory ``path``, each rank its own
    shard, through the engine's own sharded format (no rank gathers the full model or moments):

    * FSDP2: ``torch.distributed.checkpoint`` (DCP) of ``{"model": ..., "optimizer": ...}`` from
      ``torch.distributed.checkpoint.state_dict.get_state_dict`` (DTensor shards by FQN), the format
      accelerate's FSDP2 ``save_state`` writes with ``SHARDED_STATE_DICT``: one ``__<rank>_0.distcp``
      per rank and a ``.metadata``;
    * ZeRO-3: DeepSpeed's ``save_checkpoint`` (what accelerate's ``save_state`` calls under
      DeepSpeed), tag :data:`ZERO_TAG`: one ``zero_pp_rank_<r>_mp_rank_00_optim_states.pt`` per rank
      (fp32 partitions and their Adam state) and ``mp_rank_00_model_states.pt`` (buffers, shapes).

    ``path`` must be on a file system every rank sees. Collective: every rank calls it.

    Raises:
        ProgtrainConfigError: the engine keeps full state on every rank (see :data:`SHARDED_KINDS`)."""
    kind = engine_kind(accelerator)
    if kind == "fsdp2":
        fsdp.save_sharded(accelerator.unwrap_model(model), _base_optimizer(optimizer), path)
    elif kind == "zero3":
        model.save_checkpoint(os.fspath(path), tag=ZERO_TAG)
    else:
        raise ProgtrainConfigError(f"sharded checkpoints are written under {' or '.join(SHARDED_KINDS)}, not {kind}")


def load_sharded(accelerator: Accelerator, model, optimizer, path: str | os.PathLike) -> None:
    """Load what :func:`save_sharded` wrote into the prepared ``model`` and ``optimizer`` (built for
    the same model config, e.g. from :meth:`Engine.empty_model`), each rank reading its shard: the
    parameters, the buffers, Adam's moments and step count, bit for bit. FSDP2 re-shards a checkpoint
    written with another world size; ZeRO-3 needs the same one. Collective.

    Raises:
        ProgtrainConfigError: nothing loadable at ``path``, or the engine keeps full state."""
    kind = engine_kind(accelerator)
    if kind == "fsdp2":
        fsdp.load_sharded(accelerator.unwrap_model(model), _base_optimizer(optimizer), path)
    elif kind == "zero3":
        loaded, _ = model.load_checkpoint(os.fspath(path), tag=ZERO_TAG, load_optimizer_states=True,
                                          load_lr_scheduler_states=False)
        if loaded is None:
            raise ProgtrainConfigError(f"no DeepSpeed checkpoint (tag {ZERO_TAG!r}) in {path}; the checkpoint is "
                                       f"incomplete: resume from an earlier one (delete this one)")
    else:
        raise ProgtrainConfigError(f"sharded checkpoints are read under {' or '.join(SHARDED_KINDS)}, not {kind}")


def full_weights_from_shards(path: str | os.PathLike, engine: str | None) -> dict[str, torch.Tensor]:
    """The full fp32 model tensors (``{name: tensor}``) of what :func:`save_sharded` wrote under
    ``engine`` (the checkpoint's recorded engine kind), read in one process without a process group:
    FSDP2's DCP tensors read whole, ZeRO-3's partitions joined by DeepSpeed's
    ``get_fp32_state_dict_from_zero_checkpoint``.

    Raises:
        ProgtrainConfigError: ``engine`` writes no shards."""
    if engine == "fsdp2":
        return fsdp.load_full_weights(path)
    if engine == "zero3":
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return dict(get_fp32_state_dict_from_zero_checkpoint(os.fspath(path), tag=ZERO_TAG))
    raise ProgtrainConfigError(f"{path} holds shards of engine {engine!r}; progtrain consolidates "
                               f"{' and '.join(SHARDED_KINDS)} shards only")


def zero_param_hooks() -> tuple[Callable[[torch.nn.Parameter], torch.Tensor], Callable[[torch.nn.Parameter, torch.Tensor], None]]:
    """``(get_param, set_param)`` for :class:`UpdateScaler` under DeepSpeed ZeRO-1/2.

    ``get_param`` returns the optimizer's full fp32 copy of a parameter
    (``deepspeed.utils.safe_get_full_fp32_param``; the module parameter itself when DeepSpeed keeps
    none). ``set_param`` writes the scaled value into that fp32 copy
    (``safe_set_full_fp32_param``) *and* into the module parameter: DeepSpeed copies the fp32
    partitions to the module only inside its own step, so without the second write the next forward
    would still see the unscaled update. ZeRO-1/2 keep full module parameters on every rank, which is
    what makes the second write valid; ZeRO-3 partitions them and is refused.
    """
    from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

    def _check(p: torch.nn.Parameter) -> None:
        if hasattr(p, "ds_id"):
            raise ProgtrainConfigError(
                "per-element update scales are not supported under ZeRO-3 (partitioned parameters): use ZeRO-1/2 "
                "or turn lr_scales / born_warmup_steps / match_dynamics off"
            )

    def get_param(p: torch.nn.Parameter) -> torch.Tensor:
        _check(p)
        full = safe_get_full_fp32_param(p)
        return p.detach().float() if full is None else full

    def set_param(p: torch.nn.Parameter, value: torch.Tensor) -> None:
        safe_set_full_fp32_param(p, value)
        p.data.copy_(value.to(device=p.device, dtype=p.dtype))

    return get_param, set_param

def _picklable_fields(result, *, skip: tuple[str, ...]):
    """``result`` (a dataclass) with the fields in ``skip`` and those that cannot be pickled (e.g.
    ``SpaceMaps`` holding an adapter's functions) set to None, for a broadcast to the other ranks."""
    import dataclasses
    import pickle

    dropped = {name: None for name in skip}
    for f in dataclasses.fields(result):
        if f.name in dropped:
            continue
        try:
            pickle.dumps(getattr(result, f.name))
        except Exception:  # noqa: BLE001 - any pickling failure: the field stays on the main process
            dropped[f.name] = None
    if set(dropped) - set(skip):
        logger.debug("growth result fields kept on the main process only: %s", sorted(set(dropped) - set(skip)))
    return dataclasses.replace(result, **dropped)


class Engine:
    """The run's engine behind one interface, so the training loop never asks which one it has.

    Wraps an :class:`~accelerate.Accelerator` from :func:`build_accelerator` and holds the prepared
    ``model``, ``optimizer`` and ``scheduler``. The one difference the loop would otherwise see is
    where the optimizer step runs: DeepSpeed runs it inside ``backward`` (on its fp32 partitions),
    the other engines in ``optimizer.step()``. Per-element update scales
    (:class:`~progtrain.train.lr_scales.UpdateScaler`) hang on that step as two hooks, a snapshot
    before the update and the scaling after it, which :meth:`backward` and :meth:`step` place::

        engine = Engine(build_accelerator(...), max_grad_norm=1.0)
        engine.prepare(model, opt, sched, micro_batch_size=b)
        engine.set_update_scales(scales)       # once per optimizer step (None: plain update)
        for each micro-batch:  with accelerator.accumulate(engine.model):
            loss = engine.model(**batch).loss
            engine.backward(loss)              # snapshot before it when the step runs inside it
            if accelerator.sync_gradients:
                engine.step()                  # clip, step (or not), scale the update
            engine.zero_grad()
        full = engine.gather_full_state(); engine.release(); ... engine.prepare(grown, ...)

    Attributes:
        accelerator: the wrapped accelerator.
        kind: :func:`engine_kind` of it (recorded in logs and checkpoints, never branched on outside
            this module).
        model, optimizer, scheduler: the prepared objects (None before :meth:`prepare`, after
            :meth:`release`).
        named_params: ``{name: parameter}`` of the unwrapped model (the names of the moments and of
            the update scales).
    """

    def __init__(self, accelerator: Accelerator, *, max_grad_norm: float = 0.0) -> None:
        self.accelerator = accelerator
        self.kind = engine_kind(accelerator)
        self.max_grad_norm = float(max_grad_norm)
        self._steps_in_backward = _is_deepspeed(accelerator)  # DeepSpeed steps its optimizer inside backward
        self.model = self.optimizer = self.scheduler = None
        self.named_params: dict[str, torch.nn.Parameter] = {}
        self._scaler = None

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    # .................................................................. checks
    def check_update_scales(self) -> None:
        """Refuse per-element update scales on an engine that shards the parameters.

        Raises:
            ProgtrainConfigError: under ZeRO-3 or FSDP (no rank holds a full parameter to scale)."""
        if self.kind in ("zero3", "fsdp", "fsdp2"):
            raise ProgtrainConfigError(
                f"lr_scales / born_warmup_steps / match_dynamics scale each element's update, which needs full "
                f"parameters on every rank; {self.kind} shards them: use DDP or ZeRO-1/2, or remove those stage options"
            )

    def check_trainable(self, trainable: str | tuple) -> None:
        """Refuse frozen parameters (``train.trainable`` other than ``all``) where the growth's optimizer
        surgery does not handle them: DeepSpeed and FSDP keep sharded optimizer state.

        Raises:
            ProgtrainConfigError: ``trainable`` is not ``all`` and the engine is neither one process nor DDP."""
        if trainable != "all" and self.kind not in ("single", "ddp"):
            shown = trainable if isinstance(trainable, str) else list(trainable)
            raise ProgtrainConfigError(
                f"train.trainable={shown} is supported on one process and under DDP, not under {self.kind} (frozen "
                f"parameters in sharded optimizer state are not handled by progtrain's growth surgery yet): launch "
                f"without DeepSpeed/FSDP, or use trainable: all"
            )

    # .................................................................. life cycle
    def prepare(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler, *,
                micro_batch_size: int, empty: bool = False) -> tuple:
        """:func:`prepare` the three objects, keep them, and return them."""
        self.model, self.optimizer, self.scheduler = prepare(
            self.accelerator, model, optimizer, scheduler, micro_batch_size=micro_batch_size, empty=empty)
        self.named_params = dict(self.accelerator.unwrap_model(self.model).named_parameters())
        return self.model, self.optimizer, self.scheduler

    @property
    def sharded_checkpoints(self) -> bool:
        """Whether training checkpoints are written shard by shard (:meth:`save_sharded`; ZeRO-3,
        FSDP2) rather than as the full model and moments (one process, DDP, ZeRO-1/2)."""
        return self.kind in SHARDED_KINDS

    def adam_step(self) -> int:
        """Adam's step count of the prepared optimizer, the same on every rank (collective)."""
        return _state_step(self.accelerator, _base_optimizer(self.optimizer))

    def check_resume_from_shards(self, path, engine: str | None, world_size: int | None) -> None:
        """Refuse to resume from a sharded checkpoint (written by ``engine`` on ``world_size``
        processes) that this engine cannot read: another engine's shards, or ZeRO-3's at another world
        size (DeepSpeed's partitions are per rank; FSDP2's DCP files re-shard).

        Raises:
            ProgtrainConfigError: naming the checkpoint's engine and world size and what to launch."""
        if engine == self.kind and (engine != "zero3" or world_size == self.world_size):
            return
        raise ProgtrainConfigError(
            f"--resume: {path} holds {engine} shards of {world_size} processes, this run is {self.kind} on "
            f"{self.world_size}: launch with the run's engine{' and world size' if engine == 'zero3' else ''}, or "
            f"start a new run from its consolidated model (progtrain.train.checkpoint.load_full_model, saved, "
            f"as model.checkpoint)")

    def save_sharded(self, path: str | os.PathLike) -> None:
        """:func:`save_sharded` of the prepared model and optimizer (collective)."""
        save_sharded(self.accelerator, self.model, self.optimizer, path)

    def load_sharded(self, path: str | os.PathLike) -> None:
        """:func:`load_sharded` into the prepared model and optimizer (collective)."""
        load_sharded(self.accelerator, self.model, self.optimizer, path)

    def empty_model(self, cls: type, config) -> PreTrainedModel:
        """A ``cls(config)`` to :meth:`prepare` with ``empty=True`` before :meth:`load_sharded`: no
        initialisation and no random numbers drawn (a resumed run's RNG streams stay as restored),
        buffers computed as the class does. Under FSDP2 and ZeRO-3 its parameters are on the meta
        device (no memory; :meth:`prepare` materialises them one at a time as it shards them); under
        the other engines uninitialised CPU tensors."""
        model = fsdp.meta_skeleton(cls, config, include_buffers=False)
        if self.kind not in SHARDED_KINDS:
            for module in model.modules():
                for name, p in list(module.named_parameters(recurse=False)):
                    if p.is_meta:
                        module._parameters[name] = torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype),
                                                                      requires_grad=p.requires_grad)
            if hasattr(model, "tie_weights"):
                model.tie_weights()
        return model

    def load_moments(self, moments: dict[str, dict[str, torch.Tensor]], step: int) -> None:
        """:func:`load_moments` into the prepared optimizer."""
        load_moments(self.accelerator, self.model, self.optimizer, moments, step)

    def gather_full_state(self, *, main_only: bool = False) -> FullState:
        """:func:`gather_full_state` of the prepared model and optimizer (collective); ``main_only``:
        under FSDP2 and ZeRO-3 only the main process builds the full state (see :meth:`grow`)."""
        return gather_full_state(self.accelerator, self.model, self.optimizer, main_only=main_only)

    def grow(self, full: FullState, grow_fn: Callable[[PreTrainedModel], object]):
        """``grow_fn(full.model)`` (a :class:`~progtrain.growth.GrowthResult`) on every rank, or, under
        FSDP2 and ZeRO-3 (``full`` from ``gather_full_state(main_only=True)``), on the main process
        only: the others receive the result with a meta-device skeleton of the grown model (no
        memory), and :meth:`prepare` fills their shards from the main process one parameter at a time.
        Collective.

        Raises:
            whatever ``grow_fn`` raises, on every rank."""
        if not _grows_on_main(self.accelerator):
            return grow_fn(full.model)
        import dataclasses

        from accelerate.utils import broadcast_object_list

        res, payload = None, [None]
        if self.accelerator.is_main_process:
            try:
                res = grow_fn(full.model)
                payload = [(_picklable_fields(res, skip=("model",)), fsdp.plain_class(res.model), res.model.config, None)]
            except Exception as e:  # the other ranks wait in the broadcast: send them the error
                payload = [(None, None, None, e)]
        broadcast_object_list(payload, from_process=0)
        light, cls, config, error = payload[0]
        if error is not None:
            raise error
        if res is not None:
            return res
        return dataclasses.replace(light, model=fsdp.meta_skeleton(cls, config, like=full.model))

    def full_model_for_save(self) -> PreTrainedModel | None:
        """:func:`full_model_for_save` of the prepared model (collective)."""
        return full_model_for_save(self.accelerator, self.model)

    def keep_for_save(self, model: PreTrainedModel) -> PreTrainedModel:
        """``model`` (full, fp32, CPU), as it can still be saved after :meth:`prepare` takes it and
        before any optimizer step: the model itself where preparing keeps its values in place (one
        process, DDP: at most moved to the device), a CPU copy where the engine takes the module
        over (DeepSpeed partitions or casts its parameters in place; FSDP2 shards a copy). Saves
        gathering it back."""
        return copy.deepcopy(model) if self._steps_in_backward else model

    def release(self) -> None:
        """:func:`release` the prepared objects before a rebuild."""
        self.model, self.optimizer, self.scheduler = release(self.accelerator, self.model, self.optimizer, self.scheduler)
        self.named_params, self._scaler = {}, None

    # .................................................................. one optimizer step
    def set_update_scales(self, scales: dict[str, torch.Tensor] | None) -> None:
        """Per-element update multipliers for the next optimizer step (None: the plain update), by
        the names of :attr:`named_params`; see :mod:`progtrain.train.lr_scales`."""
        self._scaler = None if scales is None else UpdateScaler(self.optimizer, self.named_params, scales,
                                                                **self._param_hooks())

    def _param_hooks(self) -> dict:
        if self.kind in ("zero1", "zero2"):  # the optimizer updates DeepSpeed's fp32 partitions
            get_param, set_param = zero_param_hooks()
            return {"get_param": get_param, "set_param": set_param}
        return {}

    def all_finite(self, loss: torch.Tensor) -> bool:
        """Whether ``loss`` is finite on every process (collective when there are several)."""
        finite = torch.isfinite(loss.detach()).float()
        if self.world_size > 1:
            finite = self.accelerator.reduce(finite, reduction="sum")
        return not float(finite) < self.world_size

    def mean(self, value: float) -> float:
        """Mean of a per-process number over the processes (collective when there are several)."""
        if self.world_size == 1:
            return value
        return float(self.accelerator.reduce(torch.tensor(value, device=self.accelerator.device), reduction="mean"))

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch; where the optimizer step runs inside it (DeepSpeed, on the
        micro-batch that ends an accumulation), the update scaler's snapshot is taken first."""
        if self._scaler is not None and self._steps_in_backward and self.accelerator.sync_gradients:
            self._scaler.snapshot()
        self.accelerator.backward(loss)

    def step(self) -> None:
        """The optimizer step at the end of an accumulation: clip (``max_grad_norm``; DeepSpeed
        clips inside its own step), step, and scale the update when update scales are set."""
        if self.max_grad_norm:
            self.accelerator.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        if self._scaler is not None and self._steps_in_backward:
            self.optimizer.step()  # a no-op wrapper: the step already ran in backward
            self._scaler.apply()
        else:
            (self._scaler or self.optimizer).step()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
