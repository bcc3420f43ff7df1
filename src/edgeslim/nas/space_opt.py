"""Search-space optimisation, TinyNAS style: which width and resolution suit the device.

TinyNAS (Lin et al. 2020, "MCUNet: Tiny Deep Learning on IoT Devices", section 3.1,
https://arxiv.org/abs/2007.10319): before searching, pick the search space -- here a
(width multiplier, resolution) cell of the supernet's space -- whose sub-networks make the
best use of the device. For each cell, ``samples`` random sub-networks (depths, expansions
and kernels drawn uniformly, width and resolution fixed) are costed; those within the
budget are kept, and the cell with the highest **mean MACs of the fitting sub-networks** is
chosen (more computation that fits tends to mean more accuracy: the paper's heuristic,
checked there against trained accuracy). A cell where nothing fits scores 0.

The heuristic is a proxy, and a noisy one with few samples per cell: under a latency limit it
leans to low resolutions (a 20 px cell fits more blocks and channels, so its fitting samples
have more MACs, though the task may need the detail of 28 px). ``top`` > 1 keeps the ``top``
best-scoring cells (those where something fits), and the evolution
(:func:`edgeslim.nas.evolve.evolve` with ``cells``) searches them together, so the
supernet's accuracy estimates, not the proxy, decide between them.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from edgeslim.core.errors import ConfigError
from edgeslim.nas.supernet import SubnetConfig, SupernetSpec
from edgeslim.search.budget import Budget

__all__ = ["SpaceChoice", "optimize_space"]

CostFn = Callable[[SubnetConfig], dict[str, Any]]


@dataclass
class SpaceChoice:
    """The chosen (width, resolution), the cells kept for the search (best first: the
    chosen one, then the runners-up) and one row per cell of the grid."""

    width: float
    resolution: int
    rows: list[dict[str, Any]] = field(default_factory=list)
    cells: list[tuple[float, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.cells = [(float(w), int(r)) for w, r in self.cells] or [(self.width, self.resolution)]

    def markdown(self) -> str:
        """The grid as a Markdown table (the chosen cell marked)."""
        lines = [
            "| width | resolution | sampled | fit | mean MACs of fitting | max MACs of fitting |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        rank = {cell: i for i, cell in enumerate(self.cells)}
        for r in self.rows:
            i = rank.get((r["width"], r["resolution"]))
            mark = "" if i is None else " **chosen**" if i == 0 else f" **searched ({i + 1})**"
            lines.append(
                f"| {r['width']:g} | {r['resolution']}{mark} | {r['sampled']} | {r['fit']} | "
                f"{r['mean_macs']:,.0f} | {r['max_macs']:,.0f} |"
            )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "width": self.width,
            "resolution": self.resolution,
            "cells": [list(c) for c in self.cells],
            "rows": self.rows,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SpaceChoice:
        """The inverse of :meth:`to_dict` (a file without ``cells``: the chosen cell only)."""
        return cls(d["width"], d["resolution"], d["rows"], [tuple(c) for c in d.get("cells", [])])


def optimize_space(
    spec: SupernetSpec,
    cost_fn: CostFn,
    budget: Budget,
    *,
    samples: int = 16,
    seed: int = 0,
    widths: tuple[float, ...] | None = None,
    resolutions: tuple[int, ...] | None = None,
    top: int = 1,
) -> SpaceChoice:
    """The (width, resolution) cell whose fitting samples have the highest mean MACs.

    ``cost_fn(cfg)`` returns at least ``macs`` and the budget's metrics (e.g.
    :meth:`edgeslim.nas.cost.SubnetCost.cost`). Ties: more fitting samples, then the
    smaller resolution and width (cheaper). ``top``: how many cells to keep for the search
    (``cells``, best first; only cells where a sample fits, at least the chosen one). A grid
    where nothing fits returns the cell with ``fit == 0`` everywhere and width / resolution
    of the smallest cell; the caller decides (``es.nas`` raises
    :class:`~edgeslim.nas.cost.BudgetError`).
    """
    if top < 1:
        raise ConfigError(f"optimize_space: top must be >= 1, got {top}")
    widths = widths or spec.widths
    resolutions = resolutions or spec.resolutions
    rows = []
    for width in widths:
        for resolution in resolutions:
            rng = random.Random(f"{seed}-{width}-{resolution}")
            macs = []
            for _ in range(samples):
                cfg = spec.sample(rng, resolution=resolution, width=width)
                cost = cost_fn(cfg)
                if budget.feasible(cost):
                    macs.append(cost["macs"])
            rows.append(
                {
                    "width": width,
                    "resolution": resolution,
                    "sampled": samples,
                    "fit": len(macs),
                    "mean_macs": sum(macs) / len(macs) if macs else 0.0,
                    "max_macs": max(macs) if macs else 0.0,
                }
            )
    ranked = sorted(
        rows, key=lambda r: (r["mean_macs"], r["fit"], -r["resolution"], -r["width"]), reverse=True
    )
    best = ranked[0]
    cells = [(r["width"], r["resolution"]) for r in ranked[:top] if r["fit"]]
    return SpaceChoice(best["width"], best["resolution"], rows, cells)
