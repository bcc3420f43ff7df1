"""Automated gradual pruning (AGP): sparsity grows on a cubic schedule *during* training.

Michael Zhu, Suyog Gupta. "To prune, or not to prune: exploring the efficacy of pruning for
model compression", ICLR 2018 workshop. https://arxiv.org/abs/1710.01878

From step t0 to t0 + n*dt the target sparsity follows

    s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n dt))^3

pruning fast while many redundant weights remain and slowly near the end, with training in
between letting the network recover. Every ``every`` optimizer steps the model is pruned to
s_t with the chosen scorer (magnitude or OBD: any config with ``sparsity`` or
``layer_sparsity``); masks only grow. The schedule plugs into :func:`edgeslim.fit` through
its ``step_hook``.
"""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from edgeslim.core.data.datasets import DataSplits
from edgeslim.core.errors import ConfigError
from edgeslim.core.options import Options
from edgeslim.core.selection import FilterFn
from edgeslim.core.train import StepHook, TrainConfig, fit


class AGPSchedule(Options):
    """When AGP prunes: from ``start`` to ``end`` (fractions of all training steps),
    every ``every`` steps, from sparsity ``initial`` (times the target) to the target."""

    model_config = ConfigDict(extra="forbid")

    initial: float = Field(0.0, ge=0, lt=1, description="s_i as a fraction of the target")
    start: float = Field(0.0, ge=0, lt=1, description="t0, as a fraction of training steps")
    end: float = Field(0.75, gt=0, le=1, description="t0 + n dt, as a fraction")
    every: int = Field(10, ge=1, description="dt: optimizer steps between pruning events")

    @model_validator(mode="after")
    def _ordered(self) -> AGPSchedule:
        if self.end <= self.start:
            raise ValueError(f"end ({self.end}) must come after start ({self.start})")
        return self

    def progress(self, step: int, total: int) -> float:
        """Where ``step`` of ``total`` lies between start (0) and end (1), clipped."""
        t0, t1 = self.start * total, self.end * total
        return min(1.0, max(0.0, (step - t0) / max(t1 - t0, 1e-9)))

    def fraction(self, step: int, total: int) -> float:
        """s_t / s_f: the cubic ramp from ``initial`` to 1."""
        return 1 + (self.initial - 1) * (1 - self.progress(step, total)) ** 3

    def hook(self, cfg: BaseModel, filter_fn: FilterFn | None = None, **kwargs: object) -> StepHook:
        """A ``step_hook`` for :func:`edgeslim.fit` that prunes ``model`` with ``cfg`` at s_t.

        ``kwargs`` (e.g. ``data=`` for OBD) are passed to :func:`edgeslim.prune_`.
        """
        from edgeslim.prune import prune_

        at_fraction(cfg, 1.0)  # fail now, not mid-training, on a config without a target

        def step_hook(model: nn.Module, step: int, total: int) -> None:
            last = math.ceil(self.end * total)  # the step that reaches the target
            if self.start * total <= step <= last and (step % self.every == 0 or step == last):
                target = at_fraction(cfg, self.fraction(step, total))
                prune_(model, target, filter_fn=filter_fn, **kwargs)

        return step_hook


def at_fraction(cfg: BaseModel, fraction: float) -> BaseModel:
    """``cfg`` with its sparsity target(s) multiplied by ``fraction``."""
    update: dict[str, object] = {}
    if getattr(cfg, "sparsity", None) is not None and "sparsity" in type(cfg).model_fields:
        update["sparsity"] = cfg.sparsity * fraction
    elif getattr(cfg, "layer_sparsity", None) is not None:
        update["layer_sparsity"] = {k: v * fraction for k, v in cfg.layer_sparsity.items()}
    else:
        raise ConfigError(
            f"AGP needs a pruning config with 'sparsity' or 'layer_sparsity'; "
            f"{type(cfg).__name__} has neither set"
        )
    return cfg.model_copy(update=update)


def prune_agp_(
    model: nn.Module,
    cfg: BaseModel,
    data: DataSplits,
    schedule: AGPSchedule | None = None,
    train_cfg: TrainConfig | None = None,
    *,
    filter_fn: FilterFn | None = None,
    teacher: nn.Module | None = None,
    progress: bool | None = None,
    **prune_kwargs: object,
) -> list[dict[str, float]]:
    """Train ``model`` on ``data`` while pruning it to ``cfg``'s target on the AGP schedule.

    With a ``teacher`` the training distils from it (``train_cfg.distill``).
    ``keep_best`` is turned off (an early epoch has fewer pruned weights, not a better model)
    and the final target is applied once more at the end, so the model ends exactly at it.
    Methods that take ``data`` (OBD) get ``data``.
    Returns :func:`edgeslim.fit`'s per-epoch history.
    """
    from edgeslim.prune import accepted, prune_

    prune_kwargs = {**accepted(cfg, data=data), **prune_kwargs}  # e.g. OBD's Hessian data
    schedule = schedule or AGPSchedule()
    train_cfg = (train_cfg or TrainConfig(epochs=5, lr=1e-3)).model_copy(
        update={"keep_best": False}
    )
    hook = schedule.hook(cfg, filter_fn=filter_fn, **prune_kwargs)
    history = fit(model, data, train_cfg, teacher=teacher, step_hook=hook, progress=progress)
    prune_(model, cfg, filter_fn=filter_fn, **prune_kwargs)
    return history
