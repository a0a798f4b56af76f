"""Public names of a package imported on first use (PEP 562), so that ``import progtrain`` and the
command line's ``--help`` do not import torch or transformers."""

from __future__ import annotations

import importlib
import sys
from typing import Any, Callable


def lazy_attributes(package: str, table: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package`` (its ``__name__``): ``table`` maps each public name to the
    module (relative to ``package``) that defines it; the module is imported when the name is first used
    and the name is then cached on the package. Unknown names raise ``AttributeError``."""
    module = sys.modules[package]

    def __getattr__(name: str) -> Any:
        if name not in table:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(table[name], package), name)
        setattr(module, name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(module)) | set(table))

    return __getattr__, __dir__
