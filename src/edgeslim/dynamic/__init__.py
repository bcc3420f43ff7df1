"""Dynamic inference and result reuse: compute depends on the input, results are reused.

    em = add_exits_(model, Exits(after=["conv1", "conv2"]))       # BranchyNet early exits
    gate_channels_(model, ChannelGating(density=0.5))             # FBS channel gating
    cache = FrameCachedModel(model, FrameCache(threshold=0.02))   # DeepCache across frames
    mt = add_heads(model, Heads(after="fc1", tasks={"digit": 10, "parity": 2}))

``dynamic_(model, cfg)`` dispatches on the config's type; ``method: NAME`` in a recipe's
stages picks the same configs (see :mod:`edgeslim.pipeline.stages.dynamic`).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from torch import nn

from edgeslim.core.registry import Registry
from edgeslim.dynamic.cache import (
    FrameCache,
    FrameCachedModel,
    add_frame_cache,
    skip_stats,
    stream_stats,
)
from edgeslim.dynamic.calibration import (
    ExitCalibration,
    ExitCosts,
    calibrate_exits,
    choose_thresholds,
    get_thresholds,
    measure_exit_costs,
    set_thresholds,
)
from edgeslim.dynamic.exits import (
    ExitModel,
    Exits,
    ExitTraining,
    add_exits_,
    exit_accuracies,
    exit_costs,
    train_exits,
)
from edgeslim.dynamic.gating import (
    ChannelGating,
    GatedConv,
    GatedInvertedResidual,
    gate_channels_,
    gate_loss,
    gated_units,
    set_density,
    train_gates,
)
from edgeslim.dynamic.multitask import Heads, MultiHead, add_heads, task_accuracy, train_heads
from edgeslim.dynamic.segments import count_macs, split

REGISTRY = Registry("dynamic_")
METHODS = REGISTRY.methods
register = REGISTRY.register


def dynamic_(model: nn.Module, cfg: BaseModel, **kwargs: Any) -> Any:
    """Make ``model`` dynamic as ``cfg`` says (Exits, ChannelGating, ...)."""
    return REGISTRY.call(model, cfg, **kwargs)


register(
    "exits", Exits, lambda m, cfg, ctx: add_exits_(m, cfg, example=ctx.example), takes=("example",)
)
register(
    "gating",
    ChannelGating,
    lambda m, cfg, ctx: gate_channels_(m, cfg, calib=ctx.calib),
    takes=("calib",),
)
register("cache", FrameCache, lambda m, cfg, ctx: add_frame_cache(m, cfg))
register("multitask", Heads, lambda m, cfg, ctx: add_heads(m, cfg))

__all__ = [
    "METHODS",
    "ChannelGating",
    "ExitCalibration",
    "ExitCosts",
    "ExitModel",
    "ExitTraining",
    "Exits",
    "FrameCache",
    "FrameCachedModel",
    "GatedConv",
    "GatedInvertedResidual",
    "Heads",
    "MultiHead",
    "add_exits_",
    "add_frame_cache",
    "add_heads",
    "calibrate_exits",
    "choose_thresholds",
    "count_macs",
    "dynamic_",
    "exit_accuracies",
    "exit_costs",
    "gate_channels_",
    "gate_loss",
    "gated_units",
    "get_thresholds",
    "measure_exit_costs",
    "register",
    "set_density",
    "set_thresholds",
    "skip_stats",
    "split",
    "stream_stats",
    "task_accuracy",
    "train_exits",
    "train_gates",
    "train_heads",
]
