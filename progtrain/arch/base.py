"""Architecture adapters: map a Hugging Face model's parameters to growth *roles* and *spaces*.

An adapter is declarative data. For every parameter tensor of a family it gives a :class:`ParamSpec`:
the parameter's role (``q``, ``down``, ``final_norm`` ...) and, for each tensor dimension, an *axis
tag* that says which space the dimension lives in and how it relates to the data flow:

==================  ============================================================================
axis tag            meaning
==================  ============================================================================
``hidden.out``      the tensor *writes* the residual stream along this dim (embeddings, ``o``,
                    ``down`` and their biases)
``hidden.in``       the tensor *reads* the residual stream along this dim (``q/k/v``, ``up``,
                    ``gate``, LM head)
``hidden.gain``     elementwise norm gain (LayerNorm/RMSNorm weight)
``hidden.shift``    elementwise norm shift (LayerNorm bias)
``ffn.out``         produces FFN units (``up``/``gate`` rows and biases)
``ffn.in``          consumes FFN units (``down`` columns)
``q.out``           query heads x head_dim produced (``q`` rows and bias)
``k.out``/``v.out`` key/value heads x head_dim produced
``o.in``            attention heads x head_dim consumed by the output projection
``qkv.out``         fused q|k|v output; its layout is the adapter's ``fused_qkv`` field
``gate_up.out``     fused [gate | up] FFN output: two halves of FFN units each (Phi-3)
``None``            a dimension that never grows (vocab, positions, token types)
==================  ============================================================================

Every role is one of :data:`ROLES` (checked when an adapter is registered); operators and init
strategies select tensors by role, never by parameter name.

Nothing outside ``progtrain.arch`` knows a family by name: growth operators only read these tags.
Adding a family is a new module in this package that calls :func:`register_adapter`.

Config options that change the maths (attention scaling, parallel residual, sliding windows ...) are
declared per adapter in ``config_options`` (:class:`ConfigOption`): each is either modelled by the
growth (it stays exact, and the entry says how) or refused outside the values it allows, with one
error naming the option. The attention-scale law of a family (``attention_scale``) is data too: the
growth rescales query rows wherever a block's scale changes (wider heads, a block that moves to
another layer index).
"""

from __future__ import annotations

import copy
import json
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from transformers import PretrainedConfig, PreTrainedModel

from ..errors import ProgtrainConfigError, UnsupportedArchitectureError, config_error_text, config_errors

logger = logging.getLogger(__name__)

AXIS_TAGS = frozenset(
    {
        "hidden.out",
        "hidden.in",
        "hidden.gain",
        "hidden.shift",
        "ffn.out",
        "ffn.in",
        "q.out",
        "k.out",
        "v.out",
        "o.in",
        "qkv.out",
        "gate_up.out",
    }
)

_CONFIG_ERRORS = config_errors()  # what an invalid transformers config raises

#: Every parameter role an adapter may declare, with what it is. :func:`register_adapter` refuses
#: an adapter whose :class:`ParamSpec` names another role, so operators and strategies can rely on
#: this set (a new kind of tensor is added here first, with its meaning).
ROLES: dict[str, str] = {
    "embed": "token embedding (writes the residual stream)",
    "pos_embed": "learned position embedding (writes the stream)",
    "type_embed": "token-type (segment) embedding (writes the stream)",
    "embed_norm": "norm applied to the summed embeddings",
    "norm": "norm inside a block (before or after attention / FFN)",
    "final_norm": "norm whose output only the head reads",
    "q": "attention query projection",
    "k": "attention key projection",
    "v": "attention value projection",
    "qkv": "fused query|key|value projection (layout: the adapter's fused_qkv)",
    "o": "attention output projection (writes the stream)",
    "up": "FFN input projection (produces the FFN units)",
    "gate": "FFN gate projection of a gated FFN (SwiGLU)",
    "down": "FFN output projection (writes the stream)",
    "pooler": "pooler dense layer on the first token",
    "head_transform": "dense transform of a masked-LM head before its norm",
    "head": "LM / MLM decoder reading the stream (tied to embed or not)",
    "head_bias": "output bias of the LM / MLM decoder (one per vocabulary entry)",
    "q_norm": "query norm before the dot product: per head over head_dim (Qwen3, Gemma 3) or over the whole "
              "projection (OLMo2); see the adapter's qk_norm",
    "k_norm": "key norm before the dot product, as q_norm",
    "gate_up": "fused [gate|up] projection of a gated FFN (layout: the gate_up.out axis tag)",
    "embed_proj": "projection from a narrower embedding into the stream (OPT project_in)",
    "head_proj": "projection from the stream to a narrower head input (OPT project_out)",
}

# Roles whose output is added to the residual stream inside a block: zero them and the block is the
# identity in a pre-norm model.
BLOCK_OUTPUT_ROLES = frozenset({"o", "down"})
# Role of the norm whose output only the LM head reads (scaled by 1/k under tiling with a tied head).
HEAD_INPUT_NORM_ROLE = "final_norm"
# Role of the token embedding: the tensor ``embed_scale`` (when an adapter has one) multiplies.
EMBED_ROLE = "embed"


@dataclass(frozen=True)
class ParamSpec:
    """What one parameter tensor is: its role and one axis tag (or ``None``) per dimension."""

    role: str
    axes: tuple[str | None, ...]

    def __post_init__(self) -> None:
        for a in self.axes:
            if a is not None and a not in AXIS_TAGS:
                raise ValueError(f"unknown axis tag {a!r} in ParamSpec({self.role!r})")


def P(role: str, *axes: str | None) -> ParamSpec:
    """Shorthand constructor: ``P("q", "q.out", "hidden.in")``."""
    return ParamSpec(role, tuple(axes))


@dataclass(frozen=True)
class ConfigOption:
    """How growth treats one config attribute of a family that changes the model's maths.

    Attributes:
        how: what the option does and how the growth handles it (shown in errors and docs).
        allowed: None when every value is handled (the growth models the option and stays exact);
            otherwise the values the growth handles; any other value is refused before a tensor is
            built, with :class:`UnsupportedArchitectureError` naming the option.
        fixes: :class:`Sizes` fields (``"heads"``, ``"kv_heads"`` ...) the growth cannot change while
            the option is set (truthy): a growth that changes one is refused before a tensor is
            built, naming the option (e.g. one norm module per head, named by its head index).
    """

    how: str
    allowed: tuple[Any, ...] | None = None
    fixes: tuple[str, ...] = ()

    def accepts(self, value: Any) -> bool:
        return self.allowed is None or value in self.allowed


#: Options of every ``PretrainedConfig`` that change the maths; merged into each adapter's table.
COMMON_OPTIONS: dict[str, ConfigOption] = {
    "tie_word_embeddings": ConfigOption(
        "a tied head reads the stream through the embedding; under width tiling the norm before the "
        "head is scaled by 1/k instead of splitting the head's fan-in"
    ),
    "chunk_size_feed_forward": ConfigOption("FFN applied in chunks along the sequence; same maths"),
}


def default_attention_scale(config: PretrainedConfig, layer: int, head_dim: int) -> float:
    """The usual softmax scale ``1 / sqrt(head_dim)``, the same in every layer."""
    return head_dim**-0.5


def hf_size_keys(**overrides: str | None) -> dict[str, str | None]:
    """``ArchAdapter.config_keys`` with transformers' standard attribute names (``hidden_size``,
    ``num_attention_heads``, ``num_key_value_heads``, ``intermediate_size``, ``num_hidden_layers``,
    ``head_dim``, ``rms_norm_eps``), ``overrides`` replacing the family's own (None: the family has no
    such key, e.g. ``kv_heads=None`` without grouped-query attention, ``head_dim=None`` when head_dim is
    hidden / heads)."""
    keys: dict[str, str | None] = {
        "hidden": "hidden_size",
        "heads": "num_attention_heads",
        "kv_heads": "num_key_value_heads",
        "ffn": "intermediate_size",
        "layers": "num_hidden_layers",
        "head_dim": "head_dim",
        "norm_eps": "rms_norm_eps",
    }
    unknown = set(overrides) - set(keys)
    if unknown:
        raise ValueError(f"unknown size key(s) {sorted(unknown)}; valid: {', '.join(keys)}")
    return {**keys, **overrides}


#: The sizes of every tiny test config with transformers' standard keys: 32 wide, 4 heads of 8, 64 FFN
#: units, 2 layers, a vocabulary of 101 (every special token id fits).
TINY_SIZES: dict[str, int] = dict(
    hidden_size=32, num_attention_heads=4, intermediate_size=64, num_hidden_layers=2, vocab_size=101
)

#: The model tasks a :class:`TinyConfig` may name: the transformers auto class the conformance suite builds.
TINY_TASKS = {"causal-lm": "AutoModelForCausalLM", "masked-lm": "AutoModelForMaskedLM"}


@dataclass(frozen=True)
class TinyConfig:
    """A tiny config of a family for the shared conformance suite (``tests/test_conformance.py``, after
    transformers' ``ModelTester`` pattern): the suite builds ``AutoConfig.for_model(model_type,
    **config)``, a perturbed model of the task's auto class, and runs every growth operator on it
    (exactness, save and reload, greedy ``generate()`` or encoder outputs, eager vs sdpa).

    Attributes:
        name: short id used in test names (``kv2-tied``).
        config: keyword arguments of the family's config class (tied / untied head, biases, GQA ratio).
        task: a key of :data:`TINY_TASKS`: ``"causal-lm"`` (greedy generation with the KV cache is
            checked) or ``"masked-lm"`` (an encoder: masked-LM outputs under padding are checked).
    """

    name: str
    config: dict[str, Any]
    task: str = "causal-lm"

    def __post_init__(self) -> None:
        if self.task not in TINY_TASKS:
            raise ValueError(
                f"TinyConfig {self.name!r}: task must be one of {', '.join(TINY_TASKS)}, got {self.task!r}"
            )


def gqa_tiny_configs(bias_keys: tuple[str, ...] = (), **config: Any) -> tuple[TinyConfig, ...]:
    """The tiny configs of a grouped-query-attention family with transformers' standard size keys
    (:data:`TINY_SIZES`, then ``config``): 4 query heads with 4, 2 and 1 key/value heads (GQA ratios 1,
    2 and 4); the first has an untied head, the second a tied one, the third an untied head and the
    biases named by ``bias_keys`` switched on."""
    out = []
    for kv, tie, bias in ((4, False, False), (2, True, False), (1, False, True)):
        name = f"kv{kv}" + ("-tied" if tie else "") + ("-bias" if bias and bias_keys else "")
        kw = {**TINY_SIZES, "num_key_value_heads": kv, "tie_word_embeddings": tie, **config}
        out.append(TinyConfig(name, {**kw, **{k: bias for k in bias_keys}}))
    return tuple(out)


@dataclass(frozen=True)
class Sizes:
    """The growable sizes of a model. ``head_dim`` is per attention head; ``ffn`` is the number of
    FFN intermediate units; ``kv_heads`` equals ``heads`` for families without grouped-query attention."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    layers: int

    def as_dict(self) -> dict[str, int]:
        return {
            "hidden_size": self.hidden,
            "num_heads": self.heads,
            "num_kv_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.ffn,
            "num_layers": self.layers,
        }


@dataclass
class ArchAdapter:
    """Declarative description of one model family.

    Parameter names are matched *relative to the base model* (``model.base_model``) for ``params``
    and ``layer_params`` and relative to the top-level model for ``head_params``.

    Attributes:
        name: family name used in messages and growth records.
        model_types: ``config.model_type`` values this adapter handles.
        layers_path: path of the ``nn.ModuleList`` of blocks inside the base model.
        params: non-layer base-model parameters (embeddings, final norm).
        layer_params: per-block parameters, relative to ``{layers_path}.{i}.``; ``*`` stands for the
            index in a module list inside the block (``self_attn.q_layernorm.norms.*.weight``).
        head_params: task-head parameters (LM head, MLM transform, pooler lives in ``params``).
        config_keys: config attribute for each size: ``hidden``, ``heads``, ``kv_heads`` (None =
            no GQA), ``ffn``, ``layers``, ``head_dim`` (None = head_dim is hidden/heads), ``norm_eps``.
        norm: ``"layernorm"`` or ``"rmsnorm"``.
        pre_norm: True when every block reads the stream through a norm and adds its output back
            (GPT-2, Llama); False for post-norm (BERT), where identity blocks and non-integer
            widening are approximate.
        rotary: True when positions are rotary (head_dim must stay fixed).
        fused_qkv: layout of a fused q|k|v projection: ``"concat"`` ([q|k|v] along the output, GPT-2;
            k and v have ``kv_heads`` heads each, Phi-3) or ``"per_head"`` ((heads, 3, head_dim),
            GPT-NeoX); None when q, k, v are separate.
        per_layer_config_keys: config attributes holding one entry per layer (rebuilt on depth growth:
            each grown layer takes the entry of the old layer it comes from).
        layer_threshold_config_keys: config attributes holding a layer index from which layers behave
            differently (Qwen2 ``max_window_layers``: layers at or above it use the sliding window);
            rebuilt on depth growth as the length of the leading run of grown layers whose source is
            below it (their number when the sources keep the order; otherwise the per-layer lists
            carry the pattern, and without one the growth is refused).
        default_ffn: computes the FFN size when the config leaves it implicit (GPT-2 ``n_inner=None``).
        attention_scale: ``(config, layer_index, head_dim) -> float``, the factor the family multiplies
            q.k by in block ``layer_index`` (default ``head_dim ** -0.5``). The growth multiplies a
            block's query rows by old scale / new scale, which keeps q.k * scale unchanged.
        config_options: config attribute -> :class:`ConfigOption`, every option of the family's config
            class that changes the maths; checked by :meth:`check_options` before growing.
        norm_offset: the norms compute ``x_hat * (norm_offset + weight)`` (Gemma's RMSNorm: 1.0); the
            growth scales the effective gain ``norm_offset + weight`` and stores ``c * (norm_offset +
            weight) - norm_offset`` (applied once, in :func:`progtrain.growth.grow`, to every tensor
            with a ``hidden.gain`` axis).
        embed_scale: ``(config, hidden_size) -> float``, the factor the model multiplies the token
            embedding's output by at width ``hidden_size`` (Gemma: ``sqrt(hidden_size)``); None = 1.
            When the width changes the growth multiplies the ``embed`` rows by old / new factor (and a
            tied head's input norm by its inverse), so the stream is unchanged.
        hidden_follow_keys: config attributes that equal the hidden size and follow it when it grows
            (OPT ``word_embed_proj_dim`` without projections); left alone when they differ from it.
        for_config: ``(adapter, config) -> adapter``, the adapter of one config when the parameter
            layout depends on config values (OPT's optional ``project_in``/``project_out``);
            :func:`get_adapter` applies it. None: the same adapter for every config.
        qk_norm: where the family normalises queries and keys (roles ``q`` and ``k``) before the
            dot product, with the config's ``norm_eps``: None (no q/k norm), ``"head"`` (over each
            head's head_dim, Qwen3-style: exact under every growth, head_dim being fixed) or
            ``"projection"`` (over the whole heads x head_dim projection, OLMo2-style: adding query
            or key/value heads changes the norm's statistics, so head growth is approximate). A
            norm divides out any row scale but the epsilon, so a non-integer widening, which scales
            ``norm_eps`` by d/D, scales the ``q``/``k`` rows by sqrt(d/D) to keep them exact; and a
            changed attention scale cannot be put on the query rows (reported approximate).
        tiny_configs: the family's tiny test configs (:class:`TinyConfig`: tied and untied heads, biases,
            GQA ratios where the family has them), on which the shared conformance suite runs every
            operator; the first causal-LM one is the smallest, used for the generation checks.
    """

    name: str
    model_types: tuple[str, ...]
    layers_path: str
    params: dict[str, ParamSpec]
    layer_params: dict[str, ParamSpec]
    head_params: dict[str, ParamSpec]
    config_keys: dict[str, str | None]
    norm: str
    pre_norm: bool
    rotary: bool = False
    fused_qkv: str | None = None
    per_layer_config_keys: tuple[str, ...] = ("layer_types", "mlp_layer_types")
    layer_threshold_config_keys: tuple[str, ...] = ()
    default_ffn: Callable[[PretrainedConfig], int] | None = None
    attention_scale: Callable[[PretrainedConfig, int, int], float] = default_attention_scale
    config_options: dict[str, ConfigOption] = field(default_factory=dict)
    norm_offset: float = 0.0
    embed_scale: Callable[[PretrainedConfig, int], float] | None = None
    hidden_follow_keys: tuple[str, ...] = ()
    for_config: Callable[["ArchAdapter", PretrainedConfig], "ArchAdapter"] | None = None
    qk_norm: str | None = None
    tiny_configs: tuple[TinyConfig, ...] = ()
    _layer_re: re.Pattern | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.config_options = {**COMMON_OPTIONS, **self.config_options}
        if self.qk_norm not in (None, "head", "projection"):
            raise ValueError(f"{self.name}: qk_norm must be None, 'head' or 'projection', got {self.qk_norm!r}")

    # ------------------------------------------------------------------ sizes and config
    def read_sizes(self, config: PretrainedConfig) -> Sizes:
        """Read the growable sizes from an HF config."""
        k = self.config_keys
        hidden = int(getattr(config, k["hidden"]))
        heads = int(getattr(config, k["heads"]))
        kv = getattr(config, k["kv_heads"], None) if k.get("kv_heads") else None
        kv = heads if kv is None else int(kv)
        hd = getattr(config, k["head_dim"], None) if k.get("head_dim") else None
        hd = hidden // heads if hd is None else int(hd)
        ffn = getattr(config, k["ffn"], None)
        if ffn is None:
            if self.default_ffn is None:
                raise UnsupportedArchitectureError(f"{self.name}: config has no {k['ffn']}")
            ffn = self.default_ffn(config)
        layers = int(getattr(config, k["layers"]))
        return Sizes(hidden, heads, kv, hd, int(ffn), layers)

    def check_options(self, config: PretrainedConfig) -> None:
        """Refuse a config with an option value the growth does not handle (see ``config_options``).

        Raises:
            UnsupportedArchitectureError: one line naming the option, its value, why, and the values
                progtrain handles.
        """
        for attr, opt in self.config_options.items():
            if not hasattr(config, attr):
                continue
            val = getattr(config, attr)
            if not opt.accepts(val):
                allowed = " or ".join(repr(a) for a in opt.allowed or ())
                raise UnsupportedArchitectureError(
                    f"{self.name}: config.{attr}={val!r} is not supported: {opt.how}; progtrain grows "
                    f"models with {attr}={allowed}"
                )

    def head_dim_is_free(self) -> bool:
        """True when head_dim is its own config key (Llama family), False when it is hidden/heads."""
        return bool(self.config_keys.get("head_dim"))

    def write_config(
        self,
        config: PretrainedConfig,
        sizes: Sizes,
        eps_scale: float = 1.0,
        layer_sources: list[int] | None = None,
    ) -> PretrainedConfig:
        """Return a deep copy of ``config`` at ``sizes`` (not validated: see :meth:`target_config`).

        ``eps_scale`` multiplies the norm epsilon (non-integer widening); ``layer_sources[i]`` is the
        old layer whose per-layer config entries new layer ``i`` takes (default: new layers appended
        on top, each a copy of the last old layer). Every field that depends on the number of layers,
        heads or the width is rewritten: the size keys, ``head_dim`` where it is its own key, the
        per-layer lists (``per_layer_config_keys``) and layer thresholds (``layer_threshold_config_keys``).

        Raises:
            ProgtrainConfigError: the family's config class rejects one of the new values.
        """
        old_layers = int(getattr(config, self.config_keys["layers"]))
        if layer_sources is None:
            layer_sources = [min(i, old_layers - 1) for i in range(sizes.layers)]
        if len(layer_sources) != sizes.layers:
            raise ValueError(f"layer_sources has {len(layer_sources)} entries for {sizes.layers} layers")
        self._check_fixed_sizes(config, sizes)
        new = copy.deepcopy(config)
        k = self.config_keys
        try:
            old_hidden = getattr(config, k["hidden"])
            setattr(new, k["hidden"], sizes.hidden)
            for key in self.hidden_follow_keys:
                if getattr(config, key, None) == old_hidden:
                    setattr(new, key, sizes.hidden)
            setattr(new, k["heads"], sizes.heads)
            if k.get("kv_heads"):
                setattr(new, k["kv_heads"], sizes.kv_heads)
            if k.get("head_dim"):
                setattr(new, k["head_dim"], sizes.head_dim)
            setattr(new, k["ffn"], sizes.ffn)
            setattr(new, k["layers"], sizes.layers)
            if eps_scale != 1.0 and k.get("norm_eps"):
                setattr(new, k["norm_eps"], float(getattr(config, k["norm_eps"])) * eps_scale)
            for key in self.per_layer_config_keys:
                old = getattr(config, key, None)
                if isinstance(old, (list, tuple)) and len(old) == old_layers:
                    setattr(new, key, [old[s] for s in layer_sources])
            for key in self.layer_threshold_config_keys:
                old = getattr(config, key, None)
                if isinstance(old, int) and not isinstance(old, bool):
                    if old >= old_layers:
                        n = max(old, sizes.layers)  # no layer at or above it, before or after
                    else:
                        # the leading run of grown layers whose source is below the threshold: when the
                        # sources keep below-threshold layers first (interleave, top, indices) it is their
                        # count and the threshold still produces every layer's behaviour; when they do not
                        # (stack, middle) no threshold can, and the per-layer lists carry it
                        below = [s < old for s in layer_sources]
                        n = below.index(False) if False in below else len(below)
                        if any(below[n:]) and not self._has_per_layer_list(config, old_layers):
                            raise ProgtrainConfigError(
                                f"{self.name}: config.{key}={old} cannot describe the grown layers (sources "
                                f"{layer_sources} put layers below it above layers at or over it) and the config "
                                f"has no per-layer list ({', '.join(self.per_layer_config_keys)}) to carry them; "
                                f"use a placement that keeps the layer order (interleave, top or indices)"
                            )
                    setattr(new, key, n)
        except _CONFIG_ERRORS as e:
            raise ProgtrainConfigError(self._config_error_message(config, e)) from None
        return new

    def _has_per_layer_list(self, config: PretrainedConfig, layers: int) -> bool:
        """True when ``config`` holds one of ``per_layer_config_keys`` with one entry per layer."""
        return any(
            isinstance(getattr(config, k, None), (list, tuple)) and len(getattr(config, k)) == layers
            for k in self.per_layer_config_keys
        )

    def _check_fixed_sizes(self, config: PretrainedConfig, sizes: Sizes) -> None:
        """Refuse sizes that change what a set option fixes (``ConfigOption.fixes``).

        Raises:
            UnsupportedArchitectureError: one line naming the option, the size and what can grow.
        """
        src = self.read_sizes(config)
        for attr, opt in self.config_options.items():
            if not opt.fixes or not getattr(config, attr, None):
                continue
            changed = [f for f in opt.fixes if getattr(sizes, f) != getattr(src, f)]
            if changed:
                names = {"hidden": "hidden_size", "heads": "num_heads", "kv_heads": "num_kv_heads",
                         "head_dim": "head_dim", "ffn": "intermediate_size", "layers": "num_layers"}
                what = ", ".join(f"{names[f]} {getattr(src, f)} -> {getattr(sizes, f)}" for f in changed)
                raise UnsupportedArchitectureError(
                    f"{self.name}: config.{attr}={getattr(config, attr)!r} fixes {what}: {opt.how}; keep "
                    f"{' and '.join(names[f] for f in opt.fixes)} as they are"
                )

    def target_config(
        self,
        config: PretrainedConfig,
        sizes: Sizes,
        eps_scale: float = 1.0,
        layer_sources: list[int] | None = None,
    ) -> PretrainedConfig:
        """The grown model's config (:meth:`write_config`), validated by :meth:`validate_config`.

        Cheap (no tensor is built): call it before any growth work. Raises
        :class:`ProgtrainConfigError` naming the rejected field or rule.
        """
        new = self.write_config(config, sizes, eps_scale, layer_sources)
        self.validate_config(new, sizes)
        return new

    def validate_config(self, config: PretrainedConfig, sizes: Sizes | None = None) -> None:
        """Validate ``config`` as transformers does when it saves and loads it, plus the family's
        invariants: the config class's own validators (``config.validate()``: strict field types,
        ``validate_architecture``, ``validate_layer_type``, ``validate_rope`` ...), a JSON round trip
        (``to_json_string`` -> ``from_dict``, what ``save_pretrained`` + ``from_pretrained`` do) that
        must give back the same sizes (``sizes``, default: the config's own), and per-layer lists of
        length ``num_layers``.

        Raises:
            ProgtrainConfigError: one line naming the rejected field or rule.
        """
        try:
            if hasattr(config, "validate"):
                config.validate()
            reloaded = type(config).from_dict(json.loads(config.to_json_string(use_diff=True)))
        except _CONFIG_ERRORS as e:
            raise ProgtrainConfigError(self._config_error_message(config, e)) from None
        want = self.read_sizes(config) if sizes is None else sizes
        got = self.read_sizes(reloaded)
        if got != want:
            diff = ", ".join(f"{k}={v} (wanted {want.as_dict()[k]})" for k, v in got.as_dict().items() if v != want.as_dict()[k])
            raise ProgtrainConfigError(
                f"the {self.name} config does not keep the grown sizes through save and reload: it reloads with "
                f"{diff}; this combination of sizes cannot be saved as a {type(config).__name__}, choose other sizes"
            )
        for key in self.per_layer_config_keys:
            val = getattr(reloaded, key, None)
            if isinstance(val, (list, tuple)) and len(val) != want.layers:
                raise ProgtrainConfigError(
                    f"config.{key} has {len(val)} entries for {want.layers} layers: it needs one per layer"
                )

    def _config_error_message(self, config: PretrainedConfig, e: BaseException) -> str:
        """One line from a transformers / huggingface_hub config validation error."""
        return (
            f"the grown {self.name} config is invalid: transformers' {type(config).__name__} rejects it "
            f"({config_error_text(e)})"
        )

    # ------------------------------------------------------------------ parameter mapping
    def _layer_pattern(self) -> re.Pattern:
        if self._layer_re is None:
            self._layer_re = re.compile(rf"^{re.escape(self.layers_path)}\.(\d+)\.(.+)$")
        return self._layer_re

    def classify(self, name: str, base_prefix: str) -> tuple[ParamSpec, int | None, str]:
        """Map a top-level parameter name to ``(spec, layer_index or None, suffix)``.

        Raises :class:`UnsupportedArchitectureError` for a parameter the adapter does not describe.
        """
        if name in self.head_params:
            return self.head_params[name], None, name
        rel = name[len(base_prefix) + 1 :] if base_prefix and name.startswith(base_prefix + ".") else name
        if rel in self.params:
            return self.params[rel], None, rel
        m = self._layer_pattern().match(rel)
        if m:
            suffix = m.group(2)
            # a module list inside a block (one norm per head): its entries share one spec, "...norms.*.weight"
            spec = self.layer_params.get(suffix) or self.layer_params.get(re.sub(r"(?<=\.)\d+(?=\.)", "*", suffix))
            if spec is not None:
                return spec, int(m.group(1)), suffix
        raise UnsupportedArchitectureError(
            f"parameter {name!r} is not described by the {self.name} adapter (a task head or module "
            f"progtrain does not know). Grow the base model or a supported head "
            f"(causal LM / masked LM / base model), or add it to progtrain/arch/{self.name}.py"
        )

    def layer_param_name(self, base_prefix: str, layer: int, suffix: str) -> str:
        rel = f"{self.layers_path}.{layer}.{suffix}"
        return f"{base_prefix}.{rel}" if base_prefix else rel


_REGISTRY: dict[str, ArchAdapter] = {}


def register_adapter(adapter: ArchAdapter) -> ArchAdapter:
    """Register an adapter for each of its ``model_types``.

    Raises:
        ProgtrainConfigError: a parameter's role is not in :data:`ROLES` (naming the adapter, the
            parameter and the role), or a ``model_type`` already has an adapter.
    """
    for table in (adapter.params, adapter.layer_params, adapter.head_params):
        for pname, pspec in table.items():
            if pspec.role not in ROLES:
                raise ProgtrainConfigError(
                    f"adapter {adapter.name!r}: parameter {pname!r} has unknown role {pspec.role!r}; roles are "
                    f"{', '.join(ROLES)} (add a new one to progtrain.arch.base.ROLES with its meaning)"
                )
    taken = [t for t in adapter.model_types if t in _REGISTRY]
    if taken:
        raise ProgtrainConfigError(
            f"adapter {adapter.name!r}: model_type {', '.join(map(repr, taken))} already has the adapter "
            f"{_REGISTRY[taken[0]].name!r}; one adapter per model_type"
        )
    for t in adapter.model_types:
        _REGISTRY[t] = adapter
    return adapter


def registered_adapters() -> list[ArchAdapter]:
    """Every registered adapter once, in registration order (one may serve several model types)."""
    return list({id(a): a for a in _REGISTRY.values()}.values())


def supported_model_types() -> list[str]:
    """The ``config.model_type`` values progtrain can grow."""
    return sorted(_REGISTRY)


def base_prefix(model: PreTrainedModel) -> str:
    """The attribute name of the base model inside a task model ('' for a base model)."""
    prefix = getattr(model, "base_model_prefix", "")
    if prefix and hasattr(model, prefix) and getattr(model, prefix) is not model:
        return prefix
    return ""


def get_adapter(model_or_config: PreTrainedModel | PretrainedConfig) -> ArchAdapter:
    """The adapter for a model or config; a clear error for an unsupported family."""
    config = getattr(model_or_config, "config", model_or_config)
    mt = getattr(config, "model_type", None)
    if mt not in _REGISTRY:
        raise UnsupportedArchitectureError(
            f"model_type {mt!r} is not supported by progtrain. Supported: "
            f"{', '.join(supported_model_types())}. To add a family, write an adapter module in "
            f"progtrain/arch/ (see progtrain/arch/llama.py)."
        )
    adapter = _REGISTRY[mt]
    return adapter if adapter.for_config is None else adapter.for_config(adapter, config)


def iter_params(model: PreTrainedModel) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """Named parameters without duplicates (a tied LM head appears once, under the embedding);
    parametrised tensors appear under their plain names with their current values."""
    from ..bake import plain_named_parameters

    yield from plain_named_parameters(model)


def has_tied_head(model: PreTrainedModel) -> bool:
    """True when the model's output embedding shares its weight with the input embedding."""
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is None:
        return False
    return out.weight is model.get_input_embeddings().weight
