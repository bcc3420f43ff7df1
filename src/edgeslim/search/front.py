"""The Pareto front of finished trials (accuracy up, the budget's metric down), and the
one-line summary of the best feasible trial that the progress bar shows."""

from __future__ import annotations

from typing import Any


def pareto(records: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """The feasible records no other feasible record beats on both accuracy and ``metric``."""
    pts = [r for r in records if r["feasible"] and r["accuracy"] is not None]
    front = []
    for r in pts:
        a, c = r["accuracy"], r["cost"][metric]
        beaten = any(
            (o["accuracy"] >= a and o["cost"][metric] <= c)
            and (o["accuracy"] > a or o["cost"][metric] < c)
            for o in pts
        )
        if not beaten:
            front.append(r)
    return sorted(front, key=lambda r: r["cost"][metric])


def best_line(done: dict[int, dict[str, Any]]) -> str:
    ok = [r for r in done.values() if r["feasible"] and r["accuracy"] is not None]
    if not ok:
        return "best: -"
    b = max(ok, key=lambda r: (r["accuracy"], -r["objective"]))
    return f"best: acc {b['accuracy']:.3f} @ {b['objective']:.4g}"
