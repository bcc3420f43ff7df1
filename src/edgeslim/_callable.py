"""Packages that share their name with the function they export (``profile``, ``distill``).

``edgeslim.profile`` is both a package and the function ``edgeslim.profile()``. Importing any
submodule of the package makes Python set the attribute ``edgeslim.profile`` to the package,
hiding the lazily exported function. :func:`make_callable` lets the package itself be called
as the function, so ``edgeslim.profile(model, x)`` works whichever one the attribute holds.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable
from typing import Any


def make_callable(module_name: str, fn: Callable[..., Any]) -> None:
    """Make the module ``module_name`` callable: calling it calls ``fn``."""

    class CallableModule(types.ModuleType):
        __doc__ = sys.modules[module_name].__doc__

        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            return fn(*args, **kwargs)

    sys.modules[module_name].__class__ = CallableModule
