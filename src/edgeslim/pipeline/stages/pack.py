"""The ``pack`` pipeline stage: write the model as a ``.slim`` file (``PackConfig`` keys).

The stage leaves the model as it is; its deployable artifact is ``model.slim``, whose real
size becomes the stage's ``size_bytes`` (format ``slim``). Its log holds the file's make-up:
header and graph bytes, and each coded stream's Huffman and ANS sizes beside its entropy.

The model is encoded once, by ``artifact`` (the pipeline gives it the recipe's example input,
used to trace a model the zoo cannot rebuild); the encoder's report becomes the stage's log.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from edgeslim.codec import packer
from edgeslim.codec.packer import PackConfig
from edgeslim.core.options import validate
from edgeslim.pipeline.stages.base import StageKind, register_stage

SLIM_FILE = "model.slim"


def parse(body: Any, where: str) -> PackConfig:
    return validate(PackConfig, {} if body is None else body, where)


def run(model: nn.Module, stage: Any, ctx: Any) -> tuple[nn.Module, dict[str, Any]]:
    return model, {}  # packing changes nothing; the file is written as the artifact


def artifact(
    model: nn.Module, stage: Any, directory: Path, example: Any
) -> tuple[str, Path, dict[str, Any]]:
    # a model with input_shape is encoded with the seeded batch pack() itself would use (the
    # same bytes as edgeslim.pack); otherwise the recipe's example traces it
    example = packer.default_example(model, None) if hasattr(model, "input_shape") else example
    path = Path(directory) / SLIM_FILE
    report = packer.pack(model, path, stage.config, example=example)
    log = report.to_dict()
    log.pop("file")
    return "slim", path, log


register_stage(StageKind("pack", parse, run, artifact))
