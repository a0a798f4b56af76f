"""progtrain: progressive training for Hugging Face transformers.

Grow a model's width, attention heads, FFN and depth during pretraining, function-preserving, and
save the result as a standard Hugging Face checkpoint.
"""

from .errors import ProgtrainConfigError, UnsupportedArchitectureError
from .growth import GrowthResult, GrowthSpec, grow
from .init import available_strategies, get_strategy, register_strategy

__version__ = "0.1.0"

__all__ = [
    "GrowthResult",
    "GrowthSpec",
    "ProgtrainConfigError",
    "UnsupportedArchitectureError",
    "available_strategies",
    "get_strategy",
    "grow",
    "register_strategy",
    "__version__",
]
