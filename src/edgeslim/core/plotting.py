"""Figures without pyplot's global state: a detached Agg figure, saved as PNG atomically."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from edgeslim.core.fileio import atomic_path

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure


def new_figure(width: float, height: float) -> Figure:
    """A figure detached from pyplot (no global state), rendered with the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=120, layout="constrained")


def save_png(fig: Figure, path: Path) -> Path:
    """Write ``fig`` to ``path`` as PNG atomically."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return Path(path)
