"""How good the latency prediction is, measured: on held-out random configurations, the
share of whole-model predictions within +-10% of the measured latency (nn-Meter's figure of
merit) and the Spearman rank correlation between predicted and measured."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (average ranks for ties); nan for fewer than 2 points."""
    if len(a) < 2:
        return float("nan")

    def ranks(v: list[float]) -> np.ndarray:
        x = np.asarray(v, dtype=float)
        order = x.argsort(kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x))
        for value in np.unique(x):  # ties share their mean rank
            tied = x == value
            r[tied] = r[tied].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


@dataclass
class PredictorReport:
    """Predicted vs measured latency on held-out configurations."""

    target: str
    rows: list[tuple[float, float]] = field(default_factory=list)  # (predicted, measured) ms

    @property
    def within_10(self) -> float:
        """Share of predictions within +-10% of the measurement."""
        if not self.rows:
            return float("nan")
        return sum(abs(p - m) <= 0.1 * m for p, m in self.rows) / len(self.rows)

    @property
    def rank_correlation(self) -> float:
        return spearman([p for p, _ in self.rows], [m for _, m in self.rows])

    @property
    def mean_abs_error(self) -> float:
        return float(np.mean([abs(p - m) / m for p, m in self.rows])) if self.rows else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "n": len(self.rows),
            "within_10": self.within_10,
            "spearman": self.rank_correlation,
            "mean_abs_error": self.mean_abs_error,
        }


def evaluate_predictor(
    target: Any,
    space: Any,
    model: nn.Module,
    example: torch.Tensor,
    *,
    n: int = 20,
    seed: int = 12345,
    calib: torch.Tensor | None = None,
) -> PredictorReport:
    """Predict and measure ``n`` random candidates of ``space`` (a bound space) on ``target``
    (calibrated); the seed differs from any search's, so the configurations are held out.
    ``calib``: quantize the candidates (a space with bits knobs) on these inputs."""
    from edgeslim.search.apply import build

    rng = random.Random(seed)
    report = PredictorReport(target.name)
    for _ in range(n):
        candidate = build(model, space.sample(rng), example, calib, for_latency=True)
        predicted = target.predict(candidate, example)["latency_ms"]
        measured = target.measure(candidate, example)["latency_ms"]
        report.rows.append((predicted, measured))
    return report
