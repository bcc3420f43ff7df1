"""The ``quantize`` pipeline stage: ``{method: NAME, ...method's own keys}``.

``method`` picks a config class registered with :func:`edgeslim.quant.register`; methods that
need calibration data (``needs_calib``) get the recipe's calibration set.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from ..config import StageKind, register_stage, validate
from ..errors import ConfigError


class QuantizeStage(BaseModel):
    """A validated quantize stage: the method's name and config."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    method: str
    config: BaseModel

    def to_recipe(self) -> dict[str, Any]:
        return {"method": self.method, **self.config.model_dump()}


def parse(body: Any, where: str) -> QuantizeStage:
    from . import METHODS

    if not isinstance(body, dict) or "method" not in body:
        raise ConfigError(f"{where}: must be a mapping with a 'method' key, got {body!r}")
    method = body["method"]
    if method not in METHODS:
        raise ConfigError(
            f"{where}.method: unknown quantization method {method!r}; known: {sorted(METHODS)}"
        )
    rest = {k: v for k, v in body.items() if k != "method"}
    return QuantizeStage(method=method, config=validate(METHODS[method], rest, where))


def run(model, stage, ctx) -> tuple[Any, dict[str, Any]]:
    from . import quantize_

    cfg: QuantizeStage = stage.config
    calib = ctx.calibration() if getattr(cfg.config, "needs_calib", False) else None
    log = quantize_(model, cfg.config, calib=calib, progress=ctx.progress)
    return model, {"layers": log}


register_stage(StageKind("quantize", parse, run))
