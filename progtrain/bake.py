"""Turn parametrised modules (``torch.nn.utils.parametrize``, e.g. MixtureGrowth templates) back
into plain tensors, so growth and saving always see a standard Hugging Face model."""

from __future__ import annotations

from typing import Iterator

import torch
from torch.nn.utils import parametrize


def is_parametrized(model: torch.nn.Module) -> bool:
    """True when any submodule of ``model`` carries a parametrisation."""
    return any(parametrize.is_parametrized(m) for m in model.modules())


def plain_named_parameters(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Named parameters as the plain HF module names them, without duplicates (a tied head appears
    once). A parametrised tensor is yielded under its plain name (``...weight``) with its current
    computed value (detached); the parametrisation's own tensors (templates, coefficients) are not."""
    seen: set[int] = set()
    for mname, module in model.named_modules():
        if ".parametrizations." in f".{mname}." or mname.endswith("parametrizations"):
            continue
        prefix = f"{mname}." if mname else ""
        computed = set(module.parametrizations.keys()) if parametrize.is_parametrized(module) else set()
        for pname in computed:
            yield prefix + pname, getattr(module, pname).detach()
        for pname, p in module.named_parameters(recurse=False):
            if pname in computed or id(p) in seen:
                continue
            seen.add(id(p))
            yield prefix + pname, p


def bake_(model: torch.nn.Module) -> torch.nn.Module:
    """Replace every parametrised tensor by its current value, in place; returns ``model``."""
    for module in list(model.modules()):
        if parametrize.is_parametrized(module):
            for name in list(module.parametrizations.keys()):
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    return model


def baked_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A plain copy of a parametrised HF model (same class and config, current values), leaving
    ``model`` unchanged; returns ``model`` itself when nothing is parametrised."""
    if not is_parametrized(model):
        return model
    from accelerate import init_empty_weights

    from .carry import carry_generation_config

    with init_empty_weights():
        plain = type(model)(model.config)
    values = {n: t.detach().clone() for n, t in plain_named_parameters(model)}
    plain.load_state_dict(values, strict=False, assign=True)
    plain.tie_weights()
    carry_generation_config(model, plain)
    left = [n for n, p in plain.named_parameters() if p.is_meta]
    if left:
        raise RuntimeError(f"baking left parameters unset: {left}")
    copy_buffers(plain, model)
    return plain.train(model.training)


def copy_buffers(target: torch.nn.Module, source: torch.nn.Module) -> None:
    """Give every buffer of ``target`` the value and dtype of ``source``'s buffer of the same name
    (buffers ``source`` lacks are left alone). Per buffer, not a blanket cast: transformers keeps
    some buffers (e.g. rotary ``inv_freq``) in fp32 in a bf16 model, and a model moved with
    ``.to(dtype)`` has them in that dtype."""
    src = dict(source.named_buffers())
    for name, buf in list(target.named_buffers()):
        other = src.get(name)
        if other is None or other.shape != buf.shape:
            continue
        set_buffer(target, name, other.detach().clone())


def set_buffer(model: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace buffer ``name`` (dotted path) of ``model`` by ``value``, keeping its persistence."""
    mod_name, _, buf_name = name.rpartition(".")
    module = model.get_submodule(mod_name) if mod_name else model
    module._buffers[buf_name] = value
