"""The ``share`` pipeline stage: ``{method: kmeans | hash, ...the method's own keys}``.

The stage shares the weights; the pipeline then fine-tunes (with a ``finetune`` block) what
is left to train: the centroids of k-means sharing (the paper's trained quantization) or the
buckets of hashed layers. A resumed run swaps hashed layers in again (the verb's replay).
"""

from __future__ import annotations

from typing import Any

from edgeslim.pipeline.stages.base import StageKind, register_stage
from edgeslim.pipeline.stages.method import MethodStage, parse_method
from edgeslim.share import REGISTRY, share_


def parse(body: Any, where: str) -> MethodStage:
    return parse_method(body, where, REGISTRY, "sharing method")


def run(model, stage, ctx) -> tuple[Any, dict[str, Any]]:
    return model, {"layers": share_(model, stage.config.config)}


def rebuild(model, stage, log, example):
    return REGISTRY.replay(model, stage.config.config, log.get("layers", {}), example)


register_stage(StageKind("share", parse, run, rebuild=rebuild))
