"""Pruning: one verb, :func:`prune_`, dispatching on the config's type.

    prune_(model, MagnitudePrune(sparsity=0.9))                  # unstructured, |w|
    prune_(model, OBDPrune(sparsity=0.9), data=data)             # unstructured, h w^2 / 2
    prune_(model, OBSPrune(sparsity=0.9), data=data)             # layer-wise OBS + update
    prune_(model, NMPrune(n=2, m=4))                             # 2:4 semi-structured
    prune_(model, ChannelPrune(ratio=0.5), example=x)            # channels/heads removed
    prune_(model, DepthPrune(blocks=1), example=x)               # residual blocks removed

Later techniques register a handler with :func:`register`.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from edgeslim.core.masks import apply_masks_, iter_masks, mask_grads_, remove_masks_
from edgeslim.core.registry import Registry
from edgeslim.core.sparsity import nm_pattern
from edgeslim.oneshot.engine import one_shot_ as _one_shot_
from edgeslim.prune.agp import AGPSchedule, prune_agp_
from edgeslim.prune.channel import ChannelPrune, channel_prune_
from edgeslim.prune.depth import DepthPrune, depth_prune_, replay_depth_
from edgeslim.prune.groups import UnsupportedOpError
from edgeslim.prune.magnitude import MagnitudePrune, magnitude_prune_
from edgeslim.prune.nm import NMPrune, nm_prune_
from edgeslim.prune.obd import OBDPrune, hessian_diagonal, obd_prune_
from edgeslim.prune.obs import OBSPrune, obs_prune_
from edgeslim.prune.schedule import model_sparsity, prune_iteratively_
from edgeslim.prune.sensitivity import Sensitivity, sensitivity
from edgeslim.prune.sparsegpt import (
    SparseGPT,  # registers SparseGPTAlgorithm with the one-shot engine
)
from edgeslim.prune.surgery import replay_
from edgeslim.prune.wanda import Wanda  # registers WandaAlgorithm

REGISTRY = Registry("prune_")
METHODS = REGISTRY.methods  # recipe name -> config class
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


def replay_channels_(model: nn.Module, cfg: ChannelPrune, log: dict, example: Any) -> nn.Module:
    """Cut the channels a ``ChannelPrune`` log records (its ``cut`` plans) again."""
    replay_(model, example, log.get("cut", []))
    return model


def replay_blocks_(model: nn.Module, cfg: DepthPrune, log: dict, example: Any) -> nn.Module:
    """Remove the residual blocks a ``DepthPrune`` log names again."""
    replay_depth_(model, list(log))
    return model


register("magnitude", MagnitudePrune, magnitude_prune_)
register("wanda", Wanda, _one_shot_)
register("sparsegpt", SparseGPT, _one_shot_)
register("obd", OBDPrune, obd_prune_)
register("obs", OBSPrune, obs_prune_)
register("nm", NMPrune, nm_prune_)
register("channel", ChannelPrune, channel_prune_, replay=replay_channels_)
register("depth", DepthPrune, depth_prune_, replay=replay_blocks_)

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
