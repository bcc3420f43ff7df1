"""Exit thresholds picked on validation data, for an accuracy target or a compute budget.

BranchyNet (Teerapittayanon et al., ICPR 2016, sec. III) sets each exit's entropy threshold
by hand from a sweep; here the sweep and the choice are automatic. With every exit's logits
on the validation split computed once, any set of thresholds is evaluated exactly and
cheaply: each sample leaves at the first exit whose confidence reaches its threshold, and
its cost is the MACs of the segments (and the heads that ran) up to there.

- ``max_loss``: the lowest average MACs whose validation accuracy is at most ``max_loss``
  below a reference: the final exit's validation accuracy, or ``reference_accuracy`` when
  given (the static network's, measured on the same split before the exits were added:
  joint training often makes the final exit better than the static network, and "at most
  0.3 points loss" means against the network the exits replace);
- ``min_accuracy``: the lowest average MACs with validation accuracy at least this;
- ``budget``: the best validation accuracy with average MACs at most ``budget`` x static.

``margin`` (accuracy targets; default 1): the thresholds chosen as the cheapest that just
meet a target on a few hundred validation samples are, by that very choice, the ones whose
errors the split happened to under-count, so the point estimate overshoots on new data. The
accuracy a setting must show is therefore reduced by a bound on what the early exits may
spoil: of the ``m`` samples that leave early, those the final exit gets right and the early
exit wrong; the one-sided Wilson score upper bound on their rate at ``margin`` standard
deviates (Wilson, JASA 1927), less the observed rate, times ``m / N`` (:func:`harm_margin`).
It is paired per sample (only answers the exits change count, far tighter than comparing two
accuracies each measured on ``N`` samples) and stays above 0 when no sample was spoilt
(``z**2 / (m + z**2)`` of the early share), while the final exit alone carries no margin, so
a target the final exit reaches stays reachable. ``margin=0``: the point estimate.

``costs`` replaces the MACs by measured per-sample costs of each segment and head (e.g.
microseconds from :func:`edgeslim.dynamic.measure_exit_costs`), so the thresholds minimise
the expected latency instead; ``budget`` is then a fraction of the static cost.

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

__all__ = [
    "ExitCalibration",
    "ExitCosts",
    "calibrate_exits",
    "choose_thresholds",
    "evaluate_thresholds",
    "harm_margin",
    "measure_exit_costs",
    "set_thresholds",
]


class ExitCosts(Options):
    """Per-sample cost of each segment and each early-exit head, in any one unit."""

    segments: list[float] = Field(..., min_length=2, description="one per segment")
    heads: list[float] = Field(..., min_length=1, description="one per early exit")

    @model_validator(mode="after")
    def _valid(self) -> ExitCosts:
        if len(self.segments) != len(self.heads) + 1:
            raise ValueError(
                f"{len(self.segments)} segment costs need {len(self.segments) - 1} head "
                f"costs, got {len(self.heads)}"
            )
        for where, values in (("segments", self.segments), ("heads", self.heads)):
            for v in values:
                if not math.isfinite(v) or v < 0:
                    raise ValueError(f"{where}: costs must be finite and >= 0, got {v}")
        if sum(self.segments) <= 0:
            raise ValueError("the segments' costs must not all be 0")
        return self


class ExitCalibration(Options):
    """Give exactly one target: ``max_loss`` (accuracy, as a fraction: 0.003 = 0.3 points,
    below the final exit's validation accuracy or ``reference_accuracy``), ``min_accuracy``,
    or ``budget`` (average cost as a fraction of the static network's)."""

    max_loss: float | None = Field(None, ge=0, lt=1)
    reference_accuracy: float | None = Field(
        None,
        ge=0,
        le=1,
        description="max_loss is below this (e.g. the static net's validation accuracy) "
        "instead of the final exit's",
    )
    min_accuracy: float | None = Field(None, ge=0, le=1)
    budget: float | None = Field(None, gt=0, le=1)
    margin: float = Field(
        1.0,
        ge=0,
        le=10,
        description="with max_loss / min_accuracy: the accuracy must reach the target even "
        "after subtracting this many standard errors of the exits' loss against the final "
        "exit (paired per sample on the split); 0: the point estimate",
    )
    costs: ExitCosts | None = Field(
        None, description="measured per-sample costs to minimise instead of MACs"
    )
    grid: int = Field(64, ge=2, le=1000, description="candidate thresholds per exit")
    passes: int = Field(3, ge=0, le=20, description="coordinate-descent passes")

    @model_validator(mode="after")
    def _one_target(self) -> ExitCalibration:
        targets = [self.max_loss, self.min_accuracy, self.budget]
        if sum(t is not None for t in targets) != 1:
            raise ValueError("give exactly one of max_loss, min_accuracy or budget")
        if self.budget is not None and self.margin and "margin" in self.model_fields_set:
            raise ValueError("margin goes with max_loss or min_accuracy, not with budget")
        if self.reference_accuracy is not None and self.max_loss is None:
            raise ValueError("reference_accuracy goes with max_loss (the loss is below it)")
        if self.reference_accuracy is not None and self.max_loss > self.reference_accuracy:
            raise ValueError(
                f"max_loss {self.max_loss} is above reference_accuracy "
                f"{self.reference_accuracy}: the target would be below 0"
            )
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


def exits_taken(scores: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """(N,) the exit each sample leaves at (``len(scores)``: the final exit)."""
    n_early, n = scores.shape
    exit_at = torch.full((n,), n_early, dtype=torch.long)
    left = torch.ones(n, dtype=torch.bool)
    for k in range(n_early):
        done = left & (scores[k] >= thresholds[k])
        exit_at[done] = k
        left &= ~done
    return exit_at


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
    exit_at = exits_taken(scores, thresholds)
    cost_at = []
    total = 0
    for k in range(n_early + 1):
        total += seg[k]
        if k < n_early and thresholds[k] != math.inf:
            total += head[k]
        cost_at.append(total)
    cost = torch.tensor(cost_at, dtype=torch.float64)[exit_at].mean()
    acc = correct[exit_at, torch.arange(n)].double().mean()
    shares = torch.bincount(exit_at, minlength=n_early + 1).double() / n
    return float(acc), float(cost), shares.tolist()


def harm_margin(correct: torch.Tensor, exit_at: torch.Tensor, z: float) -> float:
    """How far the share of answers the early exits spoil may be above its estimate.

    ``correct``: (exits, N) bools; ``exit_at``: (N,) the exit each sample leaves at. A
    sample is spoilt when the final exit is right on it and the early exit it left at is
    wrong; only such samples make the exits less accurate than the final exit, so the loss
    against the final exit is at most their share. Of the ``m`` samples that leave early,
    ``h`` are spoilt: returns ``m / N`` times (the one-sided Wilson score upper bound on the
    spoilt rate ``h / m`` at ``z`` standard normal deviates, minus ``h / m``). Unlike ``z``
    standard errors it stays above 0 when no sample was spoilt (``z**2 / (m + z**2)`` of
    the early share then), which is where thresholds that just meet a small loss target
    are; it is 0 when no sample leaves early (nothing can be spoilt).
    """
    n = correct.shape[1]
    early = exit_at < correct.shape[0] - 1
    m = int(early.sum())
    if z == 0 or m == 0:
        return 0.0
    taken = correct[exit_at, torch.arange(n)]
    rate = int((early & correct[-1] & ~taken).sum()) / m
    z2 = z * z
    centre = rate + z2 / (2 * m)
    spread = z * math.sqrt(rate * (1 - rate) / m + z2 / (4 * m * m))
    return m / n * ((centre + spread) / (1 + z2 / m) - rate)


def choose_thresholds(
    scores: torch.Tensor,
    correct: torch.Tensor,
    macs: tuple[list[int], list[int]],
    cfg: ExitCalibration,
    *,
    where: str = "val",
) -> dict:
    """The score thresholds for ``cfg``'s target, from every exit's results on a split.

    ``scores``: (early exits, N) confidences (higher: surer); ``correct``: (exits, N) bools;
    ``macs``: (segment MACs, head MACs) per sample. Returns ``thresholds`` (scores; ``inf``:
    exit off), ``accuracy``, ``macs``, ``cost`` (``cfg.costs``' unit, else MACs),
    ``shares``, the static ``static_accuracy`` / ``static_macs`` / ``static_cost``, the
    ``target`` accuracy (``max_loss`` / ``min_accuracy``) and ``curve`` (the shared sweep).
    """
    seg, head = macs
    n_early = scores.shape[0]
    if cfg.costs is not None:
        if len(cfg.costs.heads) != n_early:
            raise ConfigError(
                f"ExitCalibration.costs: {len(cfg.costs.heads)} head costs for a model with "
                f"{n_early} early exits"
            )
        cseg, chead = cfg.costs.segments, cfg.costs.heads
    else:
        cseg, chead = seg, head
    static_macs = float(sum(seg))
    static_cost = float(sum(cseg))
    static_acc = float(correct[-1].double().mean())
    qs = torch.linspace(0, 1, cfg.grid, dtype=torch.float64)
    flat = scores.flatten().double()
    shared = sorted(set(torch.quantile(flat, qs).tolist()))
    per_exit = [
        sorted(set(torch.quantile(scores[k].double(), qs).tolist())) for k in range(n_early)
    ]

    def ev(th: list[float], s: list = cseg, h: list = chead) -> tuple[float, float, list[float]]:
        """(accuracy less the harm margin, cost, shares) of thresholds ``th``."""
        t = torch.tensor(th, dtype=torch.float64)
        acc, cost, shares = evaluate_thresholds(scores, correct, s, h, t)
        if cfg.margin and cfg.budget is None:
            acc -= harm_margin(correct, exits_taken(scores, t), cfg.margin)
        return acc, cost, shares

    curve = []
    for t in [*shared, math.inf]:
        th = torch.full((n_early,), t, dtype=torch.float64)
        acc, m, shares = evaluate_thresholds(scores, correct, seg, head, th)
        curve.append({"threshold": t, "accuracy": acc, "macs": m, "shares": shares})

    target = None
    if cfg.budget is None:
        if cfg.min_accuracy is not None:
            target = cfg.min_accuracy
        else:
            ref = static_acc if cfg.reference_accuracy is None else cfg.reference_accuracy
            target = ref - cfg.max_loss
        floor = target - 1e-9

        def key(r: tuple) -> tuple:  # feasible and cheaper; infeasible: closer to it
            ok = r[0] >= floor
            return (ok, -r[1], r[0]) if ok else (ok, r[0], -r[1])
    else:
        cap = cfg.budget * static_cost * (1 + 1e-9) + 1e-6

        def key(r: tuple) -> tuple:  # within budget and more accurate; else: cheaper
            ok = r[1] <= cap
            return (ok, r[0], -r[1]) if ok else (ok, -r[1], r[0])

    def better(a: tuple, b: tuple) -> bool:
        return key(a) > key(b)

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
    if cfg.budget is not None and best[1] > cap:
        lowest = min(ev([r["threshold"]] * n_early)[1] for r in curve)
        raise ConfigError(
            f"ExitCalibration.budget={cfg.budget}: no thresholds reach it on {where}; the "
            f"cheapest setting costs {lowest / static_cost:.3f} of the static network's"
        )
    if target is not None and best[0] < floor:
        reach = max(r["accuracy"] for r in curve)  # the last row: every exit off
        name = "min_accuracy" if cfg.min_accuracy is not None else "max_loss"
        raise ConfigError(
            f"ExitCalibration.{name}: the target accuracy {target:.4f} is out of reach on "
            f"{where}; the best the exits reach is {reach:.4f} (final exit {static_acc:.4f})"
        )
    best_t = torch.tensor(best_th, dtype=torch.float64)
    acc, _, _ = evaluate_thresholds(scores, correct, seg, head, best_t)
    return {
        "thresholds": best_th,
        "accuracy": acc,
        "accuracy_bound": best[0] if target is not None else acc,
        "margin": acc - best[0] if target is not None else 0.0,
        "macs": ev(best_th, seg, head)[1],
        "cost": best[1],
        "shares": best[2],
        "static_accuracy": static_acc,
        "static_macs": static_macs,
        "static_cost": static_cost,
        "target": target,
        "curve": curve,
    }


def calibrate_exits(
    model: ExitModel,
    data: DataSplits,
    cfg: ExitCalibration,
    *,
    split: str = "val",
) -> dict:
    """Set ``model``'s thresholds for ``cfg``'s target on ``data``'s ``split``; returns a log.

    The log has the chosen thresholds (criterion units), validation accuracy, average MACs
    (and ``cost``, in ``cfg.costs``' unit), exit shares, the final exit's accuracy
    (``static_accuracy``), the static MACs, the ``target`` accuracy, and ``curve``: the
    shared-threshold sweep (one row per point).
    """
    part = getattr(data, split)
    outs = batched_exits(model, part.x)  # (exits, N, classes)
    correct = outs.argmax(-1) == part.y  # (exits, N)
    scores = torch.stack([confidence(o, model.criterion) for o in outs[:-1]])  # (early, N)
    costs = exit_costs(model, part.x)
    seg, head = costs["segments"], costs["heads"]
    log = choose_thresholds(scores, correct, (seg, head), cfg, where=split)
    model.thresholds.copy_(torch.tensor(log["thresholds"], dtype=model.thresholds.dtype))
    log["thresholds"] = get_thresholds(model)
    return {
        **log,
        "criterion": model.criterion,
        "segment_macs": seg,
        "head_macs": head,
        "split": split,
    }


def measure_exit_costs(
    model: ExitModel,
    x: torch.Tensor,
    *,
    samples: int = 200,
    repeats: int = 3,
    warmup: int = 10,
) -> ExitCosts:
    """Measured batch-1 microseconds of each segment and each head (with its exit test).

    Runs every stage, in order, on single samples of ``x`` (the first ``samples``), as the
    model's batch-1 path does (same thread setting as the caller's); per stage the median
    over the samples, then the median over ``repeats`` passes. Pass the result as
    ``ExitCalibration(costs=...)`` to minimise the expected PyTorch latency instead of MACs:
    a head's share of the time is often far above its share of the MACs (its weights are
    read from memory on every call).
    """
    import statistics
    import time

    if x.shape[0] < 1 or samples < 1 or repeats < 1:
        raise ConfigError("measure_exit_costs: needs at least one sample, samples and repeats")
    n_early = len(model.heads)
    xs = x[:samples]
    was_training = model.training
    model.eval()
    passes: list[list[float]] = []
    try:
        with torch.inference_mode():
            for p in range(repeats + 1):  # pass 0: warm-up, not kept
                times: list[list[float]] = [[] for _ in range(2 * n_early + 1)]
                rows = xs[:warmup] if p == 0 else xs
                for i in range(len(rows)):
                    h = rows[i : i + 1]
                    for k, segment in enumerate(model.segments):
                        start = time.perf_counter()
                        h = segment(h)
                        times[2 * k].append(time.perf_counter() - start)
                        if k < n_early:
                            start = time.perf_counter()
                            confidence(model.heads[k](h), model.criterion).max().item()
                            times[2 * k + 1].append(time.perf_counter() - start)
                if p:
                    passes.append([1e6 * statistics.median(t) for t in times])
    finally:
        model.train(was_training)
    med = [statistics.median(col) for col in zip(*passes, strict=True)]
    return ExitCosts(segments=med[0::2], heads=med[1::2])
