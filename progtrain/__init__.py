"""progtrain: progressive training for Hugging Face transformers.

Grow a model's width, attention heads, FFN and depth during pretraining, function-preserving, and
save the result as a standard Hugging Face checkpoint.

The names below are imported on first use (PEP 562 ``__getattr__``): ``import progtrain`` and the
command line's ``--help`` do not import torch or transformers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._lazy import lazy_attributes
from .errors import ProgtrainConfigError, UnsupportedArchitectureError

if TYPE_CHECKING:
    from .growth import GrowthResult, GrowthSpec, grow
    from .init import available_strategies, get_strategy, register_strategy

__version__ = "0.1.0"

#: public name -> the module that defines it, imported when the name is first used
_LAZY = {
    "GrowthResult": ".growth", "GrowthSpec": ".growth", "grow": ".growth",
    "available_strategies": ".init", "get_strategy": ".init", "register_strategy": ".init",
}

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


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)
