"""Read a run's ``metrics.jsonl`` and turn its rows into display tables.

A run directory holds one JSON object per finished stage in ``metrics.jsonl``; the first
row is the dense baseline. Everything here is plain Python (no torch), so the CLI can
re-render a report quickly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeslim.core.errors import CheckpointError, RunDirError
from edgeslim.core.metrics import display, format_value
from edgeslim.core.units import DASH, human_bytes

if TYPE_CHECKING:  # pragma: no cover
    from rich.table import Table

METRICS_FILE = "metrics.jsonl"
REQUIRED_KEYS = ("stage", "accuracy", "size_bytes")

MINUS = "−"

# (key in a stage_rows() row, column header)
COLUMNS: list[tuple[str, str]] = [
    ("stage", "stage"),
    ("accuracy", "accuracy"),
    ("delta", "Δ"),
    ("nonzero_params", "nonzero params"),
    ("ratio", "ratio"),
    ("size", "size"),
    ("size_ratio", "size ratio"),
    ("format", "format"),
    ("macs", "MACs"),
    ("effective_macs", "eff. MACs"),
    ("latency", "latency (ms)"),
]


# ----------------------------------------------------------------------------- formatting


def human_count(n: float | None) -> str:
    """A count with three significant digits: ``520``, ``35.0K``, ``2.29M``; ``–`` if unknown."""
    if n is None:
        return DASH
    value = float(n)
    if abs(value) < 1000:
        return f"{value:g}" if value != int(value) else str(int(value))
    for unit in ("K", "M", "G", "T"):
        value /= 1000
        text = _three_digits(value)
        if float(text) < 1000 or unit == "T":
            return f"{text}{unit}"
    raise AssertionError("unreachable")


def _three_digits(value: float) -> str:
    """``value`` (>= 1) with three significant digits, without exponent notation."""
    if abs(value) >= 99.95:
        return f"{value:.0f}"
    if abs(value) >= 9.995:
        return f"{value:.1f}"
    return f"{value:.2f}"


def ratio_text(numerator: float | None, denominator: float | None) -> str:
    """``numerator / denominator`` as ``12.3x``; ``–`` when unknown or dividing by zero."""
    if numerator is None or not denominator:
        return DASH
    return f"{numerator / denominator:.1f}x"


def signed(value: float, digits: int = 2) -> str:
    """``value`` with an explicit sign, using a typographic minus: ``+0.30``, ``−1.25``."""
    text = f"{value:+.{digits}f}"
    if float(text) == 0:  # never print "-0.00"
        text = f"+{abs(value):.{digits}f}"
    return text.replace("-", MINUS)


def percent(fraction: float | None, digits: int = 2) -> str:
    """A fraction in [0, 1] as a percentage: ``97.40%``; ``–`` when unknown."""
    return DASH if fraction is None else f"{100 * fraction:.{digits}f}%"


def metric_text(row: dict[str, Any], digits: int = 2) -> str:
    """A row's quality (the value under ``accuracy``, named by ``metric``): accuracies (and
    embedding cosine) as a percentage, perplexity in ppl, other metrics as plain numbers."""
    return format_value(row.get("metric"), row["accuracy"], digits)


def metric_unit(row: dict[str, Any]) -> str:
    """``%``, ``ppl`` or ``""``: how the row's metric is shown (``core.metrics.display``)."""
    return display(row.get("metric"), row.get("higher_is_better"))[0]


def metric_title(row: dict[str, Any]) -> str:
    """The metric's name as reports print it (``accuracy`` for top-1)."""
    return display(row.get("metric"), row.get("higher_is_better"))[2]


def metric_delta(row: dict[str, Any], base: dict[str, Any], digits: int = 2) -> str:
    """The change from ``base``: percentage points, perplexity units, or the metric's own."""
    change = row["accuracy"] - base["accuracy"]
    unit = metric_unit(row)
    if unit == "%":
        return signed(100 * change, digits)
    if unit == "ppl":
        return signed(change, digits)
    text = f"{change:+.{digits + 1}g}"
    return text.replace("-", MINUS) if float(text) else "+0"


def latency_text(ms: float | None) -> str:
    """Latency in milliseconds, three decimals below 1 ms and two above."""
    if ms is None:
        return DASH
    return f"{ms:.3f}" if ms < 1 else f"{ms:.2f}"


def _int_text(n: int | None) -> str:
    return DASH if n is None else f"{int(n):,}"


# ----------------------------------------------------------------------------- reading


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """Parse ``run_dir/metrics.jsonl`` into one dict per finished stage, baseline first.

    Raises :class:`RunDirError` when the directory or the file is missing and
    :class:`CheckpointError` (naming file and line) when a line is not a JSON object
    with at least ``stage``, ``accuracy`` and ``size_bytes``.
    """
    run_dir = Path(run_dir)
    path = run_dir / METRICS_FILE
    if not run_dir.is_dir():
        raise RunDirError(f"run directory {run_dir} does not exist: run `edgeslim compress` first")
    if not path.is_file():
        raise RunDirError(f"no {METRICS_FILE} in {run_dir}: run `edgeslim compress` first")
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            rows.append(_parse_line(path, lineno, line))
    if not rows:
        raise CheckpointError(
            f"{path} is empty: re-run `edgeslim compress` into {run_dir} to rebuild it"
        )
    return rows


def _parse_line(path: Path, lineno: int, line: str) -> dict[str, Any]:
    """One metrics row, validated; errors name the file and the 1-based line number."""
    where = f"{path}, line {lineno}"
    fix = "re-run `edgeslim compress` into the same directory to rebuild it"
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{where}: not valid JSON ({exc.msg}); {fix}") from exc
    if not isinstance(row, dict):
        raise CheckpointError(f"{where}: expected a JSON object, got {type(row).__name__}; {fix}")
    missing = [key for key in REQUIRED_KEYS if key not in row]
    if missing:
        raise CheckpointError(f"{where}: missing key(s) {', '.join(missing)}; {fix}")
    return row


# ----------------------------------------------------------------------------- tables


def stage_name(row: dict[str, Any]) -> str:
    """The display name of a stage row (``name``, else ``stage``)."""
    return str(row.get("name") or row["stage"])


def stage_rows(rows: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Display rows (strings keyed like :data:`COLUMNS`), ratios relative to ``rows[0]``.

    ``ratio`` is baseline params / nonzero params, ``size_ratio`` baseline bytes / bytes and
    ``delta`` the accuracy change in percentage points; missing values render as ``–``.
    """
    if not rows:
        return []
    base = rows[0]
    base_params = base.get("params")
    return [
        {
            "stage": stage_name(row),
            "accuracy": metric_text(row),
            "delta": metric_delta(row, base),
            "nonzero_params": _int_text(row.get("nonzero_params")),
            "ratio": ratio_text(base_params, row.get("nonzero_params")),
            "size": human_bytes(row["size_bytes"]),
            "size_ratio": ratio_text(base["size_bytes"], row["size_bytes"]),
            "format": str(row.get("format") or DASH),
            "macs": human_count(row.get("macs")),
            "effective_macs": human_count(row.get("effective_macs")),
            "latency": latency_text(row.get("latency_ms")),
        }
        for row in rows
    ]


def layer_rows(row: dict[str, Any]) -> list[dict[str, str]]:
    """Per-layer display rows (layer, type, params, nonzero, kept) of one stage row."""
    out = []
    for name, layer in (row.get("layers") or {}).items():
        params, nonzero = layer.get("params"), layer.get("nonzero_params")
        kept = nonzero / params if params and nonzero is not None else None
        out.append(
            {
                "layer": str(name),
                "type": str(layer.get("type") or DASH),
                "params": _int_text(params),
                "nonzero": _int_text(nonzero),
                "kept": percent(kept, digits=1),
            }
        )
    return out


def summary_line(rows: list[dict[str, Any]]) -> str:
    """One line comparing the final stage with the baseline.

    e.g. ``final: 12.4x fewer nonzero weights, 14.1x smaller file, accuracy 97.9% (Δ −0.1 pt)``
    """
    base, final = rows[0], rows[-1]
    fewer = ratio_text(base.get("params"), final.get("nonzero_params"))
    smaller = ratio_text(base["size_bytes"], final["size_bytes"])
    delta = metric_delta(final, base, digits=1)
    unit = " pt" if metric_unit(final) == "%" else ""
    return (
        f"final: {fewer} fewer nonzero weights, {smaller} smaller file, "
        f"{metric_title(final)} {metric_text(final, digits=1)} (Δ {delta}{unit})"
    )


def metric_header(row: dict[str, Any], terminal: bool = False) -> str:
    """The header of the quality column: ``accuracy`` (``top-5 accuracy``, ``MSE`` ...)."""
    title = metric_title(row)
    if not terminal:
        return title
    return f"{title}\nΔ pts" if metric_unit(row) == "%" else f"{title}\nΔ"


# (header, key of the main value, key shown under it) of the terminal table: pairs of
# columns share a cell so that the table fits an 80-column terminal
_TERMINAL_COLUMNS = [
    ("stage", "stage", None),
    ("accuracy\nΔ pts", "accuracy", "delta"),
    ("nonzero\nfewer", "nonzero_params", "ratio"),
    ("size\nsmaller", "size", "size_ratio"),
    ("format", "format", None),
    ("MACs\neff.", "macs", "effective_macs"),
    ("latency\nms", "latency", None),
]


def stage_table(rows: list[dict[str, Any]], title: str | None = None) -> Table:
    """A rich table of the run, one row per stage; ``rows`` as from :func:`read_metrics`.

    Sized for a terminal: related values share a cell (accuracy over its change, nonzero
    params over the ratio, size over its ratio, MACs over effective MACs).
    """
    from rich import box
    from rich.table import Table

    table = Table(title=title, box=box.SIMPLE_HEAD)
    for header, key, _ in _TERMINAL_COLUMNS:
        if key == "accuracy" and rows:
            header = metric_header(rows[0], terminal=True)
        left = key in ("stage", "format")
        table.add_column(
            header, justify="left" if left else "right", min_width=12 if key == "stage" else None
        )
    for row in stage_rows(rows):
        cells = [
            row[key] + (f"\n{row[under]}" if under else "") for _, key, under in _TERMINAL_COLUMNS
        ]
        table.add_row(*cells, end_section=True)
    return table
