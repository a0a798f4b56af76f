"""Growth operators written once against roles and spaces.

``GrowthSpec`` and ``plan_growth`` (:mod:`progtrain.growth.spec`) import neither torch nor
transformers at module level; the rest is imported on first use (PEP 562), so the command line can
build its flags from ``GrowthSpec`` without them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_attributes
from .spec import GrowthPlan, GrowthSpec, new_layer_positions, plan_growth

if TYPE_CHECKING:
    from .core import GrowthResult, grow
    from .plan import AxisPlan, ParamMap, SpaceMaps

_LAZY = {"GrowthResult": ".core", "grow": ".core", "AxisPlan": ".plan", "ParamMap": ".plan", "SpaceMaps": ".plan"}

__all__ = [
    "AxisPlan", "GrowthPlan", "GrowthSpec", "ParamMap", "SpaceMaps", "grow", "new_layer_positions",
    "plan_growth",
]


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)
