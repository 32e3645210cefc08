"""Package attributes that import their module on first use (PEP 562's module ``__getattr__``).

Why: ``sparkvision`` starts (every CLI command) and executors' Python workers import small
submodules of packages whose other modules pull torch, torchvision, FAISS or FastAPI. A package
``__init__`` that imported them all made each start pay for everything (13.6 s for
``import sparkvision.cli``); with lazy exports it pays for what it uses.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, exports: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package``: ``exports`` maps each public name to the
    submodule (relative to ``package``) that defines it."""

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{module}"), name)

    return __getattr__
