"""Growth operators written once against roles and spaces."""

from .core import GrowthResult, grow
from .plan import AxisPlan, ParamMap, SpaceMaps
from .spec import GrowthPlan, GrowthSpec, new_layer_positions, plan_growth

__all__ = [
    "AxisPlan", "GrowthPlan", "GrowthResult", "GrowthSpec", "ParamMap", "SpaceMaps", "grow", "new_layer_positions",
    "plan_growth",
]
