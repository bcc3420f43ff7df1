"""The ``search`` pipeline stage: a budget in, the searched model out.

    - search: {target: ort, max_latency_ms: 0.5, trials: 32, max_time: 600,
               space: {techniques: [channel, lowrank], exclude: [stem.*]}}

Keys: the budget's limits (``max_latency_ms``, ``max_flash_kb``, ``max_sram_kb``,
``max_size_kb``) and ``target``; the search's settings (``trials``, ``batch``, ``sampler``,
``proxy_steps``, ``finetune_top``, ``finetune_epochs``, ``max_time``, ``workers``, ``ray``);
``space`` (a :class:`~edgeslim.search.SearchSpace`); ``out``, the search's own run directory
(trials persisted there; a temporary one when unset). The search fine-tunes its finalists
itself (with distillation), so the stage's ``finetune`` block is not applied after it. A
resumed recipe rebuilds the chosen structure from the logged candidate. An infeasible
budget is an error naming the closest point.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from edgeslim.core.errors import ConfigError
from edgeslim.core.options import validate
from edgeslim.pipeline.stages.base import StageKind, register_stage
from edgeslim.search.budget import LIMITS, Budget
from edgeslim.search.space import SearchSpace


class SearchStage(BaseModel):
    """A ``search`` stage's body (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")

    target: str = "ort"
    max_latency_ms: float | None = Field(None, gt=0)
    max_flash_kb: float | None = Field(None, gt=0)
    max_sram_kb: float | None = Field(None, gt=0)
    max_size_kb: float | None = Field(None, gt=0)
    trials: int = Field(32, ge=1)
    batch: int = Field(4, ge=1)
    sampler: Literal["guided", "tpe", "nsga2", "random"] = "guided"
    proxy_steps: int = Field(20, ge=0)
    finetune_top: int = Field(3, ge=1)
    finetune_epochs: int = Field(3, ge=0)
    max_time: float | None = Field(None, gt=0)
    workers: int | None = Field(None, ge=0)
    ray: str | None = None
    space: SearchSpace = Field(default_factory=SearchSpace)
    out: str | None = None

    def budget(self) -> Budget:
        return Budget(target=self.target, **{k: getattr(self, k) for k in LIMITS})


def parse(body: Any, where: str) -> SearchStage:
    return validate(SearchStage, body or {}, where)


def run(model, stage, ctx) -> tuple[Any, dict[str, Any]]:
    from edgeslim.search.engine import search

    cfg: SearchStage = stage.config
    result = search(
        model,
        ctx.data,
        cfg.budget(),
        space=cfg.space,
        trials=cfg.trials,
        batch=cfg.batch,
        seed=ctx.seed,
        sampler=cfg.sampler,
        proxy_steps=cfg.proxy_steps,
        finetune_top=cfg.finetune_top,
        finetune_epochs=cfg.finetune_epochs,
        max_time=cfg.max_time,
        workers=cfg.workers,
        ray=cfg.ray,
        out=cfg.out,
        progress=ctx.progress,
    )
    if not result.feasible:
        raise ConfigError(f"search stage: {result.summary()}")
    return result.model, {
        "candidate": result.candidate,
        "predicted": result.predicted,
        "measured": result.measured,
        "search_dir": str(result.out),
    }


def rebuild(model, stage, log: dict[str, Any], example) -> Any:
    from edgeslim.search.apply import apply_structure_, quantize_candidate

    apply_structure_(model, log["candidate"], example)
    return quantize_candidate(model, log["candidate"], example)


register_stage(StageKind("search", parse, run, rebuild=rebuild, trains=lambda stage: True))
