"""The ``prune`` pipeline stage: ``{method: NAME, steps: K, agp: {...}, ...method's own keys}``.

- ``steps: 1`` (default) with no stage ``finetune``: one-shot;
- ``steps: K`` with ``finetune``: K prune -> fine-tune cycles (methods with ``scaled``:
  magnitude, obd);
- ``agp: {start, end, every, initial}``: prune during the stage's ``finetune`` training on
  Zhu & Gupta's cubic schedule (magnitude, obd);
- ``method: channel`` / ``depth`` / ``nm``: prune once, then fine-tune if ``finetune`` is
  given.

Methods that need them get the recipe's example input (``channel``) and data (``obd``,
``nm`` with ``score: obd``, ``channel`` with taylor importance or sensitivity allocation).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from edgeslim.core.errors import ConfigError
from edgeslim.core.options import validate
from edgeslim.pipeline.stages.base import StageKind, register_stage
from edgeslim.prune.agp import AGPSchedule
from edgeslim.prune.channel import ChannelPrune, cut_channels_
from edgeslim.prune.depth import DepthPrune, replay_depth_
from edgeslim.prune.surgery import replay_


class _Schedule(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: str
    steps: int = Field(1, ge=1, description="prune -> fine-tune cycles toward the target")
    agp: AGPSchedule | None = None


class PruneStage(BaseModel):
    """A validated prune stage: the method's config and the number of cycles."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    method: str
    steps: int
    config: BaseModel
    agp: AGPSchedule | None = None

    def to_recipe(self) -> dict[str, Any]:
        extra = {"agp": self.agp.model_dump()} if self.agp is not None else {}
        return {"method": self.method, "steps": self.steps, **extra, **self.config.model_dump()}


def parse(body: Any, where: str) -> PruneStage:
    from edgeslim.prune import METHODS

    if not isinstance(body, dict):
        raise ConfigError(f"{where}: must be a mapping with a 'method' key, got {body!r}")
    schedule_keys = {"method", "steps", "agp"}
    sched = validate(_Schedule, {k: v for k, v in body.items() if k in schedule_keys}, where)
    if sched.method not in METHODS:
        raise ConfigError(
            f"{where}.method: unknown pruning method {sched.method!r}; known: {sorted(METHODS)}"
        )
    rest = {k: v for k, v in body.items() if k not in schedule_keys}
    config = validate(METHODS[sched.method], rest, where)
    if (sched.steps > 1 or sched.agp is not None) and not hasattr(config, "scaled"):
        raise ConfigError(
            f"{where}: method {sched.method!r} prunes in one step; 'steps' > 1 and 'agp' need "
            f"a method with a sparsity target ({', '.join(_graded(METHODS))})"
        )
    if sched.agp is not None:
        from edgeslim.prune.agp import at_fraction

        try:
            at_fraction(config, 1.0)
        except ConfigError as exc:
            raise ConfigError(f"{where}.agp: {exc}") from None
    if sched.steps > 1 and sched.agp is not None:
        raise ConfigError(f"{where}: give 'steps' (iterative) or 'agp' (gradual), not both")
    return PruneStage(method=sched.method, steps=sched.steps, config=config, agp=sched.agp)


def _graded(methods: dict[str, type[BaseModel]]) -> list[str]:
    return sorted(name for name, cls in methods.items() if hasattr(cls, "scaled"))


def run(model, stage, ctx) -> tuple[Any, dict[str, Any]]:
    from edgeslim.core.train import TrainConfig, finetune
    from edgeslim.prune import accepted, prune_, prune_agp_, prune_iteratively_

    cfg: PruneStage = stage.config
    ft = stage.finetune or TrainConfig(epochs=0)
    ft = ft.model_copy(update={"seed": ctx.seed})
    if getattr(cfg.config, "needs_calib", False):  # one shot, from the calibration set
        calib = {"calib": ctx.calibration(), "progress": ctx.progress}
        log = {"layer_sparsity": prune_(model, cfg.config, **calib)}
        if ft.epochs > 0:
            log["finetune"] = finetune(
                model, ctx.data, ft, teacher=ctx.teacher, progress=ctx.progress
            )
        return model, log
    context = accepted(cfg.config, example=ctx.example, data=ctx.data)
    if cfg.agp is not None:
        if ft.epochs == 0:
            raise ConfigError(f"stage {stage.label}: 'agp' prunes during training; add finetune")
        context.pop("data", None)  # prune_agp_ passes its own
        history = prune_agp_(
            model, cfg.config, ctx.data, cfg.agp, ft, teacher=ctx.teacher, progress=ctx.progress,
            **context,
        )  # fmt: skip
        return model, {"agp": history}
    if isinstance(cfg.config, ChannelPrune):
        plans = cut_channels_(model, cfg.config, **context)
        log: dict[str, Any] = {
            "removed": {p.group: len(p.remove) / p.channels for p in plans},
            "cut": [asdict(p) for p in plans],  # what restore() replays on resume
        }
        if ft.epochs > 0:
            log["finetune"] = finetune(
                model, ctx.data, ft, teacher=ctx.teacher, progress=ctx.progress
            )
        return model, log
    if isinstance(cfg.config, DepthPrune):  # the removed blocks: what rebuild() replays
        log = {"removed_blocks": list(prune_(model, cfg.config, **context))}
        if ft.epochs > 0:
            log["finetune"] = finetune(
                model, ctx.data, ft, teacher=ctx.teacher, progress=ctx.progress
            )
        return model, log
    if not hasattr(cfg.config, "scaled") or (cfg.steps == 1 and ft.epochs == 0):
        log = {"layer_sparsity": prune_(model, cfg.config, **context)}
        if ft.epochs > 0:
            log["finetune"] = finetune(
                model, ctx.data, ft, teacher=ctx.teacher, progress=ctx.progress
            )
        return model, log
    context.pop("data", None)  # prune_iteratively_ passes its own
    cycles = prune_iteratively_(
        model, cfg.config, ctx.data, cfg.steps, ft, teacher=ctx.teacher, progress=ctx.progress,
        **context,
    )  # fmt: skip
    return model, {"cycles": cycles}


def rebuild(model, stage, log: dict[str, Any], example):
    """Redo a finished channel- or depth-pruning stage's cuts on a fresh model (for resume)."""
    if log.get("cut"):
        replay_(model, example, log["cut"])
    if log.get("removed_blocks"):
        replay_depth_(model, log["removed_blocks"])
    return model


register_stage(StageKind("prune", parse, run, rebuild=rebuild))
