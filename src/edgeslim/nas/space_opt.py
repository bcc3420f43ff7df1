"""Search-space optimisation, TinyNAS style: which width and resolution suit the device.

TinyNAS (Lin et al. 2020, "MCUNet: Tiny Deep Learning on IoT Devices", section 3.1,
https://arxiv.org/abs/2007.10319): before searching, pick the search space -- here a
(width multiplier, resolution) cell of the supernet's space -- whose sub-networks make the
best use of the device. For each cell, ``samples`` random sub-networks (depths, expansions
and kernels drawn uniformly, width and resolution fixed) are costed; those within the
budget are kept, and the cell with the highest **mean MACs of the fitting sub-networks** is
chosen (more computation that fits tends to mean more accuracy: the paper's heuristic,
checked there against trained accuracy). A cell where nothing fits scores 0.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from edgeslim.nas.supernet import SubnetConfig, SupernetSpec
from edgeslim.search.budget import Budget

__all__ = ["SpaceChoice", "optimize_space"]

CostFn = Callable[[SubnetConfig], dict[str, Any]]


@dataclass
class SpaceChoice:
    """The chosen (width, resolution) and one row per cell of the grid."""

    width: float
    resolution: int
    rows: list[dict[str, Any]] = field(default_factory=list)

    def markdown(self) -> str:
        """The grid as a Markdown table (the chosen cell marked)."""
        lines = [
            "| width | resolution | sampled | fit | mean MACs of fitting | max MACs of fitting |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for r in self.rows:
            mark = (
                " **chosen**"
                if (r["width"], r["resolution"]) == (self.width, self.resolution)
                else ""
            )
            lines.append(
                f"| {r['width']:g} | {r['resolution']}{mark} | {r['sampled']} | {r['fit']} | "
                f"{r['mean_macs']:,.0f} | {r['max_macs']:,.0f} |"
            )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"width": self.width, "resolution": self.resolution, "rows": self.rows}


def optimize_space(
    spec: SupernetSpec,
    cost_fn: CostFn,
    budget: Budget,
    *,
    samples: int = 16,
    seed: int = 0,
    widths: tuple[float, ...] | None = None,
    resolutions: tuple[int, ...] | None = None,
) -> SpaceChoice:
    """The (width, resolution) cell whose fitting samples have the highest mean MACs.

    ``cost_fn(cfg)`` returns at least ``macs`` and the budget's metrics (e.g.
    :meth:`edgeslim.nas.cost.SubnetCost.cost`). Ties: more fitting samples, then the
    smaller resolution and width (cheaper). A grid where nothing fits returns the cell with
    ``fit == 0`` everywhere and width / resolution of the smallest cell; the caller decides
    (``es.nas`` raises :class:`~edgeslim.nas.cost.BudgetError`).
    """
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
    best = max(rows, key=lambda r: (r["mean_macs"], r["fit"], -r["resolution"], -r["width"]))
    return SpaceChoice(best["width"], best["resolution"], rows)
