"""The pruning plan: how many channels each group loses, and which (lowest importance first).

Per group, a ratio (uniform ``ratio``, per-layer ``layer_ratio``, or given per group by a
search), rounded so the channels kept are a multiple of ``round_to``; the lowest-importance
channels (scores from :mod:`.importance`) are chosen. Attention groups lose whole heads.
Nothing is cut here: :mod:`.surgery` does that.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from edgeslim.core.errors import ConfigError
from edgeslim.core.selection import matches
from edgeslim.prune.groups import Group, GroupOptions
from edgeslim.prune.importance import Importance, scorer


class PlanOptions(GroupOptions, Protocol):
    """What planning reads from a :class:`~edgeslim.prune.ChannelPrune`."""

    ratio: float | None
    layer_ratio: dict[str, float] | None
    heads: float | None
    importance: Importance
    round_to: int
    max_ratio: float


@dataclass(frozen=True)
class ProbeOptions:
    """``ChannelPrune``'s defaults for choosing channels, for callers without a config.

    Sensitivity probes and plan replays use it; every ratio comes from them, so no target is
    set. ``max_ratio`` is 0.99, as sensitivity probes use (a test checks the rest against
    ``ChannelPrune``'s defaults).
    """

    ratio: float | None = None
    layer_ratio: dict[str, float] | None = None
    heads: float | None = None
    importance: Importance = "l2"
    round_to: int = 1
    max_ratio: float = 0.99
    ignore: list[str] = field(default_factory=list)
    on_unsupported: str = "skip"


@dataclass
class Plan:
    """What to cut from one group: channel indices (and whole heads for attention)."""

    group: str  # the group's name: its first layer in definition order
    layers: list[str]
    channels: int
    remove: list[int]
    heads_removed: int = 0

    @property
    def kept(self) -> int:
        return self.channels - len(self.remove)


def group_ratio(group: Group, cfg: PlanOptions, ratios: dict[str, float] | None) -> float:
    """The fraction of ``group`` to remove: from ``ratios`` (by any of its layers) or ``ratio``."""
    table = ratios if ratios is not None else cfg.layer_ratio
    if table is None:
        r = cfg.ratio or 0.0
    else:
        r = 0.0
        for key, value in table.items():
            if any(matches(n, (key,)) for n in [group.name, *group.layers]):
                r = value
                break
    if group.heads and cfg.heads is not None:
        r = cfg.heads
    return min(r, cfg.max_ratio)


def n_to_remove(channels: int, ratio: float, round_to: int = 1) -> int:
    """How many of ``channels`` to cut for ``ratio``, keeping a multiple of ``round_to`` (>= 1)."""
    keep = max(1, round(channels * (1 - ratio)))
    if round_to > 1:
        keep = max(round_to, round(keep / round_to) * round_to)
    return max(0, channels - min(channels, keep))


def plan_groups(
    groups: list[Group],
    cfg: PlanOptions,
    ratios: dict[str, float] | None = None,
) -> list[Plan]:
    """Choose the channels to cut in each group, lowest importance first."""
    score = scorer(cfg.importance)
    plans: list[Plan] = []
    for g in groups:
        ratio = group_ratio(g, cfg, ratios)
        if ratio <= 0:
            continue
        imp = score(g.deps)
        if imp is None:  # e.g. taylor without gradients
            raise ConfigError(f"importance {cfg.importance!r} gave no score for group {g.name}")
        imp = imp.detach().cpu().float()
        if g.heads:  # whole heads: mean importance per head
            size = g.channels // g.heads
            n_heads = n_to_remove(g.heads, ratio)
            order = imp.view(g.heads, size).mean(1).argsort(stable=True)[:n_heads]
            remove = sorted(int(h) * size + i for h in order for i in range(size))
            plans.append(Plan(g.name, g.layers, g.channels, remove, n_heads))
            continue
        per = g.channels // g.ch_groups
        imp = imp.view(g.ch_groups, per).mean(0) if g.ch_groups > 1 else imp
        n = n_to_remove(per, ratio, max(1, cfg.round_to // g.ch_groups))
        order = imp.argsort(stable=True)[:n]
        remove = sorted(int(i) + k * per for k in range(g.ch_groups) for i in order)
        if remove:
            plans.append(Plan(g.name, g.layers, g.channels, remove))
    return plans
