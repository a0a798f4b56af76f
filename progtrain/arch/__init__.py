"""Architecture adapters (one module per family). Importing this package registers them all."""

from . import bert, gpt2, gpt_neox, granite, llama, mistral, olmo2, phi3, qwen2, qwen3, stablelm  # noqa: F401  (registration side effects)
from .base import (
    ArchAdapter,
    ConfigOption,
    ParamSpec,
    Sizes,
    base_prefix,
    get_adapter,
    has_tied_head,
    register_adapter,
    supported_model_types,
)

__all__ = [
    "ArchAdapter",
    "ConfigOption",
    "ParamSpec",
    "Sizes",
    "base_prefix",
    "get_adapter",
    "has_tied_head",
    "register_adapter",
    "supported_model_types",
]
