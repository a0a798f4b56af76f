"""Which parameters train: the run option ``train.trainable`` (continued pretraining, LLaMA-Pro).

``train.trainable`` is one of

* ``all`` (default): every parameter trains.
* ``new``: only the parameters born in this run train: the blocks a depth growth inserts, and the
  parameters the starting ``model.checkpoint`` does not contain (initialised by the run, e.g. the
  masked-LM head put on a ``BertModel`` checkpoint). Every tensor of the checkpoint stays frozen,
  bit-identical to the source (LLaMA-Pro, Wu et al. 2024, arXiv 2401.02415). ``new`` decides per
  *tensor*: a width growth (hidden size, heads, FFN units) extends existing tensors so that they mix
  old and new entries, which one ``requires_grad`` flag cannot split (and AdamW's decoupled weight
  decay would move the old entries even with their gradients masked), so :func:`check_trainable`
  refuses ``new`` with a width growth.
* a list of role names (:data:`progtrain.arch.ROLES`, e.g. ``embed``, ``q``, ``down``, ``norm``,
  ``head_transform``, or the groups of :data:`ROLE_GROUPS`: ``attn``, ``ffn``), layer indices
  (ints: the transformer blocks of the model being trained, numbered after the growths, so an index
  past the current depth selects nothing until a growth adds that block) and ``new``: the union of
  what each entry selects.

The optimizer holds only the trainable parameters (``requires_grad`` False on the rest; weight
decay never reaches a frozen one). The selection is applied to every model the run trains: the
initial one and each grown one (:meth:`progtrain.train.engine.ProgressiveTrainer._build`).
"""

from __future__ import annotations

import logging
from typing import Any, Iterable, Mapping

import torch

from ..arch.base import ROLES, base_prefix, get_adapter
from ..errors import ProgtrainConfigError

logger = logging.getLogger(__name__)

#: role groups accepted in ``train.trainable`` besides the adapter roles themselves
ROLE_GROUPS: dict[str, tuple[str, ...]] = {
    "attn": ("q", "k", "v", "qkv", "o", "q_norm", "k_norm"),
    "ffn": ("up", "gate", "down", "gate_up"),
}

#: what ``train.trainable`` accepts, for error messages
TRAINABLE_HELP = ("all | new | a list of role names (e.g. [embed, attn, ffn, norm]), layer indices (e.g. [6, 7]) "
                  "and/or new")


def parse_trainable(value: Any, where: str = "train.trainable") -> str | tuple:
    """``value`` normalised: ``"all"``, ``"new"``, or a tuple of entries (role names, ``"new"``,
    non-negative ints), duplicates removed, in the given order.

    Raises:
        ProgtrainConfigError: an unknown role name, a negative or non-integer index, an empty list, or
            another type; names the bad value and the valid ones.
    """
    if value is None:
        return "all"
    if isinstance(value, str):
        if value in ("all", "new"):
            return value
        value = [value]  # a single role name
    if not isinstance(value, (list, tuple)) or not value:
        raise ProgtrainConfigError(f"{where}={value!r}: use {TRAINABLE_HELP}")
    out: list = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (str, int)):
            raise ProgtrainConfigError(f"{where}: entry {v!r} is neither a role name nor a layer index; use {TRAINABLE_HELP}")
        if isinstance(v, int) and v < 0:
            raise ProgtrainConfigError(f"{where}: layer index {v} is negative; layers are numbered from 0")
        if isinstance(v, str) and v != "new" and v not in ROLES and v not in ROLE_GROUPS:
            if v == "all":
                raise ProgtrainConfigError(f"{where}: 'all' cannot be part of a list; write trainable: all")
            raise ProgtrainConfigError(
                f"{where}: unknown role {v!r}; valid: new, {', '.join(ROLE_GROUPS)}, {', '.join(ROLES)} or layer indices"
            )
        if v not in out:
            out.append(v)
    return tuple(out)


def _roles(entries: Iterable) -> set[str]:
    roles: set[str] = set()
    for e in entries:
        if isinstance(e, str) and e != "new":
            roles.update(ROLE_GROUPS.get(e, (e,)))
    return roles


def uses_new(spec: str | tuple) -> bool:
    """The selection includes the parameters born in this run."""
    return spec == "new" or (isinstance(spec, tuple) and "new" in spec)


def adapter_roles(config: Any) -> set[str]:
    """The roles the adapter of ``config``'s family declares (every parameter it describes)."""
    ad = get_adapter(config)
    specs = list(ad.params.values()) + list(ad.layer_params.values()) + list(ad.head_params.values())
    return {s.role for s in specs}


def check_trainable(spec: str | tuple, *, initial_config: Any, stage_configs: list, growths: list,
                    checkpoint: str | None) -> None:
    """Validate ``train.trainable`` against the run: ``new`` needs a starting checkpoint and growths
    that add whole tensors only (depth); named roles exist in the family; every stage of a run that
    names only layer indices trains something.

    Args:
        spec: :func:`parse_trainable`'s result.
        initial_config: the HF config of the initial model.
        stage_configs: HF configs of the model trained in each stage (stage 0 first).
        growths: ``(stage name, GrowthSpec, start step)`` of each stage.
        checkpoint: ``model.checkpoint`` (None for a fresh model).

    Raises:
        ProgtrainConfigError: naming the problem and the fix.
    """
    if spec == "all":
        return
    if uses_new(spec):
        if not checkpoint:
            raise ProgtrainConfigError(
                "train.trainable: new freezes the parameters of the starting model.checkpoint and trains what the run "
                "adds; this run starts from a fresh model (no model.checkpoint): set model.checkpoint, or use "
                "trainable: all"
            )
        if not growths:
            raise ProgtrainConfigError(
                "train.trainable: new trains only the parameters born in this run's growths, and the run has no "
                "stages: add a depth growth (e.g. a stage with start_step: 0 and grow: {num_layers: ...}), or list "
                "what trains (roles / layer indices)"
            )
        for name, grow, _ in growths:
            widened = [k for k in ("hidden_size", "num_heads", "num_kv_heads", "intermediate_size")
                       if getattr(grow, k, None) is not None]
            if widened:
                raise ProgtrainConfigError(
                    f"train.trainable: new with stage {name} growing {', '.join(widened)}: a width growth extends the "
                    f"existing tensors, which then mix old and new entries that one trainable flag cannot separate; "
                    f"grow only num_layers (LLaMA-Pro), or use trainable: all or a list of roles / layer indices"
                )
    entries = ("new",) if spec == "new" else spec
    roles = _roles(entries)
    if roles:
        have = adapter_roles(initial_config)
        missing = sorted(roles - have)
        named = [e for e in entries if isinstance(e, str) and e != "new" and not (set(ROLE_GROUPS.get(e, (e,))) & have)]
        if named:
            raise ProgtrainConfigError(
                f"train.trainable: the {initial_config.model_type} family has no {', '.join(map(repr, named))} "
                f"parameters; its roles are {', '.join(sorted(have))}"
            )
        if missing:
            logger.debug("train.trainable: roles %s absent from %s (part of a group)", missing, initial_config.model_type)
    layers = [e for e in entries if isinstance(e, int)]
    if layers:
        depths = [get_adapter(c).read_sizes(c).layers for c in stage_configs]
        top = max(depths)
        bad = [i for i in layers if i >= top]
        if bad:  # whatever else the list names: an index no model of the run has is a typo
            raise ProgtrainConfigError(
                f"train.trainable: layer index(es) {bad} past the deepest model of the run ({top} layers, "
                f"indices 0..{top - 1})"
            )
    if layers and not roles and not uses_new(spec):
        for s, depth in enumerate(depths):
            if not any(i < depth for i in layers):
                raise ProgtrainConfigError(
                    f"train.trainable: layers {layers} select nothing in stage {s} ({depth} layers): add a layer "
                    f"index below {depth} or a role, or start the growth that adds those layers at step 0"
                )


def _plain_name(name: str) -> str:
    """The plain HF name of a module parameter (a parametrised tensor's pieces map to its name)."""
    if ".parametrizations." in name:
        mod, rest = name.split(".parametrizations.", 1)
        return f"{mod}.{rest.split('.')[0]}"
    return name


def select_trainable(model: torch.nn.Module, spec: str | tuple, births: Mapping[str, torch.Tensor] | None,
                     fresh: Iterable[str] = ()) -> set[str]:
    """Plain names of ``model``'s parameters that ``spec`` trains.

    Args:
        model: the model to train (a supported HF model).
        spec: :func:`parse_trainable`'s result.
        births: ``{plain name: int8 birth-stage tensor}`` (:func:`progtrain.train.lr_scales.update_birth_stages`);
            a tensor every element of which was born at a stage > 0 is new.
        fresh: plain names of parameters the starting checkpoint did not contain (new too).

    Raises:
        ProgtrainConfigError: ``new`` is asked and ``births`` is None.
    """
    from ..bake import plain_named_parameters

    names = [n for n, _ in plain_named_parameters(model)]
    if spec == "all":
        return set(names)
    entries = ("new",) if spec == "new" else spec
    out: set[str] = set()
    if "new" in entries:
        if births is None:
            raise ProgtrainConfigError("train.trainable: new needs the birth stages of the parameters (none recorded)")
        fresh = set(fresh)
        out |= {n for n in names if n in fresh or (n in births and bool((births[n] > 0).all()))}
    roles, layers = _roles(entries), {e for e in entries if isinstance(e, int)}
    if roles or layers:
        adapter, prefix = get_adapter(model), base_prefix(model)
        for n in names:
            spec_, layer, _ = adapter.classify(n, prefix)
            if spec_.role in roles or (layer is not None and layer in layers):
                out.add(n)
    return out


def apply_trainable(model: torch.nn.Module, spec: str | tuple, births: Mapping[str, torch.Tensor] | None,
                    fresh: Iterable[str] = ()) -> tuple[int, int]:
    """Set ``requires_grad`` on every parameter of ``model``: True for :func:`select_trainable`'s
    selection, False for the rest (a tied head follows its embedding).

    Returns:
        ``(trainable, frozen)`` parameter counts (elements).

    Raises:
        ProgtrainConfigError: the selection is empty (nothing would train).
    """
    keep = select_trainable(model, spec, births, fresh)
    if not keep:
        raise ProgtrainConfigError(
            f"train.trainable={spec if isinstance(spec, str) else list(spec)} selects no parameter of the "
            f"{model.config.model_type} model being trained: with new, start a depth growth at step 0 "
            f"(start_step: 0); otherwise name roles or layers the model has"
        )
    n_train = n_frozen = 0
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        on = _plain_name(name) in keep
        p.requires_grad_(on)
        if on:
            n_train += p.numel()
        else:
            n_frozen += p.numel()
    return n_train, n_frozen
