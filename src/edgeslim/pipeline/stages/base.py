"""Stage kinds: the registry from a recipe's stage key (``prune``, ``share`` ...) to its adapter."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel


@dataclass(frozen=True)
class StageKind:
    """A stage kind: how to validate its YAML body and how to run it on a model.

    ``parse(body, where)`` validates the stage's YAML body (``where`` is its key path for
    error messages). ``run(model, stage, ctx)`` returns ``(model, log)``. ``artifact``, when
    given, writes the stage's deployable file: ``artifact(model, stage, directory)`` returns
    ``(format, path)`` of a file it wrote inside ``directory``, whose size becomes the stage's
    ``size_bytes``; without it the pipeline stores the weights as safetensors, dense or
    sparse, whichever is smaller. ``rebuild(model, stage, log, example)``, when given,
    returns the model *structure* ``run`` produced (channels removed, quantized modules, a
    traced graph) without redoing the work, from the stage's recorded ``log``: a resumed run
    calls it for every finished stage in order, then loads the saved state into the result.
    """

    name: str
    parse: Callable[[Any, str], BaseModel]
    run: Callable[..., tuple[Any, dict[str, Any]]]
    artifact: Callable[..., tuple[str, Path]] | None = None
    rebuild: Callable[..., Any] | None = None


STAGE_KINDS: dict[str, StageKind] = {}


def register_stage(kind: StageKind) -> None:
    """Add a stage kind (done by the modules that implement them, see ``pipeline``)."""
    STAGE_KINDS[kind.name] = kind
