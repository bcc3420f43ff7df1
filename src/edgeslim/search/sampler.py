"""The search's Optuna side: a seeded sampler per generation (TPE, NSGA-II or random, with
the budget as Optuna constraints), and a study rebuilt from the finished trials so that what
is asked next depends on the seed and the earlier results alone.
"""

from __future__ import annotations

import warnings
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

    if kind == "tpe":
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
