"""How important is each channel of a coupled group? One score per channel, higher = keep.

A *group* (from Torch-Pruning's dependency graph) is every slice of every tensor that must
go when one channel goes: a conv's filter, the BatchNorm entries after it, the matching input
slice of each consumer, the other convs tied to it by a residual add. Scores sum over the
whole group, so a channel that matters anywhere in it is kept.

- ``l1`` / ``l2``: norm of the group's weights per channel. Hao Li et al. "Pruning Filters for
  Efficient ConvNets", ICLR 2017. https://arxiv.org/abs/1608.08710
- ``bn_scale``: |gamma| of the group's BatchNorm layers (network slimming). Zhuang Liu et al.
  "Learning Efficient Convolutional Networks through Network Slimming", ICCV 2017.
  https://arxiv.org/abs/1708.06519 (groups without BatchNorm fall back to ``l1``).
- ``taylor``: first-order Taylor estimate of the loss change |w * dL/dw|, summed over the
  group. Pavlo Molchanov et al. "Importance Estimation for Neural Network Pruning", CVPR 2019.
  https://arxiv.org/abs/1906.10771 (needs labelled data: gradients are accumulated first).

The per-group arithmetic is Torch-Pruning's (``torch_pruning.importance``); this module picks
the estimator and prepares the gradients Taylor needs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from ..profile.latency import eval_mode

Importance = Literal["l1", "l2", "bn_scale", "taylor"]
IMPORTANCES: tuple[str, ...] = ("l1", "l2", "bn_scale", "taylor")


def scorer(kind: Importance) -> Callable[[object], torch.Tensor]:
    """A function ``group -> (channels,)`` scores for importance ``kind``."""
    l1 = tp.importance.GroupMagnitudeImportance(p=1)
    if kind == "l1":
        return l1
    if kind == "l2":
        return tp.importance.GroupMagnitudeImportance(p=2)
    if kind == "taylor":
        return tp.importance.GroupTaylorImportance()
    bn = tp.importance.BNScaleImportance()

    def bn_or_l1(group: object) -> torch.Tensor:
        score = bn(group)
        return l1(group) if score is None else score

    return bn_or_l1


def accumulate_gradients(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 64
) -> None:
    """Fill ``p.grad`` with the cross-entropy gradient summed over ``(x, y)`` (eval mode)."""
    model.zero_grad(set_to_none=True)
    with eval_mode(model), torch.enable_grad():
        for i in range(0, len(x), batch_size):
            logits = model(x[i : i + batch_size])
            F.cross_entropy(logits, y[i : i + batch_size], reduction="sum").backward()
