"""Lazy package exports (PEP 562): a package names its public objects and the submodule of each, and
imports a submodule on first use, so light entry points (`--help`) never import torch."""

from collections.abc import Callable
from importlib import import_module
from typing import Any


def lazy_getattr(package: str, exports: dict[str, str]) -> Callable[[str], Any]:
    """A module `__getattr__` for `package` that imports `exports[name]` on access: a submodule relative to
    `package` (".results") or the absolute name of the module that owns the object ("grounded_llava.rle")."""

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(import_module(exports[name], package), name)

    return __getattr__
