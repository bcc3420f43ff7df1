"""Weight sharing: one verb, :func:`share_`, dispatching on the config's type.

    share_(model, KMeansShare(bits={"conv": 8, "linear": 5}))   # Deep Compression
    share_(model, HashShare(ratio=1 / 8))                        # HashedNets

``method: NAME`` in a recipe's ``share`` stage picks the config class registered under NAME.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import BaseModel
from torch import nn

from edgeslim.core.masks import iter_shared, remove_sharing_
from edgeslim.core.registry import Registry
from edgeslim.share.hashed import HashedConv2d, HashedLinear, HashShare, hash_share_
from edgeslim.share.kmeans import KMeansShare, kmeans_share_

FilterFn = Callable[[nn.Module, str], bool]
REGISTRY = Registry("share_")
METHODS = REGISTRY.methods  # recipe name -> config class
register = REGISTRY.register


def share_(
    model: nn.Module, cfg: BaseModel, *, filter_fn: FilterFn | None = None, **kwargs: Any
) -> dict[str, Any]:
    """Share ``model``'s weights in place as ``cfg`` says; returns a log row per layer.

    ``filter_fn(module, name)`` restricts which layers are considered.
    """
    return REGISTRY.handler(cfg)(model, cfg, filter_fn=filter_fn, **kwargs)


register("kmeans", KMeansShare, kmeans_share_)
register("hash", HashShare, hash_share_)

__all__ = [
    "METHODS",
    "HashShare",
    "HashedConv2d",
    "HashedLinear",
    "KMeansShare",
    "iter_shared",
    "register",
    "remove_sharing_",
    "share_",
]
