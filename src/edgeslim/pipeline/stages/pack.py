"""The ``pack`` pipeline stage: write the model as a ``.slim`` file (``PackConfig`` keys).

The stage leaves the model as it is; its deployable artifact is ``model.slim``, whose real
size becomes the stage's ``size_bytes`` (format ``slim``). Its log holds the file's make-up:
header and graph bytes, and each coded stream's Huffman and ANS sizes beside its entropy.

The model is encoded once: ``run`` encodes it (for the log) and keeps the bytes until the
pipeline asks for the artifact, which writes (and verifies) exactly those bytes.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgeslim.codec import packer
from edgeslim.codec.packer import PackConfig, PackReport
from edgeslim.core.options import validate
from edgeslim.pipeline.stages.base import StageKind, register_stage

SLIM_FILE = "model.slim"


@dataclass
class _Encoded:
    """What ``run`` encoded, for ``artifact`` to write."""

    stage: Any
    data: bytes
    report: PackReport
    example: torch.Tensor | None


_ENCODED: weakref.WeakKeyDictionary[nn.Module, _Encoded] = weakref.WeakKeyDictionary()


def parse(body: Any, where: str) -> PackConfig:
    return validate(PackConfig, {} if body is None else body, where)


def run(model: nn.Module, stage: Any, ctx: Any) -> tuple[nn.Module, dict[str, Any]]:
    # the example pack() would use, so that the log describes the very file written
    example = packer.default_example(model, None)
    data, report = packer.encode_model(model, stage.config, example)
    _ENCODED[model] = _Encoded(stage, data, report, example)
    log = report.to_dict()
    log.pop("file")
    return model, log


def artifact(model: nn.Module, stage: Any, directory: Path) -> tuple[str, Path]:
    path = Path(directory) / SLIM_FILE
    done = _ENCODED.pop(model, None)
    if done is None or done.stage is not stage:  # not encoded by run: encode now
        packer.pack(model, path, stage.config)
    else:
        verify = stage.config.verify
        packer.write_encoded(model, path, done.data, done.report, done.example, verify=verify)
    return "slim", path


register_stage(StageKind("pack", parse, run, artifact))
