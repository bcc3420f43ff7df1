"""The quant registry: config class -> handler; each technique module registers itself.

A new technique adds its config and handler in its own module and ends it with
``REGISTRY.register("name", Config, handler)`` (see docs/architecture.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import BaseModel
from torch import nn

from edgeslim.core.registry import Context, Registry

REGISTRY = Registry("quantize")
METHODS = REGISTRY.methods  # recipe name -> config class


def returning_model(handler: Callable[..., Any]) -> Callable[..., Any]:
    """Adapt an in-place handler that returns a log: keep the log as ``model.quant_info``
    (as every quantize_ handler does) and return the model."""

    def run(model: nn.Module, cfg: BaseModel, ctx: Context) -> nn.Module:
        model.quant_info = {"layers": handler(model, cfg, ctx)}
        return model

    return run
