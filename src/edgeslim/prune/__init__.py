"""Pruning: one verb, :func:`prune_`, dispatching on the config's type.

    prune_(model, MagnitudePrune(sparsity=0.9))

Later techniques register a handler with :func:`register`.
"""

from __future__ import annotations

from collections.abc import Callable

from pydantic import BaseModel
from torch import nn

from ..calibrate import one_shot_ as _one_shot_
from ..errors import ConfigError
from ..masks import apply_masks_, iter_masks, mask_grads_, remove_masks_
from .magnitude import FilterFn, MagnitudePrune, magnitude_prune_
from .schedule import model_sparsity, prune_iteratively_
from .sparsegpt import SparseGPT
from .wanda import Wanda

Handler = Callable[..., dict[str, float]]
_HANDLERS: dict[type[BaseModel], Handler] = {}
METHODS: dict[str, type[BaseModel]] = {}  # recipe name -> config class


def register(name: str, config_type: type[BaseModel], handler: Handler) -> None:
    """Make ``prune_(model, config_type(...))`` call ``handler`` and ``method: name`` valid."""
    _HANDLERS[config_type] = handler
    METHODS[name] = config_type


def prune_(
    model: nn.Module,
    cfg: BaseModel,
    *,
    filter_fn: FilterFn | None = None,
    **kwargs: object,
) -> dict[str, float]:
    """Prune ``model`` in place as ``cfg`` says; returns each pruned layer's sparsity.

    ``filter_fn(module, name)`` restricts which layers are considered.
    """
    handler = _HANDLERS.get(type(cfg))
    if handler is None:
        raise ConfigError(
            f"no pruning method for config {type(cfg).__name__}; known: "
            f"{', '.join(c.__name__ for c in _HANDLERS)}"
        )
    return handler(model, cfg, filter_fn=filter_fn, **kwargs)


register("magnitude", MagnitudePrune, magnitude_prune_)
register("wanda", Wanda, _one_shot_)
register("sparsegpt", SparseGPT, _one_shot_)

__all__ = [
    "METHODS",
    "MagnitudePrune",
    "SparseGPT",
    "Wanda",
    "apply_masks_",
    "iter_masks",
    "mask_grads_",
    "model_sparsity",
    "prune_",
    "prune_iteratively_",
    "register",
    "remove_masks_",
]
