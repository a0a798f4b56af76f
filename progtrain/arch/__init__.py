"""Architecture adapters (one module per family). Importing this package registers them all."""

from . import (  # noqa: F401  (registration side effects)
    bert, gemma, gemma2, gemma3, gpt2, gpt_neox, gptj, granite, llama, mistral, olmo2, opt, phi3, qwen2, qwen3,
    roberta, stablelm,
)
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
    registered_adapters,
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
    "registered_adapters",
    "supported_model_types",
]
