"""Exit thresholds picked on validation data, for an accuracy target or a compute budget.

BranchyNet (Teerapittayanon et al., ICPR 2016, sec. III) sets each exit's entropy threshold
by hand from a sweep; here the sweep and the choice are automatic. With every exit's logits
on the validation split computed once, any set of thresholds is evaluated exactly and
cheaply: each sample leaves at the first exit whose confidence reaches its threshold, and
its cost is the MACs of the segments (and the heads that ran) up to there.

- ``max_loss``: the lowest average MACs whose validation accuracy is at most ``max_loss``
  below the static network's (the final exit's);
- ``budget``: the best validation accuracy with average MACs at most ``budget`` x static.

Search: one threshold shared by all exits, swept over the confidences' quantiles (that sweep
is also the accuracy-compute curve that gets plotted), then per-exit coordinate descent
from the best shared point.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field, model_validator

from edgeslim.core.data.datasets import DataSplits
from edgeslim.core.errors import ConfigError
from edgeslim.core.options import Options
from edgeslim.dynamic.exits import ExitModel, batched_exits, confidence, exit_costs

__all__ = ["ExitCalibration", "calibrate_exits", "evaluate_thresholds", "set_thresholds"]


class ExitCalibration(Options):
    """Give exactly one target: ``max_loss`` (accuracy, as a fraction: 0.003 = 0.3 points)
    or ``budget`` (average MACs as a fraction of the static network's)."""

    max_loss: float | None = Field(None, ge=0, lt=1)
    budget: float | None = Field(None, gt=0, le=1)
    grid: int = Field(64, ge=2, le=1000, description="candidate thresholds per exit")
    passes: int = Field(3, ge=0, le=20, description="coordinate-descent passes")

    @model_validator(mode="after")
    def _one_target(self) -> ExitCalibration:
        if (self.max_loss is None) == (self.budget is None):
            raise ValueError("give exactly one of max_loss or budget")
        return self


def set_thresholds(model: ExitModel, thresholds: list[float | None]) -> None:
    """Set the thresholds in the criterion's own units (None: never exit there).

    maxprob: exit when the largest softmax probability >= t, t in [0, 1];
    entropy: exit when the entropy (nats) <= t, t >= 0.
    """
    if len(thresholds) != len(model.heads):
        raise ConfigError(
            f"set_thresholds: {len(thresholds)} thresholds for {len(model.heads)} early exits"
        )
    scores = []
    for k, t in enumerate(thresholds):
        if t is None:
            scores.append(math.inf)
            continue
        if not isinstance(t, (int, float)) or math.isnan(t):
            raise ConfigError(f"set_thresholds: threshold {k} must be a number, got {t!r}")
        if model.criterion == "maxprob":
            if not 0 <= t <= 1:
                raise ConfigError(
                    f"set_thresholds: maxprob threshold {k} must be in [0, 1], got {t}"
                )
            scores.append(float(t))
        else:
            if t < 0:
                raise ConfigError(f"set_thresholds: entropy threshold {k} must be >= 0, got {t}")
            scores.append(-float(t))
    model.thresholds.copy_(torch.tensor(scores))


def get_thresholds(model: ExitModel) -> list[float | None]:
    """The thresholds in the criterion's units (None: exit disabled)."""
    out: list[float | None] = []
    for s in model.thresholds.tolist():
        out.append(None if s == math.inf else (s if model.criterion == "maxprob" else -s))
    return out


def evaluate_thresholds(
    scores: torch.Tensor,
    correct: torch.Tensor,
    seg: list[int],
    head: list[int],
    thresholds: torch.Tensor,
) -> tuple[float, float, list[float]]:
    """``(accuracy, average MACs, share leaving at each exit)`` for score thresholds.

    ``scores`` (early exits, N), ``correct`` (exits, N) bools, ``seg``/``head`` MACs.
    """
    n_early, n = scores.shape
    exit_at = torch.full((n,), n_early, dtype=torch.long)
    left = torch.ones(n, dtype=torch.bool)
    for k in range(n_early):
        done = left & (scores[k] >= thresholds[k])
        exit_at[done] = k
        left &= ~done
    cost_at = []
    total = 0
    for k in range(n_early + 1):
        total += seg[k]
        if k < n_early and thresholds[k] != math.inf:
            total += head[k]
        cost_at.append(total)
    cost = torch.tensor(cost_at, dtype=torch.float64)[exit_at].mean()
    acc = correct[exit_at, torch.arange(n)].float().mean()
    shares = torch.bincount(exit_at, minlength=n_early + 1).double() / n
    return float(acc), float(cost), shares.tolist()


def calibrate_exits(
    model: ExitModel,
    data: DataSplits,
    cfg: ExitCalibration,
    *,
    split: str = "val",
) -> dict:
    """Set ``model``'s thresholds for ``cfg``'s target on ``data``'s ``split``; returns a log.

    The log has the chosen thresholds, validation accuracy, average MACs, exit shares, the
    static accuracy and MACs, and ``curve``: the shared-threshold sweep (one row per point).
    """
    part = getattr(data, split)
    outs = batched_exits(model, part.x)  # (exits, N, classes)
    correct = outs.argmax(-1) == part.y  # (exits, N)
    scores = torch.stack([confidence(o, model.criterion) for o in outs[:-1]])  # (early, N)
    costs = exit_costs(model, part.x)
    seg, head = costs["segments"], costs["heads"]
    static_macs = float(sum(seg))
    static_acc = float(correct[-1].float().mean())
    n_early = len(model.heads)
    qs = torch.linspace(0, 1, cfg.grid, dtype=torch.float64)
    flat = scores.flatten().double()
    shared = sorted(set(torch.quantile(flat, qs).tolist()))
    per_exit = [
        sorted(set(torch.quantile(scores[k].double(), qs).tolist())) for k in range(n_early)
    ]

    def ev(th: list[float]) -> tuple[float, float, list[float]]:
        return evaluate_thresholds(
            scores, correct, seg, head, torch.tensor(th, dtype=torch.float64)
        )

    curve = []
    for t in [*shared, math.inf]:
        acc, macs, shares = ev([t] * n_early)
        curve.append({"threshold": t, "accuracy": acc, "macs": macs, "shares": shares})

    if cfg.max_loss is not None:
        floor = static_acc - cfg.max_loss - 1e-9

        def better(a: tuple, b: tuple) -> bool:  # feasible, then fewer MACs, then accuracy
            return (a[0] >= floor, -a[1], a[0]) > (b[0] >= floor, -b[1], b[0])
    else:
        cap = cfg.budget * static_macs + 1e-6

        def better(a: tuple, b: tuple) -> bool:  # feasible, then accuracy, then fewer MACs
            return (a[1] <= cap, a[0], -a[1]) > (b[1] <= cap, b[0], -b[1])

    best_th = [math.inf] * n_early
    best = ev(best_th)
    for row in curve:
        cand = [row["threshold"]] * n_early
        res = ev(cand)
        if better(res, best):
            best, best_th = res, cand
    for _ in range(cfg.passes):
        changed = False
        for k in range(n_early):
            for t in [*per_exit[k], math.inf]:
                cand = list(best_th)
                cand[k] = t
                res = ev(cand)
                if better(res, best):
                    best, best_th, changed = res, cand, True
        if not changed:
            break
    feasible = best[0] >= floor if cfg.max_loss is not None else best[1] <= cap
    if not feasible:
        lowest = min(r["macs"] for r in curve)
        raise ConfigError(
            f"ExitCalibration.budget={cfg.budget}: no thresholds reach it on {split}; the "
            f"cheapest setting costs {lowest / static_macs:.3f} of the static MACs"
        )
    model.thresholds.copy_(torch.tensor(best_th, dtype=model.thresholds.dtype))
    return {
        "thresholds": get_thresholds(model),
        "criterion": model.criterion,
        "accuracy": best[0],
        "macs": best[1],
        "shares": best[2],
        "static_accuracy": static_acc,
        "static_macs": static_macs,
        "segment_macs": seg,
        "head_macs": head,
        "curve": curve,
        "split": split,
    }
