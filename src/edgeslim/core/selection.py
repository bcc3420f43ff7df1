"""Choosing layers: by names, glob patterns, types and a ``filter_fn(module, name)``."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

FilterFn = Callable[[nn.Module, str], bool]
