"""Masked structural growth (MSG, Yao et al. 2023, arXiv 2305.02869): new structure enters through a
mask ``m`` ramped 0 -> 1 over a stage's first ``mask_steps`` optimizer steps.

At ``m = 0`` the grown model computes exactly what the small model computed *whatever the new
weights are* (``init: random`` included): the function is kept by the mask, not by zeroed weights.
Three kinds of new structure are masked, each through a hook that leaves the Hugging Face modules
and the state dict unchanged:

* **FFN units** and **attention heads**: a forward pre-hook on the block's output projection (the
  module of role ``down`` / ``o`` in the family's adapter, :mod:`progtrain.arch`) multiplies the
  new input units (axis ``ffn.in`` / ``o.in``: new FFN units, new heads' value dims) by ``m``, so
  ``down(a) = W_old a_old + m W_new a_new`` (and likewise for ``o``). Which units are new comes from
  the growth's :class:`~progtrain.growth.plan.ParamMap` (the axis plan's ``src < 0``).
* **Layers**: a forward hook on each new block mixes its output with its input,
  ``out = h + m (block(h) - h)`` (at ``m = 0`` the block is skipped; this is the post-norm fade-in
  that keeps BERT's depth growth exact, and the only part of the stage option ``fade_in_steps``).

``m = min(1, (step - start_step) / steps)`` is a pure function of the optimizer step, and the
:func:`mask_spec` (which modules, which units, which layers) is JSON in the run's ``TrainState``, so
a run resumed mid-ramp rebuilds the same hooks. At ``m = 1`` the hooks are removed: the model is a
standard ``transformers`` model that computes what the masked model computed, so checkpoints and
the final model never depend on the masks (the run config requires the ramp to end inside its
stage).

**Hidden size** is not masked. A masked stream coordinate must be 0 at ``m = 0``, but LayerNorm and
RMSNorm in the HF modules normalise over all ``D`` coordinates, so zero coordinates change the old
ones' statistics (RMSNorm: ``rms`` shrinks by ``sqrt(d/D)``; LayerNorm: mean and variance both
move). Keeping the function then needs the padding construction of the exact growth (norm gains
times ``sqrt(d/D)``, ``eps`` times ``d/D``; LayerNorm needs the new coordinates to carry the old
mean, a fixed value, not a free one), i.e. the growth itself must be function preserving on the
stream; masks cannot make a random hidden growth exact with standard norm modules. A hidden growth
in a masked stage is therefore exact only when its init is (``function_preserving`` tiles or pads
the stream exactly); a warning says so.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable, Mapping, Sequence

import torch

logger = logging.getLogger(__name__)

#: what a mask can cover, by the axis tag of the output projection's input (None: whole layers)
MASK_PARTS = {"ffn": "ffn.in", "heads": "o.in", "layers": None}


def mask_spec(model: torch.nn.Module, param_maps: Mapping[str, Any], *, start_step: int, steps: int,
              parts: Iterable[str] = tuple(MASK_PARTS)) -> dict:
    """The masks of one growth, as JSON (what ``TrainState.masks`` stores).

    Args:
        model: the grown model (its adapter tells which parameters are ``down`` / ``o`` and which of
            their axes read FFN units / heads).
        param_maps: ``GrowthResult.param_maps`` (grown parameter name -> ``ParamMap``).
        start_step: optimizer step of the growth (``m = 0`` there).
        steps: length of the ramp in optimizer steps (> 0).
        parts: subset of :data:`MASK_PARTS` to mask.

    Returns:
        ``{"start_step", "steps", "layers": [new block indices], "units": {module path: [new input
        unit indices]}}``; module paths are relative to ``model`` (the unwrapped model).

    Raises:
        ValueError: ``steps < 1`` or an unknown part.
    """
    from ..arch import base_prefix, get_adapter

    parts = set(parts)
    if steps < 1:
        raise ValueError(f"a mask needs at least 1 step, got {steps}")
    if parts - set(MASK_PARTS):
        raise ValueError(f"unknown mask parts {sorted(parts - set(MASK_PARTS))}; choose from {sorted(MASK_PARTS)}")
    adapter, prefix = get_adapter(model), base_prefix(model)
    unit_tags = {MASK_PARTS[p] for p in parts if MASK_PARTS[p]}
    new_layers: set[int] = set()
    units: dict[str, list[int]] = {}
    for name, pmap in param_maps.items():
        pspec, layer, _ = adapter.classify(name, prefix)
        if pmap.new_layer:
            if layer is not None:
                new_layers.add(layer)
            continue
        if not name.endswith(".weight"):
            continue
        for axis, tag in enumerate(pspec.axes):
            plan = pmap.plans[axis] if axis < len(pmap.plans) else None
            if tag in unit_tags and plan is not None:
                new = (plan.src < 0).nonzero().flatten().tolist()
                if new:
                    units[name[: -len(".weight")]] = new
    return {"start_step": int(start_step), "steps": int(steps),
            "layers": sorted(new_layers) if "layers" in parts else [], "units": units}


def layer_mask_spec(positions: Sequence[int], *, start_step: int, steps: int) -> dict:
    """A :func:`mask_spec` that masks whole blocks only (the fade-in of ``fade_in_steps``)."""
    if steps < 1:
        raise ValueError(f"a mask needs at least 1 step, got {steps}")
    return {"start_step": int(start_step), "steps": int(steps), "layers": sorted(int(i) for i in positions), "units": {}}


def mask_value(spec: Mapping[str, Any], step: int) -> float:
    """``m`` at optimizer step ``step``: ``min(1, max(0, step - start_step) / steps)``."""
    return min(1.0, max(0, int(step) - int(spec["start_step"])) / int(spec["steps"]))


def is_empty(spec: Mapping[str, Any] | None) -> bool:
    return not spec or (not spec.get("layers") and not spec.get("units"))


class GrowthMasks:
    """The hooks of a :func:`mask_spec` on a model, with the mask value of the current step.

    Args:
        model: the (unwrapped) ``PreTrainedModel`` the spec was made for.
        spec: a :func:`mask_spec`.
        step: the optimizer step to set ``m`` for (see :meth:`set_step`).

    Raises:
        ValueError: a unit index beyond the module's input size (the spec belongs to another model).
    """

    def __init__(self, model: torch.nn.Module, spec: Mapping[str, Any], step: int | None = None) -> None:
        from ..arch import base_prefix, get_adapter

        self.spec = dict(spec)
        self.m = 0.0
        self._handles: list[Any] = []
        self._mult: dict[str, torch.Tensor] = {}
        self._cache: dict[tuple, torch.Tensor] = {}
        if spec.get("layers"):
            adapter, prefix = get_adapter(model), base_prefix(model)
            layers = model.get_submodule(f"{prefix}.{adapter.layers_path}" if prefix else adapter.layers_path)
            for i in spec["layers"]:
                self._handles.append(layers[int(i)].register_forward_hook(self._layer_hook, with_kwargs=True))
        for path, idx in (spec.get("units") or {}).items():
            module = model.get_submodule(path)
            n_in = _in_features(module)
            new = torch.as_tensor(idx, dtype=torch.long)
            if new.numel() and int(new.max()) >= n_in:
                raise ValueError(f"mask of {path}: unit {int(new.max())} beyond its {n_in} inputs")
            is_new = torch.zeros(n_in, dtype=torch.bool)
            is_new[new] = True
            self._mult[path] = is_new
            self._handles.append(module.register_forward_pre_hook(self._unit_hook(path)))
        if step is not None:
            self.set_step(step)

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def set_step(self, step: int) -> None:
        """Set ``m`` for optimizer step ``step`` (:func:`mask_value`); removes the hooks at ``m = 1``."""
        self.m = mask_value(self.spec, step)
        self._cache.clear()
        if self.m >= 1.0:
            self.remove()

    def remove(self) -> None:
        """Remove every hook (the model is a plain model again)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def _unit_hook(self, path: str):
        def hook(module: torch.nn.Module, args: tuple) -> tuple:
            x = args[0]
            key = (path, x.device, x.dtype)
            mult = self._cache.get(key)
            if mult is None:
                mult = torch.where(self._mult[path], torch.tensor(self.m, dtype=torch.float64),
                                   torch.tensor(1.0, dtype=torch.float64)).to(device=x.device, dtype=x.dtype)
                self._cache[key] = mult
            return (x * mult, *args[1:])  # x * 0 keeps the graph: DDP expects a gradient for every weight

        return hook

    def _layer_hook(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        h = args[0] if args else kwargs["hidden_states"]
        out = output[0] if isinstance(output, tuple) else output
        mixed = h + self.m * (out - h) if self.m > 0 else h + 0.0 * out  # keep the graph: DDP expects grads
        return (mixed, *output[1:]) if isinstance(output, tuple) else mixed


class LayerFade(GrowthMasks):
    """Masks of whole blocks only (the fade-in): blocks at ``positions`` enter as
    ``h + m (block(h) - h)`` over ``steps`` optimizer steps; :meth:`set_step` takes the steps since
    the growth (0 = the first)."""

    def __init__(self, model: torch.nn.Module, positions: Sequence[int], steps: int) -> None:
        super().__init__(model, layer_mask_spec(positions, start_step=0, steps=steps))
        self.steps = int(steps)
        self.positions = [int(i) for i in positions]


def _in_features(module: torch.nn.Module) -> int:
    """Size of the last input dim of a linear-like module (``nn.Linear`` [out, in], GPT-2 ``Conv1D``
    [in, out])."""
    if hasattr(module, "in_features"):
        return int(module.in_features)
    if hasattr(module, "nx"):
        return int(module.nx)
    raise ValueError(f"cannot mask the inputs of a {type(module).__name__}: not a linear module")
