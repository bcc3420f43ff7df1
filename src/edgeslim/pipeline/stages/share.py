"""The ``share`` pipeline stage: ``{method: kmeans | hash, ...the method's own keys}``.

The stage shares the weights, then (with a ``finetune`` block) trains what is left to
train: the centroids of k-means sharing (the paper's trained quantization) or the buckets
of hashed layers. A resumed run rebuilds hashed layers with :func:`rebuild`.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from edgeslim.core.errors import ConfigError
from edgeslim.core.options import validate
from edgeslim.pipeline.stages.base import StageKind, register_stage


class ShareStage(BaseModel):
    """A validated share stage: the method's name and config."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    method: str
    config: BaseModel

    def to_recipe(self) -> dict[str, Any]:
        return {"method": self.method, **self.config.model_dump()}


def parse(body: Any, where: str) -> ShareStage:
    from edgeslim.share import METHODS

    if not isinstance(body, dict) or "method" not in body:
        raise ConfigError(f"{where}: must be a mapping with a 'method' key ({sorted(METHODS)})")
    method = body["method"]
    if method not in METHODS:
        raise ConfigError(
            f"{where}.method: unknown sharing method {method!r}; known: {sorted(METHODS)}"
        )
    rest = {k: v for k, v in body.items() if k != "method"}
    return ShareStage(method=method, config=validate(METHODS[method], rest, where))


def run(model, stage, ctx) -> tuple[Any, dict[str, Any]]:
    from edgeslim.core.train import evaluate, finetune
    from edgeslim.share import share_

    log: dict[str, Any] = {"layers": share_(model, stage.config.config)}
    ft = stage.finetune
    if ft is not None and ft.epochs > 0:
        log["val_before_finetune"] = evaluate(model, ctx.data, "val")
        finetune(model, ctx.data, ft.model_copy(update={"seed": ctx.seed}), progress=ctx.progress)
        log["val_after_finetune"] = evaluate(model, ctx.data, "val")
    return model, log


def rebuild(model, stage, log, example):
    """The structure a finished share stage left: hashed layers swapped in again (their
    index and sign come from the same seeds; the saved state is loaded next). k-means
    sharing changes no structure: its codes and centroids come back with the state."""
    from edgeslim.share import share_

    if stage.config.method == "hash":
        share_(model, stage.config.config)
    return model


register_stage(StageKind("share", parse, run, rebuild=rebuild))
