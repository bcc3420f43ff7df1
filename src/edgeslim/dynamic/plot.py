"""The accuracy-compute curve of a dynamic model (a threshold sweep), as a PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgeslim.core.plotting import new_figure, save_png


def tradeoff(
    points: list[dict[str, float]],
    static: dict[str, float],
    chosen: dict[str, float] | None = None,
    *,
    x_label: str = "average MACs per input",
) -> dict[str, Any]:
    """A log entry for :func:`plot_tradeoffs`: ``points`` and ``static``/``chosen`` are
    ``{"macs": ..., "accuracy": ...}`` (accuracy in [0, 1])."""
    keep = [{"macs": float(p["macs"]), "accuracy": float(p["accuracy"])} for p in points]
    out: dict[str, Any] = {"x_label": x_label, "points": keep, "static": dict(static)}
    if chosen is not None:
        out["chosen"] = {"macs": float(chosen["macs"]), "accuracy": float(chosen["accuracy"])}
    return out


def plot_tradeoffs(curves: dict[str, dict[str, Any]], path: str | Path, title: str) -> Path:
    """One line per curve (name -> :func:`tradeoff` entry): accuracy (%) against MACs."""
    fig = new_figure(7.0, 4.5)
    ax = fig.add_subplot()
    for i, (name, c) in enumerate(curves.items()):
        color = f"C{i % 10}"
        pts = sorted(c["points"], key=lambda p: p["macs"])
        ax.plot(
            [p["macs"] for p in pts], [100 * p["accuracy"] for p in pts], "-", color=color,
            label=name, alpha=0.8,
        )  # fmt: skip
        s = c["static"]
        ax.scatter([s["macs"]], [100 * s["accuracy"]], marker="s", color=color, zorder=3)
        if c.get("chosen"):
            ch = c["chosen"]
            ax.scatter([ch["macs"]], [100 * ch["accuracy"]], marker="*", s=120, color=color,
                       zorder=4)  # fmt: skip
    ax.set_xlabel(next(iter(curves.values()))["x_label"] if curves else "MACs")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{title}  (square: static, star: chosen)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return save_png(fig, Path(path))
