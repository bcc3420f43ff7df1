"""Pruning: one verb, :func:`prune_`, dispatching on the config's type.

    prune_(model, MagnitudePrune(sparsity=0.9))

Later techniques register a handler with :func:`register`.
"""

from __future__ import annotations

from pydantic import BaseModel
from torch import nn

from ..masks import apply_masks_, iter_masks, mask_grads_, remove_masks_
from ..registry import Registry
from .magnitude import FilterFn, MagnitudePrune, magnitude_prune_
from .schedule import model_sparsity, prune_iteratively_

REGISTRY = Registry("prune_")
METHODS = REGISTRY.methods  # recipe name -> config class
register = REGISTRY.register


def prune_(
    model: nn.Module,
    cfg: BaseModel,
    *,
    filter_fn: FilterFn | None = None,
    **kwargs: object,
) -> dict[str, float]:
    """Prune ``model`` in place as ``cfg`` says; returns each pruned layer's sparsity.

    ``filter_fn(module, name)`` restricts which layers are considered; other keyword
    arguments (``calib=``, ``example=`` ...) go to the method's handler.
    """
    return REGISTRY.handler(cfg)(model, cfg, filter_fn=filter_fn, **kwargs)


register("magnitude", MagnitudePrune, magnitude_prune_)

__all__ = [
    "METHODS",
    "MagnitudePrune",
    "apply_masks_",
    "iter_masks",
    "mask_grads_",
    "model_sparsity",
    "prune_",
    "prune_iteratively_",
    "register",
    "remove_masks_",
]
