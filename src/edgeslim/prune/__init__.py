"""Pruning: one verb, :func:`prune_`, dispatching on the config's type.

    prune_(model, MagnitudePrune(sparsity=0.9))                  # unstructured, |w|
    prune_(model, OBDPrune(sparsity=0.9), data=data)             # unstructured, h w^2 / 2
    prune_(model, OBSPrune(sparsity=0.9), data=data)             # layer-wise OBS + update
    prune_(model, NMPrune(n=2, m=4))                             # 2:4 semi-structured
    prune_(model, ChannelPrune(ratio=0.5), example=x)            # channels/heads removed
    prune_(model, DepthPrune(blocks=1), example=x)               # residual blocks removed

Each technique module registers its config and handler in :mod:`edgeslim.prune.registry`.
"""

from __future__ import annotations

from edgeslim.core.masks import apply_masks_, iter_masks, mask_grads_, remove_masks_
from edgeslim.core.sparsity import nm_pattern
from edgeslim.prune.agp import AGPSchedule, prune_agp_
from edgeslim.prune.channel import ChannelPrune
from edgeslim.prune.depth import DepthPrune
from edgeslim.prune.groups import UnsupportedOpError
from edgeslim.prune.magnitude import MagnitudePrune
from edgeslim.prune.nm import NMPrune
from edgeslim.prune.obd import OBDPrune, hessian_diagonal
from edgeslim.prune.obs import OBSPrune
from edgeslim.prune.registry import METHODS, REGISTRY
from edgeslim.prune.schedule import model_sparsity, prune_iteratively_
from edgeslim.prune.sensitivity import Sensitivity, sensitivity
from edgeslim.prune.sparsegpt import (
    SparseGPT,  # registers SparseGPTAlgorithm with the one-shot engine
)
from edgeslim.prune.wanda import Wanda  # registers WandaAlgorithm

register = REGISTRY.register
accepted = REGISTRY.accepted

prune_ = REGISTRY.verb(
    """Prune ``model`` in place as ``cfg`` says; returns the method's log: each pruned layer's
    sparsity (``ChannelPrune``: each cut group's fraction of channels removed and the plan a
    resume replays; ``DepthPrune``: the removed blocks).

    ``filter_fn(module, name)`` restricts which layers are considered; other keyword
    arguments (``data=``, ``calib=``, ``example=`` ...) go to the method's handler, and one
    the method does not take is a ConfigError.
    """
)

__all__ = [
    "METHODS",
    "AGPSchedule",
    "ChannelPrune",
    "DepthPrune",
    "MagnitudePrune",
    "NMPrune",
    "OBDPrune",
    "OBSPrune",
    "Sensitivity",
    "SparseGPT",
    "UnsupportedOpError",
    "Wanda",
    "accepted",
    "apply_masks_",
    "hessian_diagonal",
    "iter_masks",
    "mask_grads_",
    "model_sparsity",
    "nm_pattern",
    "prune_",
    "prune_agp_",
    "prune_iteratively_",
    "register",
    "remove_masks_",
    "sensitivity",
]
