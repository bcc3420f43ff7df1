"""Weight sharing: one verb, :func:`share_`, dispatching on the config's type.

    share_(model, KMeansShare(bits={"conv": 8, "linear": 5}))   # Deep Compression
    share_(model, HashShare(ratio=1 / 8))                        # HashedNets

``method: NAME`` in a recipe's ``share`` stage picks the config class registered under NAME.
"""

from __future__ import annotations

from edgeslim.core.masks import iter_shared, remove_sharing_
from edgeslim.share.hashed import HashedConv2d, HashedLinear, HashShare
from edgeslim.share.kmeans import KMeansShare
from edgeslim.share.registry import METHODS, REGISTRY

register = REGISTRY.register

share_ = REGISTRY.verb(
    """Share ``model``'s weights in place as ``cfg`` says; returns a log row per layer.

    ``filter_fn(module, name)`` restricts which layers are considered.
    """
)


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
