"""The ``prune`` pipeline stage: ``{method: NAME, steps: K, agp: {...}, ...method's own keys}``.

- ``steps: 1`` (default): prune once; the pipeline fine-tunes after if ``finetune`` is given;
- ``steps: K`` with ``finetune``: K prune -> fine-tune cycles (``graded`` methods: magnitude,
  obd, obs);
- ``agp: {start, end, every, initial}``: prune during the stage's ``finetune`` training on
  Zhu & Gupta's cubic schedule (graded methods).

Methods get what their handler takes of the recipe's example input and data, and one-shot
methods (``needs_calib``: wanda, sparsegpt) the recipe's calibration set. What a resume must
replay (a ``ChannelPrune`` plan, the blocks ``DepthPrune`` removed) is in the verb's log.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from edgeslim.core.errors import ConfigError
from edgeslim.core.train import TrainConfig
from edgeslim.pipeline.stages.base import StageKind, register_stage
from edgeslim.pipeline.stages.method import MethodStage, calibration, parse_method, verb_context
from edgeslim.prune import REGISTRY, prune_, prune_agp_, prune_iteratively_
from edgeslim.prune.agp import AGPSchedule, at_fraction


class _Schedule(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: str
    steps: int = Field(1, ge=1, description="prune -> fine-tune cycles toward the target")
    agp: AGPSchedule | None = None


def parse(body: Any, where: str) -> MethodStage:
    stage = parse_method(body, where, REGISTRY, "pruning method", own=_Schedule)
    steps, agp = stage.extra.get("steps", 1), stage.extra.get("agp")
    if (steps > 1 or agp is not None) and not stage.config.graded:
        graded = ", ".join(sorted(n for n, c in REGISTRY.methods.items() if c.graded))
        raise ConfigError(
            f"{where}: method {stage.method!r} prunes in one step; 'steps' > 1 and 'agp' need "
            f"a method with a sparsity target ({graded})"
        )
    if agp is not None:
        try:
            at_fraction(stage.config, 1.0)
        except ConfigError as exc:
            raise ConfigError(f"{where}.agp: {exc}") from None
    if steps > 1 and agp is not None:
        raise ConfigError(f"{where}: give 'steps' (iterative) or 'agp' (gradual), not both")
    return stage


def _scheduled(stage: Any) -> bool:
    """Whether the stage prunes during its fine-tuning: AGP, or prune -> fine-tune cycles of
    a graded method (one cycle when ``steps`` is 1 and the stage fine-tunes)."""
    extra, ft = stage.config.extra, stage.finetune
    if extra.get("agp") is not None:
        return True
    tunes = ft is not None and ft.epochs > 0
    return stage.config.config.graded and (extra.get("steps", 1) > 1 or tunes)


def run(model, stage, ctx) -> tuple[Any, dict[str, Any]]:
    cfg = stage.config.config
    context = verb_context(REGISTRY, cfg, ctx, ("example", "data"))
    if cfg.needs_calib:  # one shot, from the calibration set
        context = {"calib": calibration(cfg, ctx), "progress": ctx.progress}
    if not _scheduled(stage):
        return model, {"result": prune_(model, cfg, **context)}
    ft = (stage.finetune or TrainConfig(epochs=0)).model_copy(update={"seed": ctx.seed})
    context.pop("data", None)  # the schedules pass their own
    extra = stage.config.extra
    if extra.get("agp") is not None:
        if ft.epochs == 0:
            raise ConfigError(f"stage {stage.label}: 'agp' prunes during training; add finetune")
        agp = AGPSchedule.model_validate(extra["agp"])
        history = prune_agp_(
            model, cfg, ctx.data, agp, ft, teacher=ctx.teacher, progress=ctx.progress, **context
        )
        return model, {"agp": history}
    cycles = prune_iteratively_(
        model, cfg, ctx.data, extra.get("steps", 1), ft, teacher=ctx.teacher, progress=ctx.progress,
        **context,
    )  # fmt: skip
    return model, {"cycles": cycles}


def rebuild(model, stage, log: dict[str, Any], example):
    """Replay a finished stage's structural change on a fresh model (for resume)."""
    return REGISTRY.replay(model, stage.config.config, log.get("result", {}), example)


register_stage(StageKind("prune", parse, run, rebuild=rebuild, trains=_scheduled))
