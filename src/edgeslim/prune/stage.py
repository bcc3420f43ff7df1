"""The ``prune`` pipeline stage: ``{method: NAME, steps: K, ...method's own keys}``."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ..config import StageKind, register_stage, validate
from ..errors import ConfigError


class _Schedule(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: str
    steps: int = Field(1, ge=1, description="prune -> fine-tune cycles toward the target")


class PruneStage(BaseModel):
    """A validated prune stage: the method's config and the number of cycles."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    method: str
    steps: int
    config: BaseModel

    def to_recipe(self) -> dict[str, Any]:
        return {"method": self.method, "steps": self.steps, **self.config.model_dump()}


def parse(body: Any, where: str) -> PruneStage:
    from . import METHODS

    if not isinstance(body, dict):
        raise ConfigError(f"{where}: must be a mapping with a 'method' key, got {body!r}")
    schedule_keys = {"method", "steps"}
    sched = validate(_Schedule, {k: v for k, v in body.items() if k in schedule_keys}, where)
    if sched.method not in METHODS:
        raise ConfigError(
            f"{where}.method: unknown pruning method {sched.method!r}; known: {sorted(METHODS)}"
        )
    rest = {k: v for k, v in body.items() if k not in schedule_keys}
    config = validate(METHODS[sched.method], rest, where)
    return PruneStage(method=sched.method, steps=sched.steps, config=config)


def run(model, stage, ctx) -> tuple[Any, dict[str, Any]]:
    from ..train import TrainConfig
    from . import prune_, prune_iteratively_

    cfg: PruneStage = stage.config
    ft = stage.finetune or TrainConfig(epochs=0)
    ft = ft.model_copy(update={"seed": ctx.seed})
    if cfg.steps == 1 and ft.epochs == 0:
        return model, {"layer_sparsity": prune_(model, cfg.config)}
    log = prune_iteratively_(
        model, cfg.config, ctx.data, cfg.steps, ft, teacher=ctx.teacher, progress=ctx.progress
    )
    return model, {"cycles": log}


register_stage(StageKind("prune", parse, run))
