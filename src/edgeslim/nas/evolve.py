"""Evolutionary search for the most accurate sub-network within the device's budget.

The search of Once-for-All and MCUNet (Real et al. 2019, "Regularized Evolution for Image
Classifier Architecture Search", https://arxiv.org/abs/1802.01548, as used by OFA: Cai et
al. 2020, https://arxiv.org/abs/1908.09791, and TinyNAS): a population of sub-networks
that fit the budget; each generation keeps the ``parents`` most accurate, and refills the
population with children made by **mutation** (each depth, expansion ratio and kernel
size re-drawn with probability ``mutation``) and **crossover** (each gene from one of two
parents). A child that does not fit the budget is discarded and drawn again.

- **Constraints, cheapest first** (:class:`edgeslim.nas.cost.SubnetCost`): the MACs bound,
  then the planned int8 graph (SRAM without / with patch-based execution, flash of the
  constants + measured code size, device-model latency); the finalists are confirmed by
  the real export (:mod:`edgeslim.nas.api`).
- **Accuracy** from the supernet's weights alone: the sub-network is extracted, its
  BatchNorm statistics are re-estimated on ``bn`` training images (the supernet's running
  statistics mix every sub-network) and it is scored on ``val`` validation images. These
  jobs run on the search package's executor (in process, a local pool, or Ray).
- **Persistence and resume**: every evaluated sub-network is a line of the run store's
  ``trials.jsonl`` (:class:`edgeslim.search.store.RunStore`); the evolution is a function
  of the seed and the results, so a rerun replays it and evaluates only what is missing.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from edgeslim.nas.extract import extract, recalibrate_bn
from edgeslim.nas.supernet import SubnetConfig, Supernet, SupernetSpec, resize
from edgeslim.search.budget import Budget

__all__ = [
    "Evolution",
    "estimate_se",
    "evaluate_accuracy",
    "evolve",
    "rank_finalists",
    "spread_over_cells",
]

CostFn = Callable[[SubnetConfig], dict[str, Any]]


@dataclass
class Evolution:
    """What :func:`evolve` found: every evaluated record, in evaluation order."""

    records: list[dict[str, Any]] = field(default_factory=list)
    generations: int = 0

    def feasible(self) -> list[dict[str, Any]]:
        return [r for r in self.records if r["feasible"] and r["accuracy"] is not None]

    def best(self) -> dict[str, Any] | None:
        """The most accurate feasible record (an exact tie: the most MACs, as
        :func:`rank_finalists`)."""
        ok = self.feasible()
        return (
            max(ok, key=lambda r: (r["accuracy"], r["cost"]["macs"], -r["number"])) if ok else None
        )


def estimate_se(accuracy: float, n: int) -> float:
    """One binomial standard error of an accuracy measured on ``n`` images (the noise of the
    supernet's estimate, which scores each sub-network on the same ``n`` validation images)."""
    return (accuracy * (1 - accuracy) / max(1, n)) ** 0.5


def rank_finalists(records: Sequence[dict[str, Any]], tolerance: float) -> list[dict[str, Any]]:
    """The feasible, scored ``records`` in the order the finalists are taken from.

    First those whose estimated accuracy is within ``tolerance`` of the best estimate (a
    tie, given the estimate's noise), **the most MACs first**: TinyNAS's heuristic that
    more computation within the budget tends to mean more accuracy, so a tie goes to the
    sub-network that uses more of the budget; then the others, most accurate first (fewer
    MACs on equal estimates). ``tolerance`` 0: by the estimate alone (exact ties to the most
    MACs). Infeasible or unscored records are left out.
    """
    if tolerance < 0:
        from edgeslim.core.errors import ConfigError

        raise ConfigError(f"rank_finalists: tolerance must be >= 0, got {tolerance}")
    ok = [r for r in records if r["feasible"] and r["accuracy"] is not None]
    if not ok:
        return []
    best = max(r["accuracy"] for r in ok)
    tied = [r for r in ok if r["accuracy"] >= best - tolerance]
    rest = [r for r in ok if r["accuracy"] < best - tolerance]
    tied.sort(key=lambda r: (-r["cost"]["macs"], -r["accuracy"], r["number"]))
    rest.sort(key=lambda r: (-r["accuracy"], r["cost"]["macs"], r["number"]))
    return tied + rest


def spread_over_cells(ranked: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """``ranked`` (:func:`rank_finalists`' order) with the first of each (width, resolution)
    cell moved to the front, in their order, then the rest in theirs.

    For finalists that are fine-tuned and compared on validation data: the supernet's
    estimate is biased *between* cells (on the NAS benchmark it ranked resolution 24 above
    28 by a point, and after fine-tuning 28 led by a point), so the contenders should not
    all come from one cell.
    """
    firsts, rest, seen = [], [], set()
    for r in ranked:
        cell = (r["candidate"]["width"], r["candidate"]["resolution"])
        (rest if cell in seen else firsts).append(r)
        seen.add(cell)
    return firsts + rest


# ----------------------------------------------------------------------------- accuracy job

_SUPERNETS: dict[int, Supernet] = {}


def _supernet(state: dict[str, Any]) -> Supernet:
    key = id(state)
    if key not in _SUPERNETS:
        _SUPERNETS.clear()
        net = Supernet(SupernetSpec.from_dict(state["spec"]))
        net.load_state_dict(state["weights"])
        _SUPERNETS[key] = net.eval()
    return _SUPERNETS[key]


@torch.no_grad()
def evaluate_accuracy(
    supernet: Supernet,
    cfg: SubnetConfig,
    bn_x: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
) -> float:
    """Top-1 accuracy of sub-network ``cfg`` with its BatchNorm re-calibrated on ``bn_x``
    (inputs at the data's resolution; resized here to the sub-network's)."""
    sub = extract(supernet, cfg)
    recalibrate_bn(sub, resize(bn_x, cfg.resolution))
    correct = 0
    for i in range(0, len(val_x), 500):
        out = sub(resize(val_x[i : i + 500], cfg.resolution))
        correct += int((out.argmax(1) == val_y[i : i + 500]).sum())
    return correct / max(1, len(val_x))


def accuracy_job(state: dict[str, Any], job: dict[str, Any]) -> dict[str, Any]:
    """An executor job: ``job["config"]``'s accuracy from the supernet in ``state``."""
    cfg = SubnetConfig.from_dict(job["config"])
    acc = evaluate_accuracy(_supernet(state), cfg, state["bn_x"], *state["val"])
    return {"number": job["number"], "accuracy": acc}


# ----------------------------------------------------------------------------- the search


def evolve(
    spec: SupernetSpec,
    cost_fn: CostFn,
    budget: Budget,
    state: dict[str, Any],
    *,
    width: float | None = None,
    resolution: int | None = None,
    cells: Sequence[tuple[float, int]] | None = None,
    population: int = 16,
    generations: int = 4,
    parents: int = 4,
    mutation: float = 0.2,
    crossover: float = 0.5,
    seed: int = 0,
    executor: Any = None,
    store: Any = None,
    progress: Any = None,
) -> Evolution:
    """Evolve sub-networks of ``spec`` at ``width`` and ``resolution`` within ``budget``,
    or, with ``cells`` (``(width, resolution)`` pairs), in all of those cells together.

    ``state`` is what the accuracy jobs need: ``spec`` and ``weights`` of the supernet,
    ``bn_x`` (BatchNorm calibration inputs) and ``val`` (inputs, labels). ``executor``: one
    of :func:`edgeslim.search.executor.make_executor` (default: in this process).
    ``store``: a :class:`~edgeslim.search.store.RunStore` (resume). ``progress(done,
    total, best)`` is called after each generation.
    """
    from edgeslim.core.errors import ConfigError
    from edgeslim.search.executor import InProcess

    if cells is None:
        if width is None or resolution is None:
            raise ConfigError("evolve: give width and resolution, or cells")
        cells = [(width, resolution)]
    cells = [(float(w), int(r)) for w, r in cells]
    if not cells:
        raise ConfigError("evolve: cells is empty")
    executor = executor or InProcess()
    rng = random.Random(seed)
    done: dict[str, dict[str, Any]] = {}
    if store is not None:
        done = {r["key"]: r for r in store.trials().values()}
    result = Evolution()
    seen: dict[str, dict[str, Any]] = {}

    def record_of(cfg: SubnetConfig) -> dict[str, Any]:
        key = cfg.key()
        if key in seen:
            return seen[key]
        if key in done:
            rec = done[key]
        else:
            cost = cost_fn(cfg)
            rec = {
                "number": len(seen),
                "key": key,
                "candidate": cfg.to_dict(),
                "cost": cost,
                "feasible": budget.feasible(cost),
                "constraints": budget.constraints(cost),
                "accuracy": None,
            }
        seen[key] = rec
        result.records.append(rec)
        return rec

    def evaluate(recs: list[dict[str, Any]]) -> None:
        todo = [r for r in recs if r["feasible"] and r["accuracy"] is None and r["key"] not in done]
        jobs = [{"number": r["number"], "config": r["candidate"]} for r in todo]
        for i, out in executor.map(accuracy_job, state, jobs):
            todo[i]["accuracy"] = out["accuracy"]
        for r in recs:
            if r["key"] not in done:
                done[r["key"]] = r
                if store is not None:
                    store.add_trial(r)

    def draw(make: Callable[[], SubnetConfig], n: int) -> list[dict[str, Any]]:
        """``n`` new feasible records from ``make`` (at most 30 n draws)."""
        out: list[dict[str, Any]] = []
        keys: set[str] = set()
        for _ in range(30 * n):
            if len(out) == n:
                break
            rec = record_of(spec.canonical(make()))
            if rec["feasible"] and rec["key"] not in keys:
                keys.add(rec["key"])
                out.append(rec)
        return out

    turn = iter(range(10**9))

    def first() -> SubnetConfig:  # the cells in turn
        w, r = cells[next(turn) % len(cells)]
        return spec.sample(rng, resolution=r, width=w)

    pop = draw(first, population)
    evaluate(list(seen.values()))
    total = generations
    for gen in range(generations):
        ranked = sorted(pop, key=lambda r: (-(r["accuracy"] or 0.0), r["number"]))
        top = ranked[:parents]
        if not top:
            break
        n_cross = round((population - len(top)) * crossover)
        n_mut = population - len(top) - n_cross

        def mutant(top: list[dict[str, Any]] = top) -> SubnetConfig:
            cfg = spec.mutate(SubnetConfig.from_dict(rng.choice(top)["candidate"]), rng, mutation)
            if len(cells) > 1 and rng.random() < mutation:  # to another cell
                w, r = rng.choice([c for c in cells if c != (cfg.width, cfg.resolution)])
                cfg = dataclasses.replace(cfg, width=w, resolution=r)
            return cfg

        def child(top: list[dict[str, Any]] = top) -> SubnetConfig:
            a, b = rng.choice(top), rng.choice(top)
            return spec.crossover(
                SubnetConfig.from_dict(a["candidate"]), SubnetConfig.from_dict(b["candidate"]), rng
            )

        before = set(seen)
        kids = draw(mutant, n_mut) + draw(child, n_cross)
        evaluate([seen[k] for k in seen if k not in before])
        pop = top + [k for k in kids if k["key"] not in {t["key"] for t in top}]
        result.generations = gen + 1
        if progress is not None:
            best = result.best()
            progress(gen + 1, total, best["accuracy"] if best else None)
    return result
