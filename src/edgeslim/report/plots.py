"""Plots of a run (matplotlib, imported lazily, Agg backend): accuracy vs size, layer sparsity.

Each function takes the rows of :func:`~edgeslim.report.tables.read_metrics` and a target
path, writes the PNG atomically (temporary file, then rename) and returns the path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgeslim.core.plotting import new_figure, save_png
from edgeslim.report.tables import human_count, metric_title, metric_unit, stage_name

MAX_STAGES_PER_LAYER_PLOT = 6


def plot_accuracy_vs_size(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Test accuracy (%) against file size (KiB, log scale), one labelled point per stage.

    Points are connected in stage order; each label also gives the stage's nonzero params.
    """
    fig = new_figure(7.0, 4.5)
    ax = fig.add_subplot()
    sizes = [row["size_bytes"] / 1024 for row in rows]
    percent = metric_unit(rows[0]) == "%"  # accuracies in %; perplexity, MSE ... as they are
    accs = [100 * row["accuracy"] if percent else row["accuracy"] for row in rows]
    ax.plot(sizes, accs, "-", color="0.6", zorder=1)
    ax.scatter(sizes, accs, c=range(len(rows)), cmap="viridis", s=50, zorder=2)
    for row, x, y in zip(rows, sizes, accs, strict=True):
        label = f"{stage_name(row)}\n{human_count(row.get('nonzero_params'))} nonzero"
        ax.annotate(label, (x, y), xytext=(6, 6), textcoords="offset points", fontsize=8)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(lambda x, _pos: f"{x:g}")
    ax.set_xlabel("file size (KiB, log scale)")
    ax.set_ylabel(f"test {metric_title(rows[0])}" + (" (%)" if percent else ""))
    ax.set_title("accuracy vs size")
    ax.grid(True, which="both", alpha=0.3)
    _pad_axes(ax, sizes, accs, 1.0 if percent else 0.05 * max(map(abs, accs)) or 1.0)
    return save_png(fig, Path(path))


def _pad_axes(ax: Any, sizes: list[float], accs: list[float], min_span: float = 1.0) -> None:
    """Leave room to the right and above the points for their labels."""
    lo, hi = min(sizes), max(sizes)
    ax.set_xlim(lo / 1.5, hi * 3.0)
    bottom, top = min(accs), max(accs)
    span = max(top - bottom, min_span)
    ax.set_ylim(bottom - 0.3 * span, top + 0.4 * span)


def plotted_stages(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The stages shown per layer: all of them up to six, else the baseline and the final."""
    with_layers = [row for row in rows if row.get("layers")]
    if len(with_layers) <= MAX_STAGES_PER_LAYER_PLOT:
        return with_layers
    return [with_layers[0], with_layers[-1]]


def _layer_names(stages: list[dict[str, Any]]) -> list[str]:
    """Layer names in first-seen order across ``stages`` (layers removed later stay listed)."""
    names: dict[str, None] = {}
    for row in stages:
        names.update(dict.fromkeys(row["layers"]))
    return list(names)


def _kept(row: dict[str, Any], layer: str) -> float:
    """Fraction of a layer's weights that are nonzero in ``row`` (0 when absent/empty)."""
    info = row["layers"].get(layer) or {}
    params, nonzero = info.get("params"), info.get("nonzero_params")
    return nonzero / params if params and nonzero is not None else 0.0


def plot_layer_sparsity(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Grouped bars: per layer, the fraction of weights kept, for each plotted stage."""
    stages = plotted_stages(rows)
    layers = _layer_names(stages)
    fig = new_figure(max(6.0, 0.9 * len(layers) + 2.5), 4.5)
    ax = fig.add_subplot()
    if not layers:
        ax.text(0.5, 0.5, "no per-layer data in metrics.jsonl", ha="center", va="center")
        ax.set_axis_off()
        return save_png(fig, Path(path))
    ax.set_ylim(0, 1.05)
    ax.yaxis.set_major_formatter(lambda y, _pos: f"{100 * y:.0f}%")
    ax.set_ylabel("weights kept (nonzero / params)")
    ax.set_title("per-layer density")
    return _grouped_bars(fig, ax, stages, list(layers), _kept, path)


def _grouped_bars(fig, ax, stages: list[dict], names: list[str], value, path) -> Path:
    """One bar per (layer, stage) — ``value(row, layer)`` — grouped by layer; saved as PNG."""
    width = 0.8 / len(stages)
    for i, row in enumerate(stages):
        xs = [j + (i - (len(stages) - 1) / 2) * width for j in range(len(names))]
        ax.bar(xs, [value(row, n) for n in names], width, label=stage_name(row))
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return save_png(fig, Path(path))


def layer_bits_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The stages whose log records per-layer bit widths (``log.layer_bits``)."""
    return [row for row in rows if (row.get("log") or {}).get("layer_bits")]


def plot_layer_bits(rows: list[dict[str, Any]], path: str | Path) -> Path | None:
    """Grouped bars: weight bits per layer for each stage that chose them (None if none did)."""
    stages = layer_bits_rows(rows)
    if not stages:
        return None
    layers: dict[str, None] = {}
    for row in stages:
        layers.update(dict.fromkeys(row["log"]["layer_bits"]))
    names = list(layers)
    fig = new_figure(max(6.0, 0.9 * len(names) + 2.5), 4.0)
    ax = fig.add_subplot()
    ax.set_yticks(range(1, 9))
    ax.set_ylim(0, 8.5)
    ax.set_ylabel("weight bits")
    ax.set_title("per-layer weight bit width")
    return _grouped_bars(
        fig, ax, stages, names, lambda row, n: row["log"]["layer_bits"].get(n, 0), path
    )


def tradeoff_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The stages that logged an accuracy-compute curve (dynamic stages)."""
    return [row for row in rows if isinstance((row.get("log") or {}).get("tradeoff"), dict)]


def plot_accuracy_vs_compute(rows: list[dict[str, Any]], path: str | Path) -> Path | None:
    """Accuracy against average MACs of each dynamic stage's threshold sweep (None if none)."""
    from edgeslim.dynamic.plot import plot_tradeoffs

    stages = tradeoff_rows(rows)
    if not stages:
        return None
    curves = {stage_name(row): row["log"]["tradeoff"] for row in stages}
    return plot_tradeoffs(curves, path, "accuracy vs compute")
