"""MAC budgets: per-group ratios that keep a fraction of the MACs, uniformly or by sensitivity.

For ``ChannelPrune(macs=...)`` the ratios are searched (:func:`ratios_for_macs`): one ratio
for every group, or one allowed accuracy drop turned into per-group ratios by a channel
sensitivity analysis (:mod:`.sensitivity`). When kept channels are rounded to a multiple of
``round_to``, the channels rounding cut beyond the budget are given back (:func:`fill_budget`).
MACs are counted on pruned copies; the model itself is not touched.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn

from edgeslim.core.data.datasets import DataSplits
from edgeslim.core.errors import ConfigError
from edgeslim.core.hooks import eval_mode, forward_hooks
from edgeslim.prune.groups import ROOT_TYPES, Group, prepare
from edgeslim.prune.plan import PlanOptions, group_ratio, plan_groups
from edgeslim.prune.sensitivity import SLOPE, channel_sensitivity
from edgeslim.prune.surgery import cut


class BudgetOptions(PlanOptions, Protocol):
    """What the MAC-budget search reads from a :class:`~edgeslim.prune.ChannelPrune`."""

    macs: float | None
    allocation: str
    fill: bool
    probe_ratios: list[float]


def count_macs(model: nn.Module, example: torch.Tensor) -> int:
    """Dense MACs of one sample in Conv and Linear layers (forward hooks; fast).

    The same rule as :mod:`edgeslim.profiling.counting` for these layers -- output elements
    times ``weight.numel() / out_channels`` -- without tracing, for the ratio searches.
    """
    total = 0

    def hook(_name: str, mod: nn.Module, _inputs: Any, out: torch.Tensor) -> None:
        nonlocal total
        total += out[:1].numel() * (mod.weight.numel() // mod.weight.shape[0])

    layers = {n: m for n, m in model.named_modules() if isinstance(m, ROOT_TYPES)}
    with forward_hooks(layers, hook), eval_mode(model), torch.no_grad():
        model(example[:1])
    return total


def macs_after(
    model: nn.Module, example: torch.Tensor, cfg: PlanOptions, ratios: dict[str, float]
) -> int:
    """MACs of a copy of ``model`` pruned with per-group ``ratios`` (the model is untouched)."""
    twin = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dg, groups = prepare(twin, example, cfg)
        cut(dg, groups, plan_groups(groups, cfg, ratios))
    return count_macs(twin, example)


def search(
    cost: Callable[[float], float], target: float, low: float, high: float, steps: int = 6
) -> float:
    """The smallest knob in [low, high] with ``cost(knob) <= target``, else ``high``.

    A coarse scan (12 points) finds the first feasible knob, then ``steps`` bisections refine
    it; the scan keeps the search right when ``cost`` is not quite monotone at the extremes.
    """
    grid = [low + (high - low) * k / 12 for k in range(1, 13)]
    previous = low
    for knob in grid:
        if cost(knob) <= target:
            break
        previous = knob
    else:
        return high
    for _ in range(steps):
        mid = (previous + knob) / 2
        if cost(mid) <= target:
            knob = mid
        else:
            previous = mid
    return knob


def fill_budget(
    model: nn.Module,
    example: torch.Tensor,
    cfg: BudgetOptions,
    groups: list[Group],
    ratios: dict[str, float],
    dense: int,
) -> dict[str, float]:
    """Give channels back, one ``round_to`` step at a time, while the MACs stay within budget.

    Rounding kept channels to a multiple of ``round_to`` can overshoot a MACs target by far (a
    16-wide group can only keep 8 or 16). Each pass offers every cut group, most-cut first,
    ``round_to`` more kept channels and keeps the change when the model still fits
    ``cfg.macs``; passes repeat until nothing fits.
    """
    ratios = {g.name: group_ratio(g, cfg, ratios) for g in groups}
    changed = True
    while changed:
        changed = False
        for g in sorted(groups, key=lambda g: -ratios[g.name]):
            if g.heads or ratios[g.name] <= 0:
                continue
            step = cfg.round_to / g.channels  # one more step of kept channels
            trial = {**ratios, g.name: max(0.0, ratios[g.name] - step)}
            if macs_after(model, example, cfg, trial) <= cfg.macs * dense:
                ratios, changed = trial, True
    return ratios


def ratios_for_macs(
    model: nn.Module,
    example: torch.Tensor,
    cfg: BudgetOptions,
    groups: list[Group],
    data: DataSplits | None = None,
) -> dict[str, float]:
    """Per-group ratios that keep about ``cfg.macs`` of the MACs (see ``cfg.allocation``)."""
    dense = count_macs(model, example)

    def fraction(ratios: dict[str, float]) -> float:
        return macs_after(model, example, cfg, ratios) / dense

    def filled(ratios: dict[str, float]) -> dict[str, float]:
        if cfg.round_to == 1 or not cfg.fill:
            return ratios
        return fill_budget(model, example, cfg, groups, ratios, dense)

    if cfg.allocation == "uniform":

        def uniform(r: float) -> dict[str, float]:
            return {g.name: r for g in groups}

        r = search(lambda r: fraction(uniform(r)), cfg.macs, 0.0, cfg.max_ratio)
        return filled(uniform(r))
    if data is None:
        raise ConfigError("ChannelPrune(allocation='sensitivity') needs data= (labelled splits)")
    sens = channel_sensitivity(model, data, example, cfg, cfg.probe_ratios)

    def ratios(drop: float) -> dict[str, float]:
        return sens.ratios_for_drop(drop, cfg.max_ratio, SLOPE)

    top = max(sens.worst_drop(), 0.0) + SLOPE * cfg.max_ratio + 1e-6  # probes may gain
    return filled(ratios(search(lambda d: fraction(ratios(d)), cfg.macs, 0.0, top)))
