"""FSDP2 (``torch.distributed.fsdp.fully_shard``, DTensor parameters) for growing runs.

``accelerate launch`` with ``distributed_type: FSDP`` and ``fsdp_version: 2`` (``launch/fsdp.yaml``,
``launch/cpu_fsdp2.yaml``) starts the processes and exports the FSDP settings; progtrain then shards
the model itself, the way accelerate's FSDP2 preparation does (``fully_shard`` on every transformer
block named in the model's ``_no_split_modules``, then on the root, which keeps a tied embedding and
head in one unit), for three reasons:

* one code path on GPUs and CPUs: accelerate runs FSDP on CUDA-like devices only, while
  ``fully_shard`` runs on the CPU over gloo, so the growth tests run on any machine;
* a growth re-shards a model of another shape: the engine re-shards from a full model or parameter
  by parameter and writes Adam's moments into the sharded optimizer state (:func:`load_moments`);
* a growth reads one parameter (and its moments) at a time: :func:`full_tensor` gathers a DTensor
  shard into the full tensor (collective), so the gathers are bounded by the largest parameter.

The Accelerator itself runs as plain multi-process (gloo on CPU, NCCL on GPUs) and is used for the
dataloaders, collectives and the optimizer / scheduler wrappers; it never wraps the model.
"""

from __future__ import annotations

import atexit
import logging
import os
import warnings
from dataclasses import dataclass

import torch

from ..errors import ProgtrainConfigError

logger = logging.getLogger(__name__)

_TRUE = ("1", "true", "yes")


@dataclass(frozen=True)
class Fsdp2Settings:
    """The FSDP2 options of the launch config that progtrain honours.

    Attributes:
        reshard_after_forward: free the gathered block parameters after the forward (ZeRO-3-like,
            ``fsdp_reshard_after_forward``); False keeps them until the backward (ZeRO-2-like).
        state_dict_type: ``fsdp_state_dict_type`` as exported by ``accelerate launch``
            (``SHARDED_STATE_DICT`` or ``FULL_STATE_DICT``).
    """

    reshard_after_forward: bool = True
    state_dict_type: str = "SHARDED_STATE_DICT"


def fsdp2_requested() -> bool:
    """Whether this process was launched for FSDP2 (``accelerate launch`` exports
    ``ACCELERATE_USE_FSDP=true`` and ``FSDP_VERSION=2`` from the config)."""
    use = os.environ.get("ACCELERATE_USE_FSDP", "").strip().lower() in _TRUE
    return use and os.environ.get("FSDP_VERSION", "1").strip() == "2"


def settings_from_env() -> Fsdp2Settings:
    """The :class:`Fsdp2Settings` of the launch, refusing the options progtrain does not implement.

    Raises:
        ProgtrainConfigError: ``fsdp_offload_params``, ``fsdp_activation_checkpointing`` or
            ``fsdp_cpu_ram_efficient_loading`` set (not supported for growing runs)."""
    env = os.environ
    for key, option in (("FSDP_OFFLOAD_PARAMS", "fsdp_offload_params"),
                        ("FSDP_ACTIVATION_CHECKPOINTING", "fsdp_activation_checkpointing"),
                        ("FSDP_CPU_RAM_EFFICIENT_LOADING", "fsdp_cpu_ram_efficient_loading")):
        if env.get(key, "").strip().lower() in _TRUE:
            raise ProgtrainConfigError(
                f"{option}: true is not supported by progtrain's FSDP2 engine; set it to false in the accelerate "
                f"config (launch/fsdp.yaml)"
            )
    return Fsdp2Settings(
        reshard_after_forward=env.get("FSDP_RESHARD_AFTER_FORWARD", "true").strip().lower() in _TRUE,
        state_dict_type=env.get("FSDP_STATE_DICT_TYPE", "SHARDED_STATE_DICT").strip() or "SHARDED_STATE_DICT",
    )


def is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The full value of a (possibly DTensor-sharded) tensor as a plain tensor on its device
    (collective for a DTensor: every rank must call it, in the same order)."""
    return t.full_tensor() if is_dtensor(t) else t


def plain_class(model: torch.nn.Module) -> type:
    """The model's own class (``fully_shard`` swaps a module's class for an ``FSDP<Class>`` subclass)."""
    from torch.distributed.fsdp import FSDPModule

    for cls in type(model).__mro__:
        if not issubclass(cls, FSDPModule):
            return cls
    return type(model)


def _destroy_process_group() -> None:
    """Tear the process group down before the interpreter exits: left to the C++ destructors, gloo
    with FSDP2's communication state aborts a process now and then ("terminate called without an
    active exception", exit -6) after a run has finished."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _block_classes(model: torch.nn.Module) -> set[str]:
    names = set(getattr(model, "_no_split_modules", None) or [])
    if not names:
        raise ProgtrainConfigError(
            f"{type(model).__name__} names no transformer block class (_no_split_modules), so FSDP2 cannot shard it "
            f"block by block; use DDP or DeepSpeed ZeRO for this model"
        )
    return names


def meta_skeleton(cls: type, config, *, like: torch.nn.Module | None = None,
                  include_buffers: bool = True) -> torch.nn.Module:
    """A ``cls(config)`` whose parameters (and buffers, unless ``include_buffers`` is False: then they
    are built on the CPU with their values, e.g. rotary ``inv_freq``) are on the meta device (no
    memory), ties made; ``like``'s train/eval mode and generation config when given."""
    import copy

    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=include_buffers):
        model = cls(copy.deepcopy(config))
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    if like is not None:
        model.train(like.training)
        if getattr(like, "generation_config", None) is not None:
            model.generation_config = copy.deepcopy(like.generation_config)
    return model


def _broadcast_from_main(t: torch.Tensor | None, shape, dtype, device) -> torch.Tensor:
    """The main process's tensor ``t`` on every rank (others pass None; collective)."""
    import torch.distributed as dist

    if dist.get_rank() == 0:
        out = t.detach().to(device=device, dtype=dtype).contiguous()
    else:
        out = torch.empty(shape, dtype=dtype, device=device)
    dist.broadcast(out, src=0)
    return out


def shard_model(model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, device: torch.device,
                settings: Fsdp2Settings, mixed_precision: str = "no",
                from_main: bool = True) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The sharded copy of ``model`` over all processes, and ``optimizer`` pointed at its parameters.

    The values come from the MAIN process (rank 0): there ``model`` holds the full weights; on the
    other ranks it may be a :func:`meta_skeleton` of the same class and config (only names and shapes
    are read), so a growth needs the full model on one rank only. A skeleton of the model is sharded
    on the meta device (``fully_shard`` on each transformer block named in ``_no_split_modules``,
    then the root, which keeps a tied embedding and head in one unit), its local shards are allocated
    and each parameter and buffer is broadcast from the main process in turn and cut to this rank's
    shard: the extra memory is one full parameter at a time. ``model`` itself is left untouched.

    ``optimizer`` must be built on ``model``'s parameters and hold no state yet. ``mixed_precision``
    ``"bf16"`` computes in bf16 and reduces gradients in fp32 (fp32 master weights stay sharded).
    Collective: every rank calls it. Returns ``(sharded model, optimizer)``.

    ``from_main=False`` (resuming from a sharded checkpoint, which then loads the shards): every rank
    passes a :func:`meta_skeleton` with real buffers (``include_buffers=False``); the parameters'
    local shards are left uninitialised (no broadcast) and the buffers are copied from ``model``.

    Raises:
        ProgtrainConfigError: the optimizer already holds state or names parameters the model lacks,
            or the model names no transformer block class.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if optimizer.state:
        raise ProgtrainConfigError("shard_model() takes a fresh optimizer (no state); load moments after sharding")
    old_names = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        if any(id(p) not in old_names for p in group["params"]):
            raise ProgtrainConfigError("the optimizer holds parameters the model does not have; build it on the model")
    if not getattr(shard_model, "_exit_hook", False):
        atexit.register(_destroy_process_group)
        shard_model._exit_hook = True
    blocks = _block_classes(model)
    main = dist.get_rank() == 0
    sharded = meta_skeleton(plain_class(model), model.config, like=model)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision == "bf16" \
        else MixedPrecisionPolicy()
    kwargs = dict(mesh=mesh, reshard_after_forward=settings.reshard_after_forward, mp_policy=mp)
    for module in list(sharded.modules())[1:]:
        if type(module).__name__ in blocks:
            fully_shard(module, **kwargs)
    fully_shard(sharded, **kwargs)
    sharded.to_empty(device=device)
    src_params = dict(model.named_parameters())
    src_buffers = dict(model.named_buffers())
    with torch.no_grad():
        for name, p in sharded.named_parameters() if from_main else ():
            full = _broadcast_from_main(src_params[name] if main else None, tuple(p.shape), p.dtype, device)
            p.to_local().copy_(distribute_like(full, p).to_local())
            del full
        for name, b in list(sharded.named_buffers()):
            if not from_main:
                b.copy_(src_buffers[name].to(device=b.device, dtype=b.dtype))
                continue
            full = _broadcast_from_main(src_buffers[name] if main else None, tuple(b.shape), b.dtype, device)
            b.copy_(full)
    new = dict(sharded.named_parameters())
    for group in optimizer.param_groups:
        group["params"] = [new[old_names[id(p)]] for p in group["params"]]
    return sharded, optimizer


def broadcast_moment(value: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """The main process's full moment ``value`` (others pass None) as this rank's shard, sharded like
    the DTensor ``like`` (collective; one full tensor in memory at a time)."""
    full = _broadcast_from_main(value, tuple(like.shape), like.dtype, like.device)
    return distribute_like(full, like)


def distribute_like(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``value`` (the full tensor, the same on every rank) sharded like the DTensor ``like`` (this
    rank's piece only, no communication); ``value`` itself when ``like`` is a plain tensor."""
    if not is_dtensor(like):
        return value.to(device=like.device, dtype=like.dtype)
    from torch.distributed.tensor import distribute_tensor

    value = value.to(device=like.device, dtype=like.dtype)
    return distribute_tensor(value, like.device_mesh, like.placements, src_data_rank=None)


def save_sharded(model: torch.nn.Module, optimizer: torch.optim.Optimizer, path: str | os.PathLike) -> None:
    """Write the sharded ``model``'s and ``optimizer``'s state under the directory ``path`` with
    ``torch.distributed.checkpoint``: each rank its own shards (``__<rank>_0.distcp``), the main
    process the ``.metadata``. Collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer)
    dcp.save({"model": msd, "optimizer": osd}, checkpoint_id=os.fspath(path))


def load_sharded(model: torch.nn.Module, optimizer: torch.optim.Optimizer, path: str | os.PathLike) -> None:
    """Load what :func:`save_sharded` wrote into the sharded ``model`` and its ``optimizer`` (any
    world size: DCP re-shards). The optimizer's state is created first by torch's
    ``get_state_dict`` (one step with zero gradients at learning rate 0, which moves no parameter)
    and then overwritten. Collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(model, optimizer)
    sd = {"model": msd, "optimizer": osd}
    dcp.load(sd, checkpoint_id=os.fspath(path))
    set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optimizer"])


def load_full_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The full model tensors (``{name: tensor}``, as saved) of a :func:`save_sharded` directory, in
    one process without a process group (e.g. to inspect or convert a checkpoint)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = dcp.FileSystemReader(os.fspath(path)).read_metadata().state_dict_metadata
    sd = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype) for k, m in meta.items()
          if k.startswith("model.") and isinstance(m, TensorStorageMetadata)}
    with warnings.catch_warnings():  # "torch.distributed is disabled ...": one process is what is meant here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(sd, checkpoint_id=os.fspath(path), no_dist=True)
    return {k[len("model."):]: v for k, v in sd.items()}
