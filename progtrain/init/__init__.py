"""Init strategies for the new parameters of a grown model, behind one registry.

Each strategy lives in its own module and registers itself on import with
:func:`register_strategy`; the modules named in ``STRATEGY_MODULES`` are imported here.
"""

import importlib

from .base import (
    GrowthContext,
    InitStrategy,
    StrategyOptions,
    TensorGrowth,
    available_strategies,
    describe_options,
    get_strategy,
    option,
    options_help,
    register_strategy,
)

STRATEGY_MODULES = [
    "function_preserving",
    "random",
    "variance_transfer",
    "mixture",
    "gradinit",
    "signed_split",
    "gradmax",
    "aki",
]

for _name in STRATEGY_MODULES:
    try:
        importlib.import_module(f"{__name__}.{_name}")
    except ModuleNotFoundError as _e:  # a strategy not in this build
        if _e.name != f"{__name__}.{_name}":
            raise

__all__ = [
    "GrowthContext",
    "InitStrategy",
    "StrategyOptions",
    "TensorGrowth",
    "available_strategies",
    "describe_options",
    "get_strategy",
    "option",
    "options_help",
    "register_strategy",
]
