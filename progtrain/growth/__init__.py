"""Growth operators written once against roles and spaces.

``GrowthSpec`` and ``plan_growth`` (:mod:`progtrain.growth.spec`) import neither torch nor
transformers at module level; the rest is imported on first use (PEP 562), so the command line can
build its flags from ``GrowthSpec`` without them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .spec import GrowthPlan, GrowthSpec, new_layer_positions, plan_growth

if TYPE_CHECKING:
    from .core import GrowthResult, grow
    from .plan import AxisPlan, ParamMap, SpaceMaps

_LAZY = {"GrowthResult": ".core", "grow": ".core", "AxisPlan": ".plan", "ParamMap": ".plan", "SpaceMaps": ".plan"}

__all__ = [
    "AxisPlan", "GrowthPlan", "GrowthSpec", "ParamMap", "SpaceMaps", "grow", "new_layer_positions",
    "plan_growth",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
