"""Growth operators written once against roles and spaces."""

from .core import GrowthResult, grow
from .plan import AxisPlan, ParamMap, SpaceMaps
from .spec import GrowthSpec, new_layer_positions

__all__ = ["AxisPlan", "GrowthResult", "GrowthSpec", "ParamMap", "SpaceMaps", "grow", "new_layer_positions"]
