"""How the search picks its next candidates.

- ``"guided"`` (the default, :func:`propose`): predictor-guided local search -- many
  neighbours of the best trials drawn, the predicted-infeasible dropped, the proxy spent on
  the widest of the rest (NetAdapt, Yang et al. 2018; AMC, He et al. 2018, constrain
  the same way: the cost model first, accuracy only for candidates that fit);
- Optuna's samplers: a seeded sampler per generation (TPE, NSGA-II or random, with the
  budget as Optuna constraints), and a study rebuilt from the finished trials.

Either way what is asked next depends on the seed and the earlier results alone.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable
from typing import Any

from edgeslim.core.errors import ConfigError
from edgeslim.search.space import BoundSpace


def make_sampler(kind: str, seed: int, batch: int, startup: int):
    try:
        import optuna
    except ImportError as exc:
        raise ConfigError("the search needs Optuna: pip install 'edgeslim[search]'") from exc

    warnings.filterwarnings("ignore", category=FutureWarning, module="optuna")
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

    def constraints(trial) -> list[float]:
        return trial.system_attrs.get("constraints", [])

    if kind in ("tpe", "guided"):  # guided: TPE asks what the screened proposals leave
        return optuna.samplers.TPESampler(
            seed=seed, constraints_func=constraints, n_startup_trials=startup, multivariate=True
        )
    if kind == "nsga2":
        return optuna.samplers.NSGAIISampler(
            seed=seed, population_size=max(2, batch), constraints_func=constraints
        )
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ConfigError(f"sampler {kind!r}: expected 'tpe', 'nsga2' or 'random'")


def study_from(space: BoundSpace, records: list[dict], sampler: Any):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)
    dists = {k: optuna.distributions.CategoricalDistribution(v) for k, v in space.knobs.items()}
    for r in records:
        study.add_trial(
            optuna.trial.create_trial(
                params=r["candidate"],
                distributions=dists,
                values=[r["accuracy"] or 0.0, r["objective"]],
                system_attrs={"constraints": r["constraints"]},
            )
        )
    return study, dists


def ask(study, dists: dict) -> dict[str, Any]:
    trial = study.ask(dists)
    return dict(trial.params)


# ----------------------------------------------------------------------------- guided


def mutate(space: BoundSpace, parent: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    """A neighbour of ``parent``: one knob one menu step up or down, or (half the time, where
    the space has two channel groups) a *trade*: one group a step wider, another a step
    narrower -- the move that shifts channels to where they cost less latency."""
    child = dict(parent)
    keeps = [k for k in space.knobs if k.startswith("keep:") and len(space.knobs[k]) > 1]
    if len(keeps) >= 2 and rng.random() < 0.5:
        wider, narrower = rng.sample(keeps, 2)
        menu_w, menu_n = space.knobs[wider], space.knobs[narrower]
        i, j = menu_w.index(child[wider]), menu_n.index(child[narrower])
        if i > 0:
            child[wider] = menu_w[i - 1]
        if j + 1 < len(menu_n):
            child[narrower] = menu_n[j + 1]
        return child
    knobs = [k for k, menu in space.knobs.items() if len(menu) > 1]
    if knobs:
        knob = rng.choice(knobs)
        child[knob] = rng.choice(space.neighbours(child, knob))
    return child


def propose(
    space: BoundSpace,
    prior: list[dict[str, Any]],
    seeds: list[dict[str, Any]],
    rng: random.Random,
    screen: Callable[[dict[str, Any]], dict[str, float]],
    feasible: Callable[[dict[str, float]], bool],
    metric: str,
    n: int,
    pool: int,
    fill: int = 0,
) -> list[dict[str, Any]]:
    """``n`` new candidates, screened by the cost predictor (NetAdapt / AMC style).

    ``pool`` neighbours (:func:`mutate`) of the elites -- the feasible finished trials with
    the best proxy accuracy (or, before any, the feasible ``seeds``) -- are drawn; those
    ``screen`` (the predicted cost) says break the budget are dropped, as is anything
    already tried or proposed; of the rest the *widest* (highest predicted ``metric``: the
    closest to the budget) of each elite's children are taken in turn, best elite first.
    Up to ``fill`` random draws fill up when the neighbourhood runs dry (feasible ones
    first); fewer than ``n`` come back when the space is exhausted. A function of its
    arguments alone (``rng`` seeded by the caller), so a resumed search asks the same."""
    tried = {_key(r["candidate"]) for r in prior} | {_key(s) for s in seeds}
    ok = [r for r in prior if r["feasible"] and r["accuracy"] is not None]
    ok.sort(key=lambda r: (-r["accuracy"], -r["cost"][metric], r["number"]))
    elites = [r["candidate"] for r in ok[:4]]
    if not elites:
        elites = [s for s in seeds if feasible(screen(s))][-4:] or [space.smallest()]
    children: list[list[tuple[float, dict[str, Any]]]] = [[] for _ in elites]
    for i in range(pool):
        which = i % len(elites)
        child = mutate(space, elites[which], rng)
        if rng.random() < 0.25:  # now and then a longer jump
            child = mutate(space, child, rng)
        key = _key(child)
        if key in tried:
            continue
        tried.add(key)
        cost = screen(child)
        if feasible(cost):
            children[which].append((cost[metric], child))
    for c in children:
        c.sort(key=lambda t: -t[0])  # widest first (stable: draw order breaks ties)
    out: list[dict[str, Any]] = []
    while len(out) < n and any(children):
        for c in children:
            if c and len(out) < n:
                out.append(c.pop(0)[1])
    spare: list[dict[str, Any]] = []
    for _ in range(fill if len(out) < n else 0):
        child = space.sample(rng)
        key = _key(child)
        if key in tried:
            continue
        tried.add(key)
        if feasible(screen(child)):
            out.append(child)
            if len(out) == n:
                break
        elif len(spare) < n:
            spare.append(child)
    out += spare[: n - len(out)]
    return out


def _key(candidate: dict[str, Any]) -> str:
    import json

    return json.dumps(candidate, sort_keys=True)
