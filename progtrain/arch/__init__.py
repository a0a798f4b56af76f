"""Architecture adapters (one module per family). Importing this package registers them all."""

from . import bert, gemma, gemma2, gemma3, gpt2, gpt_neox, gptj, llama, mistral, opt, qwen2, roberta  # noqa: F401  (registration side effects)
from .base import (
    ROLES,
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
    "ROLES",
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
