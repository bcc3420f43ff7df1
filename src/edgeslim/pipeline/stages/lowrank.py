"""The ``lowrank`` pipeline stage: ``{method: svd | conv, calib: N, ...method's own keys}``.

    - lowrank: {method: conv, macs: 0.5, linear: true, calib: 256}
      finetune: {epochs: 3, lr: 0.0003, distill: {temperature: 4, alpha: 0.7}}

``calib`` training inputs (drawn with the stage's seed) feed the response solver and the
sensitivity measurement of a ``macs`` budget. Factorised layers change the model's
structure; a resumed run rebuilds them from the stage's logged ranks (:func:`rebuild`).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from edgeslim.core.errors import ConfigError
from edgeslim.core.options import validate
from edgeslim.pipeline.stages.base import StageKind, register_stage


class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: str
    calib: int = Field(256, ge=1, description="calibration inputs from the training split")


class LowRankStage(BaseModel):
    """A validated lowrank stage: the method's config and the calibration size."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    method: str
    calib: int
    config: BaseModel

    def to_recipe(self) -> dict[str, Any]:
        return {"method": self.method, "calib": self.calib, **self.config.model_dump()}


def parse(body: Any, where: str) -> LowRankStage:
    from edgeslim.lowrank import METHODS

    if not isinstance(body, dict):
        raise ConfigError(f"{where}: must be a mapping with a 'method' key, got {body!r}")
    common_keys = {"method", "calib"}
    common = validate(_Common, {k: v for k, v in body.items() if k in common_keys}, where)
    if common.method not in METHODS:
        raise ConfigError(
            f"{where}.method: unknown low-rank method {common.method!r}; known: {sorted(METHODS)}"
        )
    rest = {k: v for k, v in body.items() if k not in common_keys}
    config = validate(METHODS[common.method], rest, where)
    return LowRankStage(method=common.method, calib=common.calib, config=config)


def run(model, stage, ctx) -> tuple[Any, dict[str, Any]]:
    from edgeslim.core.train import evaluate, finetune
    from edgeslim.lowrank import lowrank_

    cfg: LowRankStage = stage.config
    n = min(cfg.calib, len(ctx.data.train))
    layers = lowrank_(model, cfg.config, calib=ctx.data.calib(n, seed=ctx.seed))
    log: dict[str, Any] = {"layers": layers}
    if stage.finetune is not None and stage.finetune.epochs > 0:
        ft = stage.finetune.model_copy(update={"seed": ctx.seed})
        log["val_before_finetune"] = evaluate(model, ctx.data, "val")
        finetune(model, ctx.data, ft, teacher=ctx.teacher, progress=ctx.progress)
    return model, log


def rebuild(model, stage, log: dict[str, Any], example) -> Any:
    """Redo a finished lowrank stage's structure from its log (for resume): each factorised
    layer becomes an (uninitialised) pair of the logged rank; the saved state fills it."""
    from torch import nn

    from edgeslim.lowrank.layers import replace_, thin_pair

    cfg = stage.config.config
    for name, entry in log.get("layers", {}).items():
        layer = model.get_submodule(name)
        separable = getattr(cfg, "separable", False) and 1 not in getattr(
            layer, "kernel_size", (1,)
        )
        shape = "linear" if isinstance(layer, nn.Linear) else "separable" if separable else "conv"
        bias = layer.bias is not None or cfg.solver == "response"  # response re-adds the mean
        replace_(model, name, thin_pair(layer, int(entry["rank"]), shape, bias))
    return model


register_stage(StageKind("lowrank", parse, run, rebuild=rebuild))
