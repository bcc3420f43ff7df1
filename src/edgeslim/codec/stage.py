"""The ``pack`` pipeline stage: write the model as a ``.slim`` file (``PackConfig`` keys).

The stage leaves the model as it is; its deployable artifact is ``model.slim``, whose real
size becomes the stage's ``size_bytes`` (format ``slim``). Its log holds the file's make-up:
header and graph bytes, and each coded stream's Huffman and ANS sizes beside its entropy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import StageKind, register_stage, validate
from .packer import PackConfig

SLIM_FILE = "model.slim"


def parse(body: Any, where: str) -> PackConfig:
    return validate(PackConfig, {} if body is None else body, where)


def run(model, stage, ctx) -> tuple[Any, dict[str, Any]]:
    from .packer import encode_model

    _, report = encode_model(model, stage.config, ctx.example)
    log = report.to_dict()
    log.pop("file")
    return model, log


def artifact(model, stage, directory: Path) -> tuple[str, Path]:
    from .packer import pack

    path = Path(directory) / SLIM_FILE
    pack(model, path, stage.config)
    return "slim", path


register_stage(StageKind("pack", parse, run, artifact))
