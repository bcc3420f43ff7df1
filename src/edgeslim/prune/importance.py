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
- ``activation``: how much each channel feeds its consumers on real inputs, mean |x_j| times
  the norm of the consumer weights that read it (||W[:, j]||), summed over consumers: the
  structured form of Wanda's |w|*||x||. Mingjie Sun et al. "A Simple and Effective Pruning
  Approach for Large Language Models", ICLR 2024. https://arxiv.org/abs/2306.11695 (needs
  unlabelled calibration inputs: ``calib=`` or ``data=``, else the example).
- ``taylor``: first-order Taylor estimate of the loss change |w * dL/dw|, summed over the
  group. Pavlo Molchanov et al. "Importance Estimation for Neural Network Pruning", CVPR 2019.
  https://arxiv.org/abs/1906.10771 (needs labelled data: gradients are accumulated first).

The per-group arithmetic is Torch-Pruning's (``torch_pruning.importance``); this module picks
the estimator and prepares the gradients Taylor needs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from edgeslim.core.device import model_device, to_device
from edgeslim.core.hooks import eval_mode, forward_hooks

Importance = Literal["l1", "l2", "bn_scale", "taylor", "activation"]
IMPORTANCES: tuple[str, ...] = ("l1", "l2", "bn_scale", "taylor", "activation")
INPUT_STAT = "_edgeslim_input_abs"  # per-layer mean |input channel|, set by record_inputs


def scorer(kind: Importance) -> Callable[[object], torch.Tensor]:
    """A function ``group -> (channels,)`` scores for importance ``kind``."""
    l1 = tp.importance.GroupMagnitudeImportance(p=1)
    if kind == "l1":
        return l1
    if kind == "l2":
        return tp.importance.GroupMagnitudeImportance(p=2)
    if kind == "taylor":
        return tp.importance.GroupTaylorImportance()
    if kind == "activation":

        def activation_or_l2(group: object) -> torch.Tensor:
            score = activation_importance(group)
            return tp.importance.GroupMagnitudeImportance(p=2)(group) if score is None else score

        return activation_or_l2
    bn = tp.importance.BNScaleImportance()

    def bn_or_l1(group: object) -> torch.Tensor:
        score = bn(group)
        return l1(group) if score is None else score

    return bn_or_l1


def accumulate_gradients(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 64
) -> None:
    """Fill ``p.grad`` with the cross-entropy gradient summed over ``(x, y)`` (eval mode);
    the batches run on the model's device."""
    device = model_device(model)
    x, y = x.to(device), y.to(device)
    model.zero_grad(set_to_none=True)
    with eval_mode(model), torch.enable_grad():
        for i in range(0, len(x), batch_size):
            logits = model(x[i : i + batch_size])
            F.cross_entropy(logits, y[i : i + batch_size], reduction="sum").backward()


def record_inputs(model: nn.Module, inputs: Any, batch_size: int = 64) -> None:
    """Store each Conv/Linear layer's mean |input| per input channel on the layer itself.

    ``inputs``: a tensor batch ``(N, ...)`` or a dict of keyword inputs (one batch). The
    statistic travels with ``copy.deepcopy``; :func:`forget_inputs` removes it.
    """
    sums: dict[nn.Module, torch.Tensor] = {}
    counts: dict[nn.Module, int] = {}

    def hook(_name: str, module: nn.Module, args: tuple[Any, ...], _out: Any) -> None:
        x = args[0].detach()
        if isinstance(module, nn.Linear):  # (..., in)
            flat = x.reshape(-1, x.shape[-1]).abs()
        else:  # conv (B, C, *spatial)
            flat = x.movedim(1, -1).reshape(-1, x.shape[1]).abs()
        sums[module] = sums.get(module, 0) + flat.sum(0)
        counts[module] = counts.get(module, 0) + flat.shape[0]

    kinds = nn.Linear | nn.Conv1d | nn.Conv2d
    layers = {n: m for n, m in model.named_modules() if isinstance(m, kinds)}
    inputs = to_device(inputs, model_device(model))
    with forward_hooks(layers, hook), eval_mode(model), torch.no_grad():
        if isinstance(inputs, dict):
            model(**inputs)
        else:
            for i in range(0, len(inputs), batch_size):
                model(inputs[i : i + batch_size])
    for module, total in sums.items():
        setattr(module, INPUT_STAT, total / counts[module])


def forget_inputs(model: nn.Module) -> None:
    """Remove what :func:`record_inputs` stored."""
    for module in model.modules():
        if hasattr(module, INPUT_STAT):
            delattr(module, INPUT_STAT)


@torch.no_grad()
def activation_importance(group: Any) -> torch.Tensor | None:
    """Sum over the group's consumers of mean |x_j| * ||W[:, j]|| (see the module doc).

    None when no consumer of the group has recorded inputs.
    """
    score = None  # one entry per channel of the group's root, on the layers' device
    found = False
    for item in group:
        layer, handler = item.dep.target.module, item.dep.handler
        stat = getattr(layer, INPUT_STAT, None)
        reads = handler in (tp.prune_linear_in_channels, tp.prune_conv_in_channels)
        grouped = isinstance(layer, nn.Conv1d | nn.Conv2d) and layer.groups > 1
        if stat is None or not reads or grouped:
            continue
        w = layer.weight.detach()  # Linear (out, in); Conv (out, in, *k)
        column = w.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1)  # (in,)
        local = (stat * column)[list(item.idxs)].float()
        if score is None:
            score = torch.zeros(len(group[0].idxs), device=local.device)
        index = torch.as_tensor(item.root_idxs, dtype=torch.long, device=local.device)
        score.index_add_(0, index, local)
        found = True
    return score if found else None
