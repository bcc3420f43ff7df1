"""Quantization: one verb, :func:`quantize_`, dispatching on the config's type.

    quantize_(model, Int8PTQ(calibration="mse"), calib=data.calib(256))

Each technique registers a handler with :func:`register`; ``method: NAME`` in a recipe's
``quantize`` stage picks the config class registered under ``NAME``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import BaseModel
from torch import nn

from ..registry import Registry

FilterFn = Callable[[nn.Module, str], bool]
REGISTRY = Registry("quantize_")
METHODS = REGISTRY.methods  # recipe name -> config class
register = REGISTRY.register


def quantize_(
    model: nn.Module,
    cfg: BaseModel,
    *,
    calib: Any = None,
    filter_fn: FilterFn | None = None,
    **kwargs: Any,
) -> Any:
    """Quantize ``model`` in place as ``cfg`` says.

    ``calib`` is calibration data (a tensor of inputs or an iterable of batches) for methods
    that need it; ``filter_fn(module, name)`` restricts which layers are quantized.
    """
    return REGISTRY.handler(cfg)(model, cfg, calib=calib, filter_fn=filter_fn, **kwargs)


__all__ = ["METHODS", "quantize_", "register"]
