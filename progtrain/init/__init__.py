"""Init strategies for the new parameters of a grown model, behind one registry."""

from . import function_preserving, random  # noqa: F401  (registration side effects)
from .base import (
    GrowthContext,
    InitStrategy,
    TensorGrowth,
    available_strategies,
    get_strategy,
    register_strategy,
)

__all__ = [
    "GrowthContext",
    "InitStrategy",
    "TensorGrowth",
    "available_strategies",
    "get_strategy",
    "register_strategy",
]
