"""Stage kinds: the registry from a recipe's stage key (``prune``, ``share`` ...) to its adapter."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel


@dataclass(frozen=True)
class StageKind:
    """A stage kind: how to validate its YAML body and how to run it on a model.

    The pipeline owns what every stage repeats; a stage kind supplies only what is its own:

    - ``parse(body, where)`` validates the stage's YAML body (``where``: its key path, for
      error messages);
    - ``run(model, stage, ctx)`` applies the technique and returns ``(model, log)``; the log
      holds what the verb returned, including what a resume must replay;
    - ``artifact(model, stage, directory, example)``, when given, writes the stage's
      deployable file and returns ``(format, path, log)`` (``log`` is added to the stage's);
      without it the pipeline stores the weights as safetensors, dense or sparse, whichever
      is smaller;
    - ``rebuild(model, stage, log, example)``, when given, returns the model *structure*
      ``run`` produced (channels removed, quantized modules ...) from the stage's recorded
      ``log``, without redoing the work: a resumed run calls it for every finished stage in
      order, then loads the saved state into the result;
    - ``trains(stage)``: True when the technique trains the model itself and the stage's
      ``finetune`` block is its schedule (QAT, AGP, iterative pruning); otherwise the
      pipeline fine-tunes after ``run`` (with the teacher when ``finetune.distill`` is set);
    - ``tuning(model)``, when given, is a context manager the pipeline enters around that
      fine-tuning (quantized models train through fake quantization).
    """

    name: str
    parse: Callable[[Any, str], BaseModel]
    run: Callable[..., tuple[Any, dict[str, Any]]]
    artifact: Callable[..., tuple[str, Path, dict[str, Any]]] | None = None
    rebuild: Callable[..., Any] | None = None
    trains: Callable[[Any], bool] = field(default=lambda stage: False)
    tuning: Callable[[Any], AbstractContextManager] | None = None


STAGE_KINDS: dict[str, StageKind] = {}


def register_stage(kind: StageKind) -> None:
    """Add a stage kind (done by the adapter modules of this package)."""
    STAGE_KINDS[kind.name] = kind
