"""The ``lowrank`` pipeline stage: ``{method: svd | conv, calib: N, ...method's own keys}``.

    - lowrank: {method: conv, macs: 0.5, linear: true, calib: 256}
      finetune: {epochs: 3, lr: 0.0003, distill: {temperature: 4, alpha: 0.7}}

``calib`` training inputs (drawn with the stage's seed) feed the response solver and the
sensitivity measurement of a ``macs`` budget. Factorised layers change the model's
structure; a resumed run rebuilds them from the stage's logged ranks (the verb's replay).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from edgeslim.lowrank import REGISTRY, lowrank_
from edgeslim.pipeline.stages.base import StageKind, register_stage
from edgeslim.pipeline.stages.method import MethodStage, calibration, parse_method


class _Own(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: str
    calib: int = Field(256, ge=1, description="calibration inputs from the training split")


def parse(body: Any, where: str) -> MethodStage:
    return parse_method(body, where, REGISTRY, "low-rank method", own=_Own)


def run(model, stage, ctx) -> tuple[Any, dict[str, Any]]:
    cfg = stage.config.config
    calib = calibration(cfg, ctx, stage.config.extra["calib"])
    return model, {"layers": lowrank_(model, cfg, calib=calib)}


def rebuild(model, stage, log: dict[str, Any], example) -> Any:
    return REGISTRY.replay(model, stage.config.config, log.get("layers", {}), example)


register_stage(StageKind("lowrank", parse, run, rebuild=rebuild))
