"""Init strategies: fill the *free* blocks of grown tensors (and, for some methods, adjust others).

A strategy is a class registered under a name with :func:`register_strategy`. The growth operator
builds every grown tensor with its constrained blocks already set (copied, split, zero) and calls
:meth:`InitStrategy.init_tensor` once per tensor with a :class:`TensorGrowth`; whole-model methods
(GradInit, splitting, GradMax) use the :meth:`InitStrategy.before` / :meth:`InitStrategy.after` hooks.
Operators never know which strategy runs.

Options are typed, as peft's method configs are: each strategy declares a dataclass subclassing
:class:`StrategyOptions` (its ``Options`` attribute) whose fields carry their help text
(``option(default, "help")``) and whose ``__post_init__`` checks ranges. :func:`get_strategy` builds
it from keyword values (strings from the CLI's ``--init-option KEY=VALUE`` or a run config's
``init_kwargs`` are converted to the field's type); an unknown option, a value of the wrong type or
out of range is one :class:`ProgtrainConfigError` line. :func:`describe_options` prints a strategy's
options; ``progtrain grow --help`` lists them all.
"""

from __future__ import annotations

import dataclasses
import logging
import textwrap
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Literal

import torch

from ..errors import ProgtrainConfigError

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------- typed options
def option(default: Any, help: str) -> Any:
    """A dataclass field of a :class:`StrategyOptions` subclass with its help text (a list default is
    copied per instance)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class StrategyOptions:
    """Base of every strategy's options dataclass (no options). Subclasses add fields with
    :func:`option` and check ranges in ``__post_init__`` with :meth:`require`."""

    strategy: ClassVar[str] = ""  # set by register_strategy, used in messages

    def require(self, ok: bool, name: str, rule: str) -> None:
        """Raise one :class:`ProgtrainConfigError` line unless ``ok``: ``<strategy> option <name>=<value>: <rule>``."""
        if not ok:
            raise ProgtrainConfigError(
                f"init strategy {self.strategy!r} option {name}={getattr(self, name)!r}: {rule}"
            )

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Option name -> default value."""
        return {f.name: _field_default(f) for f in dataclasses.fields(cls)}


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is list:
        return f"list of {_type_name(args[0])}" if args else "list"
    if tp is type(None):
        return "None"
    return getattr(tp, "__name__", str(tp))


def _expected(tp: Any) -> str:
    """What a value of type ``tp`` must be, in words (for error messages)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_expected(a) for a in args)
    if origin is list:
        return f"a list of {_type_name(args[0]) if args else 'values'} (or a comma-separated string)"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "None"}.get(
        tp, _type_name(tp)
    )


_NONE_WORDS = ("none", "null", "~", "")


def _coerce(tp: Any, value: Any) -> Any:
    """``value`` as type ``tp`` (bool, int, float, str, Literal, list[str], Optional[...]); numbers may
    come as strings (YAML reads ``5e-3`` as a string), lists as comma-separated strings. Raises
    ValueError when it does not fit."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (type(None) in args and isinstance(value, str) and value.strip().lower() in _NONE_WORDS):
            if type(None) in args:
                return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value)
            except ValueError:
                pass
        raise ValueError
    if origin is Literal:
        if value in args:
            return value
        raise ValueError
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ValueError
        return [_coerce(args[0], v) for v in value] if args else list(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        raise ValueError
    if tp is int:
        if isinstance(value, bool):
            raise ValueError
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            return int(value.strip())
        raise ValueError
    if tp is float:
        if isinstance(value, bool):
            raise ValueError
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            return float(value.strip())
        raise ValueError
    if tp is str:
        if isinstance(value, str):
            return value
        raise ValueError
    return value


def options_summary(options_cls: type[StrategyOptions]) -> str:
    """``name=default, ...`` for one options class ("no options" when empty)."""
    fields = dataclasses.fields(options_cls)
    if not fields:
        return "no options"
    return ", ".join(f"{f.name}={_field_default(f)!r}" for f in fields)


def build_options(options_cls: type[StrategyOptions], values: dict[str, Any]) -> StrategyOptions:
    """The typed options of one strategy from keyword ``values`` (missing ones take their defaults).

    Raises:
        ProgtrainConfigError: one line for an unknown option (listing the valid ones with their
            defaults), a value that does not convert to the field's type, or a value out of range
            (the class's ``__post_init__``).
    """
    name = options_cls.strategy
    hints = typing.get_type_hints(options_cls)
    known = {f.name for f in dataclasses.fields(options_cls)}
    unknown = [k for k in values if k not in known]
    if unknown:
        raise ProgtrainConfigError(
            f"init strategy {name!r} has no option {', '.join(map(repr, unknown))}; valid options: "
            f"{options_summary(options_cls)} (see progtrain.init.describe_options({name!r}))"
        )
    typed = {}
    for k, v in values.items():
        try:
            typed[k] = _coerce(hints[k], v)
        except (ValueError, TypeError):
            raise ProgtrainConfigError(
                f"init strategy {name!r} option {k}={v!r}: expected {_expected(hints[k])}"
            ) from None
    return options_cls(**typed)


@dataclass
class TensorGrowth:
    """One grown parameter handed to a strategy.

    Attributes:
        name: parameter name in the grown model.
        role: its role (``q``, ``down``, ``norm`` ...; see :mod:`progtrain.arch.base`).
        axes: axis tags per dimension.
        value: the grown tensor (fp32) with constrained entries set; FREE entries are zero.
        free: bool mask of entries the strategy must fill.
        born: bool mask of entries that did not exist before the growth (free or constrained).
        old: the source tensor (fp32) or None.
        fan_in_old / fan_in_new: number of inputs of one output unit before/after (1 for vectors).
        new_layer: True when the tensor belongs to an inserted block.
        config: the grown model's HF config.
        generator: seeded RNG to draw from.
    """

    name: str
    role: str
    axes: tuple[str | None, ...]
    value: torch.Tensor
    free: torch.Tensor
    born: torch.Tensor
    old: torch.Tensor | None
    fan_in_old: int
    fan_in_new: int
    new_layer: bool
    config: Any
    generator: torch.Generator

    @property
    def is_vector(self) -> bool:
        return self.value.dim() == 1


@dataclass
class GrowthContext:
    """Whole-model view for strategy hooks: the old and grown models, space maps, param maps, and
    optional data (an iterable of batches) for data-driven strategies."""

    old_model: Any
    new_model: Any | None
    maps: Any
    param_maps: dict
    data: Any = None
    report: dict = field(default_factory=dict)


class InitStrategy:
    """Base class. Subclasses set ``preserves_function``, ``needs_data``, their ``Options`` dataclass
    (a :class:`StrategyOptions` subclass; default: no options) and override :meth:`init_tensor`.

    ``InitStrategy(options)`` takes a built ``Options`` instance, ``InitStrategy(**values)`` builds it
    with :func:`build_options`; the typed options are ``self.options``.
    """

    name: str = ""
    preserves_function: bool = True
    needs_data: bool = False
    Options: ClassVar[type[StrategyOptions]] = StrategyOptions

    def __init__(self, options: StrategyOptions | None = None, **values: Any) -> None:
        if options is None:
            options = build_options(self.Options, values)
        elif values or not isinstance(options, self.Options):
            raise ProgtrainConfigError(
                f"init strategy {self.name!r} takes one {self.Options.__name__} or keyword options, not "
                f"{type(options).__name__}" + (" and keywords" if values else "")
            )
        self.options = options

    def before(self, ctx: GrowthContext) -> None:
        """Called once before any tensor is built (e.g. to collect gradients on the old model)."""

    def init_tensor(self, t: TensorGrowth) -> None:
        """Fill ``t.value[t.free]`` in place (and optionally adjust other entries)."""
        raise NotImplementedError

    def after(self, ctx: GrowthContext) -> None:
        """Called once with the grown model loaded (e.g. to tune scales on data)."""

    def describe(self) -> dict[str, Any]:
        """``{"name": ..., **options}``, JSON-serialisable; ``get_strategy(**describe())`` rebuilds it."""
        return {"name": self.name, **dataclasses.asdict(self.options)}


_STRATEGIES: dict[str, type[InitStrategy]] = {}


def register_strategy(name: str) -> Callable[[type[InitStrategy]], type[InitStrategy]]:
    """Class decorator registering an :class:`InitStrategy` under ``name``.

    The class's ``Options`` must be a dataclass subclassing :class:`StrategyOptions`, owned by this
    strategy alone (its messages name the strategy).

    Raises:
        ProgtrainConfigError: ``name`` is already registered (names are unique, as in peft's
            registry), or ``Options`` is not a StrategyOptions dataclass or is shared with another
            registered strategy.
    """

    def deco(cls: type[InitStrategy]) -> type[InitStrategy]:
        if name in _STRATEGIES:
            old = _STRATEGIES[name]
            raise ProgtrainConfigError(
                f"init strategy {name!r} is already registered (by {old.__module__}.{old.__qualname__}); "
                f"register {cls.__module__}.{cls.__qualname__} under another name"
            )
        opts = cls.Options
        if not (isinstance(opts, type) and issubclass(opts, StrategyOptions) and dataclasses.is_dataclass(opts)):
            raise ProgtrainConfigError(f"init strategy {name!r}: Options must be a StrategyOptions dataclass")
        if opts is not StrategyOptions:
            if "strategy" in opts.__dict__:
                raise ProgtrainConfigError(
                    f"init strategy {name!r}: its Options class {opts.__qualname__} already belongs to strategy "
                    f"{opts.strategy!r}; subclass it (class Options({opts.__qualname__}): ...)"
                )
            typing.get_type_hints(opts)  # every field's type resolves (used to convert values)
            opts.strategy = name
        cls.name = name
        _STRATEGIES[name] = cls
        return cls

    return deco


def available_strategies() -> list[str]:
    """Names accepted by ``grow(init=...)`` and ``progtrain grow --init``."""
    return sorted(_STRATEGIES)


def _strategy_class(name: str) -> type[InitStrategy]:
    if name not in _STRATEGIES:
        raise ProgtrainConfigError(
            f"unknown init strategy {name!r}; available: {', '.join(available_strategies())}"
        )
    return _STRATEGIES[name]


def get_strategy(name: str | InitStrategy, **options: Any) -> InitStrategy:
    """Instantiate a registered strategy with its typed options (an instance is returned as is).

    Raises:
        ProgtrainConfigError: unknown strategy (lists the available ones), unknown option (lists
            the valid ones with their defaults), a value of the wrong type or out of range.
    """
    if isinstance(name, InitStrategy):
        return name
    cls = _strategy_class(name)
    return cls(build_options(cls.Options, options))


def _first_line(doc: str | None) -> str:
    return " ".join((doc or "").strip().split("\n\n")[0].split())


def describe_options(name: str, width: int = 100) -> str:
    """Text listing the options of strategy ``name``: type, default and help of each, wrapped at ``width``.

    Raises:
        ProgtrainConfigError: unknown strategy.
    """
    cls = _strategy_class(name)
    hints = typing.get_type_hints(cls.Options)
    head = f"{name}: {_first_line(cls.__doc__)}" + (" Needs calibration data." if cls.needs_data else "")
    lines = textwrap.wrap(head, width, subsequent_indent="    ")
    fields = dataclasses.fields(cls.Options)
    if not fields:
        lines.append("  (no options)")
    for f in fields:
        text = f"{f.name} ({_type_name(hints[f.name])}, default {_field_default(f)!r}): {f.metadata.get('help', '')}"
        lines += textwrap.wrap(text, width, initial_indent="  ", subsequent_indent="      ")
    return "\n".join(lines)


def options_help() -> str:
    """Every registered strategy's options, one block per strategy (``progtrain grow --help``)."""
    return "\n".join(describe_options(n) for n in available_strategies())


def reference_std(t: TensorGrowth) -> float:
    """Std of the trained tensor the new entries join (falls back to the config's initializer_range)."""
    if t.old is not None and t.old.numel() > 1:
        s = float(t.old.float().std())
        if s > 0:
            return s
    return float(getattr(t.config, "initializer_range", 0.02))
