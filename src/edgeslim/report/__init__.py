"""Run reports: tables (rich / markdown) and plots (matplotlib) from ``DIR/metrics.jsonl``.

Nothing here imports torch, so ``edgeslim report DIR`` re-renders a report quickly.
"""

from __future__ import annotations

from edgeslim.report.markdown import build_markdown, recipe_name, render_report
from edgeslim.report.plots import plot_accuracy_vs_size, plot_layer_sparsity
from edgeslim.report.tables import (
    COLUMNS,
    human_bytes,
    human_count,
    layer_rows,
    read_metrics,
    stage_rows,
    stage_table,
    summary_line,
)

__all__ = [
    "COLUMNS",
    "build_markdown",
    "human_bytes",
    "human_count",
    "layer_rows",
    "plot_accuracy_vs_size",
    "plot_layer_sparsity",
    "read_metrics",
    "recipe_name",
    "render_report",
    "stage_rows",
    "stage_table",
    "summary_line",
]
