"""The run report: ``DIR/report.md`` with the stage table, a summary, per-layer table, plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from edgeslim.core.fileio import atomic_write_text
from edgeslim.report.plots import (
    layer_bits_rows,
    plot_accuracy_vs_compute,
    plot_accuracy_vs_size,
    plot_layer_bits,
    plot_layer_sparsity,
    tradeoff_rows,
)
from edgeslim.report.tables import (
    COLUMNS,
    layer_rows,
    metric_header,
    read_metrics,
    stage_name,
    stage_rows,
    summary_line,
)

REPORT_FILE = "report.md"
PLOTS_DIR = "plots"
ACCURACY_PLOT = "accuracy_vs_size.png"
SPARSITY_PLOT = "layer_sparsity.png"
BITS_PLOT = "layer_bits.png"
COMPUTE_PLOT = "accuracy_vs_compute.png"
# (key in a layer_rows() row, column header)
LAYER_COLUMNS: list[tuple[str, str]] = [
    *((key, key) for key in ("layer", "type", "params", "nonzero")),
    ("kept", "kept %"),
]
_LEFT = {"stage", "format", "layer", "type"}


def recipe_name(run_dir: Path) -> str:
    """The ``name`` in ``run_dir/recipe.yaml``, else the directory's name."""
    try:
        recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        recipe = None
    if isinstance(recipe, dict) and recipe.get("name"):
        return str(recipe["name"])
    return run_dir.resolve().name


def markdown_table(rows: list[dict[str, str]], columns: list[tuple[str, str]]) -> str:
    """A GitHub-flavoured markdown table; text columns left-aligned, numbers right-aligned."""
    header = "| " + " | ".join(title for _, title in columns) + " |"
    rule = "|" + "|".join(":---" if key in _LEFT else "---:" for key, _ in columns) + "|"
    body = ["| " + " | ".join(_cell(row[key]) for key, _ in columns) + " |" for row in rows]
    return "\n".join([header, rule, *body])


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def build_markdown(rows: list[dict[str, Any]], title: str) -> str:
    """The text of report.md for metrics ``rows`` (plots referenced under ``plots/``)."""
    final = rows[-1]
    layers = layer_rows(final)
    layer_section = (
        markdown_table(layers, LAYER_COLUMNS) if layers else "_no per-layer data recorded._"
    )
    parts = [
        f"# edgeslim run report: {title}",
        f"{len(rows)} stage(s); ratios are relative to the baseline "
        "(ratio = baseline params / nonzero params, size = bytes of the saved weights file).",
        "## Stages",
        markdown_table(stage_rows(rows), _columns(rows)),
        f"**{summary_line(rows)}**",
        *_notes(final),
        f"## Layers after {stage_name(final)}",
        layer_section,
        "## Plots",
        f"![accuracy vs size]({PLOTS_DIR}/{ACCURACY_PLOT})",
        f"![per-layer density]({PLOTS_DIR}/{SPARSITY_PLOT})",
    ]
    if layer_bits_rows(rows):  # only when a stage chose per-layer bit widths
        parts.append(f"![per-layer weight bits]({PLOTS_DIR}/{BITS_PLOT})")
    if tradeoff_rows(rows):  # dynamic stages: their threshold sweeps
        parts.append(f"![accuracy vs average compute]({PLOTS_DIR}/{COMPUTE_PLOT})")
    return "\n\n".join(parts) + "\n"


def _columns(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """:data:`COLUMNS` with the quality column named after the run's metric."""
    title = metric_header(rows[0])
    return [(key, title if key == "accuracy" else head) for key, head in COLUMNS]


def _notes(row: dict[str, Any]) -> list[str]:
    """The final stage's profile notes (what its sparsity does not buy), as a list."""
    notes = row.get("notes") or []
    return ["## Notes", "\n".join(f"- {n}" for n in notes)] if notes else []


def render_report(run_dir: str | Path) -> Path:
    """Write ``run_dir/report.md`` and its plots under ``run_dir/plots/``; return report.md."""
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    plots = run_dir / PLOTS_DIR
    plot_accuracy_vs_size(rows, plots / ACCURACY_PLOT)
    plot_layer_sparsity(rows, plots / SPARSITY_PLOT)
    plot_layer_bits(rows, plots / BITS_PLOT)
    plot_accuracy_vs_compute(rows, plots / COMPUTE_PLOT)
    return atomic_write_text(run_dir / REPORT_FILE, build_markdown(rows, recipe_name(run_dir)))
