"""Package attributes imported on first use (a package's `__init__` that must stay light or would
otherwise import in a circle):

    _LAZY = {"RMSNorm": "norm", ...}            # name -> sub-module that defines it
    __getattr__ = lazy_attributes(__name__, _LAZY)
"""

from __future__ import annotations

import importlib
from typing import Callable, Dict


def lazy_attributes(package: str, names: Dict[str, str]) -> Callable[[str], object]:
    """A module-level `__getattr__` for `package` that imports `names[name]` on first access."""

    def __getattr__(name: str):
        if name in names:
            return getattr(importlib.import_module(f"{package}.{names[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
