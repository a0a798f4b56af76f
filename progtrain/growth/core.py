"""``grow()``: turn a Hugging Face model into a larger model of the same class.

Data flows one way: GrowthSpec -> adapter (roles, spaces) -> space maps and axis plans (constrained
blocks) -> init strategy (free blocks) -> a model of the same HF class with a new config.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import init_empty_weights
from transformers import PreTrainedModel

from .. import arch  # noqa: F401  (registers adapters)
from .. import init as _init  # noqa: F401  (registers strategies)
from ..arch.base import BLOCK_OUTPUT_ROLES, Sizes, base_prefix, get_adapter, has_tied_head, iter_params
from ..carry import carry_generation_config
from ..errors import ProgtrainConfigError
from ..init.base import GrowthContext, TensorGrowth
from .plan import FREE, OLD, ZERO, ParamMap, SpaceMaps, apply_plans
from .spec import INIT_DRAWS, GrowthPlan, GrowthSpec, plan_growth

logger = logging.getLogger(__name__)


@dataclass
class GrowthResult:
    """What :func:`grow` returns.

    Attributes:
        model: the grown model (same class as the input, new config, same train/eval mode, a copy of
            the input's ``generation_config``; every parameter and buffer in the source's dtype, or in
            the ``dtype`` asked of :func:`grow`).
        source_sizes / target_sizes: the sizes before and after.
        param_maps: grown parameter name -> :class:`ParamMap` (for optimizer-state surgery and
            birth-stage bookkeeping).
        maps: the :class:`SpaceMaps` of this growth.
        exact: the *measured* label: True when the grown model's outputs are within the tolerance
            of the source's (``deviation["rel"] <= deviation["tolerance"]``, see
            :func:`progtrain.verify.measure_deviation`), False when not, None when ``verify=False``
            (not measured: no claim).
        notes: why the growth is approximate: the reasons known before building it (see
            ``expected_exact``) and, when the measurement disagrees with them, a note saying so.
        deviation: the measured max |delta logits| (see :func:`progtrain.verify.measure_deviation`),
            or None when ``verify=False``.
        record: JSON-serialisable growth-history entry.
        expected_exact: what the construction promises in exact arithmetic (no known reason for a
            deviation); not a measurement.
    """

    model: PreTrainedModel
    source_sizes: Sizes
    target_sizes: Sizes
    param_maps: dict[str, ParamMap]
    maps: SpaceMaps
    exact: bool | None
    notes: list[str]
    deviation: dict | None
    record: dict = field(default_factory=dict)
    expected_exact: bool = True


def _make_new_layer_tensor(how: str, pspec: Any, value: torch.Tensor, status: torch.Tensor) -> None:
    """Turn a tensor of a new layer, built as a copy of its source layer's, into what ``how`` (a
    ``GrowthPlan.layer_init`` value) asks, in place: ``copy`` keeps it; ``copy_zero_out`` zeroes the
    block's output projections and their biases (``BLOCK_OUTPUT_ROLES``: the block adds nothing to
    the stream); ``zero_out`` leaves every other tensor but the norms to the init strategy (FREE) and
    zeroes the outputs (norm gains/shifts stay copies: a zero gain would leave the block without
    gradient); ``init`` leaves all of it to the strategy."""
    is_norm = any(a in ("hidden.gain", "hidden.shift") for a in pspec.axes if a)
    if how == "copy":
        return
    if how in ("copy_zero_out", "zero_out") and pspec.role in BLOCK_OUTPUT_ROLES:
        status.fill_(ZERO)
        value.zero_()
    elif how == INIT_DRAWS or (how == "zero_out" and not is_norm):
        status.fill_(FREE)
        value.zero_()


def _fan_in(shape: tuple[int, ...], axes: tuple[str | None, ...]) -> int:
    """Inputs per output unit: product of the sizes of the tensor's input axes (1 for a vector)."""
    if len(shape) < 2:
        return 1
    n = 1
    for size, tag in zip(shape, axes):
        if tag is not None and (tag.endswith(".in")):
            n *= size
    if n == 1:  # embeddings: fan-in is the one-hot vocab axis
        n = shape[0] if axes[0] is None else shape[-1]
    return n


def _stored_gain(
    value: torch.Tensor, built: torch.Tensor, old: torch.Tensor, plans: list, status: torch.Tensor, offset: float
) -> torch.Tensor:
    """The stored weight ``w`` of a norm computing ``x_hat * (offset + w)`` (``adapter.norm_offset``),
    from the grown effective gain ``value`` (what the plans and the init strategy produced).

    ``value - offset`` in fp32 loses the low bits of ``w`` (``(1 + w) - 1 != w``). Elements the strategy
    left as the plans built them (``built``) are recomputed from ``w`` directly instead:
    ``c * (offset + w) - offset = c * w + (c - 1) * offset`` with ``c`` the plans' multiplier, so an
    element copied unscaled keeps its bits and an old layer's norm is bit-identical to its source's."""
    throwaway = torch.Generator().manual_seed(0)  # no noise on gains; the growth's generator is untouched
    w_planned, _ = apply_plans(old, plans, 0.0, throwaway)
    mult, _ = apply_plans(torch.ones_like(old, dtype=torch.float32), plans, 0.0, throwaway)
    untouched = (status == OLD) & (value == built)
    return torch.where(untouched, w_planned + (mult - 1.0) * offset, value - offset)


def _param_dtype(
    name: str, old: torch.dtype, src_main: torch.dtype, out: torch.dtype | None, model: PreTrainedModel
) -> torch.dtype:
    """The grown parameter's dtype: the source parameter's when ``out`` is None; else ``out``,
    except for a parameter the source kept in another dtype than its main one (kept as it was) and
    for modules the model class keeps in fp32 at ``out`` (``_keep_in_fp32_modules`` for fp16,
    ``_keep_in_fp32_modules_strict`` for fp16 and bf16, as ``from_pretrained`` does)."""
    if out is None or not old.is_floating_point:
        return old
    if old != src_main:
        return old
    keep = set()
    if out == torch.float16:
        keep |= set(getattr(model, "_keep_in_fp32_modules", None) or ())
    if out in (torch.float16, torch.bfloat16):
        keep |= set(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    if any(f".{k}." in f".{name}." for k in keep):
        return torch.float32
    return out


def _layer_free_name(name: str) -> str:
    """``model.layers.3.attn.bias`` -> ``model.layers.#.attn.bias`` (per-layer names match across depths)."""
    return re.sub(r"(?<=\.)\d+(?=\.)", "#", name)


def _mirror_buffer_dtypes(new: torch.nn.Module, old: torch.nn.Module) -> None:
    """Give each buffer of ``new`` the dtype its counterpart in ``old`` has (same name, layer
    indices ignored), buffer by buffer: transformers keeps some buffers in fp32 in a half-precision
    model (rotary ``inv_freq``), and ``model.to(dtype)`` casts them all; the grown model follows
    what the source had. Values stay as the grown config computes them."""
    from ..bake import set_buffer

    want = {}
    for name, buf in old.named_buffers():
        want.setdefault(_layer_free_name(name), buf.dtype)
    for name, buf in list(new.named_buffers()):
        dt = want.get(_layer_free_name(name))
        if dt is not None and dt != buf.dtype and dt.is_floating_point == buf.dtype.is_floating_point:
            set_buffer(new, name, buf.to(dt))


def grow(
    model: PreTrainedModel,
    spec: GrowthSpec | GrowthPlan | dict | None = None,
    *,
    init: str | Any | None = None,
    init_kwargs: dict | None = None,
    seed: int = 0,
    verify: bool = True,
    data: Any = None,
    dtype: str | torch.dtype | None = "auto",
    **sizes: Any,
) -> GrowthResult:
    """Grow ``model`` to the sizes in ``spec`` (or keyword arguments such as ``hidden_size=768``).

    Args:
        model: a supported ``transformers`` model (base model, causal LM or masked LM).
        spec: a :class:`GrowthSpec`, a dict of its fields, None to use ``**sizes``, or a
            :class:`GrowthPlan` already made for this model's config by :func:`plan_growth` (then it is
            used as it is, with its init strategy: pass no ``init``, ``init_kwargs`` or sizes).
        init: name of a registered init strategy (``progtrain.init.available_strategies()``) or an
            :class:`~progtrain.init.InitStrategy` instance (default ``function_preserving``).
        init_kwargs: options of the strategy.
        seed: seeds the symmetry-breaking noise and the strategy's random draws.
        verify: measure max |delta logits| between the old and grown model on random tokens
            (:func:`progtrain.verify.measure_deviation`, the measurement ``progtrain verify`` makes);
            the result's ``exact`` is that measurement against the tolerance, and None without it.
        data: batches for data-driven strategies (GradInit, splitting, GradMax); checked against
            the model's input limits (``progtrain.growth.calibration.check_batches_fit``).
        dtype: dtype of the grown model. ``"auto"`` (default) or None: the source's, per parameter
            and per buffer (a bf16 model grows into a bf16 model; a buffer the source keeps in fp32,
            such as rotary ``inv_freq`` of a model loaded in bf16, stays fp32). ``"float32"``,
            ``"bfloat16"``, ``"float16"`` or a ``torch.dtype``: every floating parameter in that
            dtype (except modules the model class keeps in fp32, as ``from_pretrained`` does),
            buffers as the model class builds them at that dtype. The growth arithmetic runs in
            fp32 and is rounded once to the output dtype, so a growth that is exact in exact
            arithmetic deviates by that rounding only; ``deviation["tolerance"]``
            (:func:`progtrain.verify.tolerance_for` of the source's and the output's dtypes, the
            coarser decides) is the relative deviation they allow: 1e-5 in float32, 1.56e-2 (2 eps)
            in bfloat16, 1.95e-3 (2 eps) in float16.

    Returns:
        A :class:`GrowthResult`; the input model is not modified.

    Raises:
        ProgtrainConfigError: bad sizes or layer sources, unsupported architecture, strategy or dtype,
            a grown config the family's config class rejects (:func:`plan_growth`), a plan made for
            another config, or calibration batches outside the model's limits; raised before any
            tensor is built.
    """
    t0 = time.perf_counter()
    plan, out_dtype, data = _check_inputs(model, spec, init, init_kwargs, sizes, dtype, data)
    strategy, tied = plan.strategy, has_tied_head(model)
    old_params = dict(iter_params(model))
    for n in old_params:
        plan.adapter.classify(n, base_prefix(model))  # raises on unknown params
    maps = SpaceMaps.build(plan, tied)
    main_dtype = out_dtype or model.dtype  # transformers' notion: the first floating parameter's dtype
    new_model = _empty_target_model(model, plan, tied, main_dtype)
    gen = torch.Generator().manual_seed(seed)
    ctx = GrowthContext(old_model=model, new_model=None, maps=maps, param_maps={}, data=data)
    strategy.before(ctx)
    noise = plan.spec.symmetry_noise if strategy.preserves_function else 0.0
    state, param_maps = _grown_tensors(model, new_model, plan, maps, old_params, noise, gen, out_dtype)
    _load_grown_state(new_model, state, tied)
    if out_dtype is None:
        _mirror_buffer_dtypes(new_model, model)
    new_model.train(model.training)
    ctx.new_model, ctx.param_maps = new_model, param_maps
    strategy.after(ctx)

    notes = maps.exactness_notes() + list(ctx.report.get("notes", []))
    expected_exact = not notes
    exact, deviation = _measure(model, new_model, maps, seed, plan.adapter.name, notes) if verify else (None, None)
    outcome = {"exact": exact, "expected_exact": expected_exact, "notes": notes, "deviation": deviation}
    record = _growth_record(model, new_model, plan, maps, ctx, seed, noise, main_dtype, outcome, t0)
    return GrowthResult(new_model, plan.source_sizes, plan.target_sizes, param_maps, maps, exact, notes, deviation,
                        record, expected_exact)


def _growth_record(model: PreTrainedModel, new_model: PreTrainedModel, plan: GrowthPlan, maps: SpaceMaps,
                   ctx: GrowthContext, seed: int, noise: float, main_dtype: torch.dtype, outcome: dict,
                   t0: float) -> dict:
    """Step 6 of :func:`grow`: the growth record (``GrowthResult.record``, written to the growth
    history): the plan's record, the strategy, seed, dtypes, the measured ``outcome`` (exact,
    expected_exact, notes, deviation; ``exact`` None when nothing was measured: no measurement, no
    claim), parameter counts and the seconds since ``t0``."""
    return {
        **plan.record(),
        "model_class": type(model).__name__,
        "hidden_index_map": [int(i) for i in maps.plan("hidden.out", "").src] if maps.hidden_mode != "same" else None,
        "init": plan.strategy.describe(),
        "seed": seed,
        "dtype": {"source": str(model.dtype).removeprefix("torch."), "grown": str(main_dtype).removeprefix("torch.")},
        "symmetry_noise": noise,
        **outcome,
        "strategy_report": {k: v for k, v in ctx.report.items() if k != "notes"},
        "params_before": sum(p.numel() for _, p in iter_params(model)),
        "params_after": sum(p.numel() for _, p in iter_params(new_model)),
        "seconds": round(time.perf_counter() - t0, 3),
    }


def _check_inputs(model: Any, spec: GrowthSpec | GrowthPlan | dict | None, init: str | Any | None,
                  init_kwargs: dict | None, sizes: dict, dtype: str | torch.dtype | None,
                  data: Any) -> tuple[GrowthPlan, torch.dtype | None, Any]:
    """Step 1 of :func:`grow`, before any tensor is built: the model, the output dtype (None: the
    source's, per tensor), the :class:`GrowthPlan` (sizes, layer sources, strategy, grown config;
    made, or checked against ``model``) and a data-driven strategy's batches (against the model's
    input limits: a clear error, not an IndexError inside the model) -> ``(plan, dtype, data)``.

    Raises:
        ProgtrainConfigError: not a PreTrainedModel, an unknown dtype, a plan with extra arguments or
            for another model, a spec given twice, anything :func:`plan_growth` refuses, or batches
            outside the model's limits.
    """
    from ..io import resolve_dtype

    if not isinstance(model, PreTrainedModel):
        raise ProgtrainConfigError(
            f"grow() takes a transformers PreTrainedModel, got {type(model).__name__}; unwrap it first "
            f"(accelerator.unwrap_model(model))"
        )
    out_dtype = resolve_dtype(dtype)
    if isinstance(spec, GrowthPlan):
        if sizes or init is not None or init_kwargs:
            raise ProgtrainConfigError("a GrowthPlan holds the sizes and the init strategy: pass it alone")
        if get_adapter(model) is not spec.adapter or spec.adapter.read_sizes(model.config) != spec.source_sizes:
            raise ProgtrainConfigError(
                f"this GrowthPlan was made for a {spec.adapter.name} model of sizes {spec.source_sizes.as_dict()}, "
                f"not for this {type(model).__name__}: make the plan from this model's config (plan_growth)"
            )
        plan = spec
    else:
        if spec is None:
            spec = GrowthSpec.from_dict(sizes)
        elif isinstance(spec, dict):
            spec = GrowthSpec.from_dict({**spec, **sizes})
        elif sizes:
            raise ProgtrainConfigError("pass either a GrowthSpec or size keywords, not both")
        plan = plan_growth(model.config, spec, "function_preserving" if init is None else init, init_kwargs)
    if data is not None and plan.strategy.needs_data:
        from .calibration import check_batches_fit, input_limits

        data = list(data)
        check_batches_fit(data, input_limits(model))
    return plan, out_dtype, data


def _empty_target_model(model: PreTrainedModel, plan: GrowthPlan, tied: bool, main_dtype: torch.dtype) -> PreTrainedModel:
    """Step 2 of :func:`grow`: the grown model of ``model``'s class on the meta device (no memory),
    its config ``model``'s own config object with the plan's sizes and layer sources applied (it may
    carry load-time settings the plan's copy lacks), ``dtype`` ``main_dtype``; generation settings
    carried over."""
    new_config = plan.adapter.write_config(model.config, plan.target_sizes, plan.eps_scale, list(plan.layer_sources))
    new_config.architectures = [type(model).__name__]
    new_config.dtype = main_dtype  # what save_pretrained writes, and from_pretrained's "auto" reads
    # built under the output dtype as the default, as from_pretrained builds a model: buffers come
    # out as the model class makes them at that dtype
    prev_default = torch.get_default_dtype()
    torch.set_default_dtype(main_dtype)
    try:
        with init_empty_weights():
            new_model = type(model)(new_config)
    finally:
        torch.set_default_dtype(prev_default)
    if tied:
        new_model.tie_weights()
    carry_generation_config(model, new_model)  # eos ids, sampling defaults, max_new_tokens: vocab is unchanged
    return new_model


def _grown_tensors(model: PreTrainedModel, new_model: PreTrainedModel, plan: GrowthPlan, maps: SpaceMaps,
                   old_params: dict[str, torch.Tensor], noise: float, gen: torch.Generator,
                   out_dtype: torch.dtype | None) -> tuple[dict[str, torch.Tensor], dict[str, ParamMap]]:
    """Step 3 of :func:`grow`: every parameter of ``new_model`` built from its source tensor by the
    axis plans (constrained blocks), its free blocks filled by the plan's strategy, in its output
    dtype. Returns the state dict and each parameter's :class:`ParamMap`.

    Raises:
        ProgtrainConfigError: a grown parameter has no source in ``model``.
    """
    adapter, strategy = plan.adapter, plan.strategy
    prefix, new_prefix = base_prefix(model), base_prefix(new_model)
    state: dict[str, torch.Tensor] = {}
    param_maps: dict[str, ParamMap] = {}
    for name, p_new in iter_params(new_model):
        pspec, layer, suffix = adapter.classify(name, new_prefix)
        new_layer = False
        if layer is None:
            old_name = name if name in old_params else None
            if old_name is None:
                raise ProgtrainConfigError(f"grown model has parameter {name!r} with no source in the old model")
        else:
            new_layer = maps.layer_new[layer]
            old_name = adapter.layer_param_name(prefix, maps.layer_src[layer], suffix)
        old = old_params[old_name]
        plans = [maps.plan(tag, pspec.role, layer) if tag else None for tag in pspec.axes]
        # a norm computing x_hat * (offset + w) grows its effective gain offset + w (adapter.norm_offset)
        offset = adapter.norm_offset if "hidden.gain" in pspec.axes else 0.0
        old_eff = old.detach().float() + offset if offset else old
        value, status = apply_plans(old_eff, plans, noise, gen)
        if new_layer:
            _make_new_layer_tensor(maps.layer_init[layer], pspec, value, status)
        if tuple(value.shape) != tuple(p_new.shape):
            raise RuntimeError(f"{name}: built {tuple(value.shape)}, model expects {tuple(p_new.shape)}")
        pmap = ParamMap(old_name, plans, new_layer, tuple(value.shape))
        tg = TensorGrowth(
            name=name, role=pspec.role, axes=pspec.axes, value=value, free=status == FREE, born=pmap.born_mask(),
            old=old_eff.detach().float(), fan_in_old=_fan_in(tuple(old.shape), pspec.axes),
            fan_in_new=_fan_in(tuple(value.shape), pspec.axes), new_layer=new_layer, config=new_model.config,
            generator=gen,
        )
        built = tg.value.clone() if offset else None
        strategy.init_tensor(tg)
        if offset:
            tg.value = _stored_gain(tg.value, built, old, plans, status, offset)
        state[name] = tg.value.to(_param_dtype(name, old.dtype, model.dtype, out_dtype, new_model))
        param_maps[name] = pmap
    return state, param_maps


def _load_grown_state(new_model: PreTrainedModel, state: dict[str, torch.Tensor], tied: bool) -> None:
    """Step 4 of :func:`grow`: the built tensors assigned to the meta model; ties restored. Raises
    RuntimeError (an internal invariant) when a key is unexpected or a parameter is left unset."""
    _, unexpected = new_model.load_state_dict(state, strict=False, assign=True)
    still_meta = [n for n, p in new_model.named_parameters() if p.is_meta]
    if unexpected:
        raise RuntimeError(f"unexpected keys when loading the grown state: {unexpected}")
    if tied or still_meta:
        new_model.tie_weights()
        still_meta = [n for n, p in new_model.named_parameters() if p.is_meta]
    if still_meta:
        raise RuntimeError(f"parameters left unset after growth: {still_meta}")


def _measure(model: PreTrainedModel, new_model: PreTrainedModel, maps: SpaceMaps, seed: int, family: str,
             notes: list[str]) -> tuple[bool, dict]:
    """Step 5 of :func:`grow`: max |delta logits| of the grown model against the source
    (:func:`progtrain.verify.measure_deviation`) -> ``(within tolerance, deviation)``; logged. A
    construction expected to be exact (``notes`` empty) that misses the tolerance adds a note."""
    from ..verify import measure_deviation

    expected_exact = not notes
    deviation = measure_deviation(model, new_model, maps=maps, seed=seed)
    exact, tol = deviation["within_tolerance"], deviation["tolerance"]
    if expected_exact and not exact:
        notes.append(
            f"measured relative deviation {deviation['rel']:.3e} exceeds the tolerance {tol:g} although "
            f"the construction should be exact: a config option the {family} adapter does not "
            f"model, or a bug (please report it)"
        )
    msg = f"grow {family}: max|dlogits| = {deviation['max_abs']:.3e} ({deviation['rel']:.3e} of max|logits|, tolerance {tol:g})"
    if exact:
        logger.info(msg + " [exact]")
    else:
        logger.warning(msg + " [approximate: " + "; ".join(notes) + "]")
    return exact, deviation
