"""Weight sharing: one verb, :func:`share_`, dispatching on the config's type.

    share_(model, KMeansShare(bits={"conv": 8, "linear": 5}))   # Deep Compression
    share_(model, HashShare(ratio=1 / 8))                        # HashedNets

``method: NAME`` in a recipe's ``share`` stage picks the config class registered under NAME.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from edgeslim.core.masks import iter_shared, remove_sharing_
from edgeslim.core.registry import Registry
from edgeslim.share.hashed import HashedConv2d, HashedLinear, HashShare, hash_share_
from edgeslim.share.kmeans import KMeansShare, kmeans_share_

REGISTRY = Registry("share_")
METHODS = REGISTRY.methods  # recipe name -> config class
register = REGISTRY.register

share_ = REGISTRY.verb(
    """Share ``model``'s weights in place as ``cfg`` says; returns a log row per layer.

    ``filter_fn(module, name)`` restricts which layers are considered.
    """
)


def replay_hashing_(model: nn.Module, cfg: HashShare, log: Any, example: Any) -> nn.Module:
    """Swap the hashed layers in again: their index and sign come from the same seeds (the
    saved state is loaded next). k-means sharing changes no structure: its codes and
    centroids come back with the state."""
    share_(model, cfg)
    return model


register("kmeans", KMeansShare, kmeans_share_)
register("hash", HashShare, hash_share_, replay=replay_hashing_)

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
