"""edgeslim: make trained PyTorch models small and fast enough for the edge, and measure it.

Heavy modules (torch and everything built on it) are imported lazily on first attribute
access, so ``import edgeslim`` and ``edgeslim --help`` stay fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .errors import (
    CheckpointError,
    ConfigError,
    DataError,
    EdgeslimError,
    ModelSourceError,
    RunDirError,
    ShapeError,
    UnknownModelError,
)

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "load_model": "edgeslim.models.io",
    "save_model": "edgeslim.models.io",
    "load_data": "edgeslim.data.datasets",
    "DataSplits": "edgeslim.data.datasets",
    "fit": "edgeslim.train",
    "evaluate": "edgeslim.train",
    "finetune": "edgeslim.train",
    "TrainConfig": "edgeslim.train",
    "profile": "edgeslim.profile",
    "Profile": "edgeslim.profile",
    "prune_": "edgeslim.prune",
    "MagnitudePrune": "edgeslim.prune",
    "prune_iteratively_": "edgeslim.prune",
    "apply_masks_": "edgeslim.prune",
    "distill": "edgeslim.distill",
    "KD": "edgeslim.distill",
    "lowrank_": "edgeslim.lowrank",
    "SVD": "edgeslim.lowrank",
    "ConvDecompose": "edgeslim.lowrank",
    "haar_split": "edgeslim.data.transforms",
    "HaarSplit": "edgeslim.data.transforms",
    "Recipe": "edgeslim.config",
    "run_recipe": "edgeslim.pipeline",
    "render_report": "edgeslim.report",
}
_SUBMODULES = {"zoo"}

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "EdgeslimError",
    "ModelSourceError",
    "RunDirError",
    "ShapeError",
    "UnknownModelError",
    "__version__",
    *_LAZY,
    *_SUBMODULES,
]


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"edgeslim.{name}")
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'edgeslim' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from . import (
        zoo as zoo,
    )
    from .config import (
        Recipe as Recipe,
    )
    from .data.datasets import (
        DataSplits as DataSplits,
    )
    from .data.datasets import (
        load_data as load_data,
    )
    from .data.transforms import (
        HaarSplit as HaarSplit,
    )
    from .data.transforms import (
        haar_split as haar_split,
    )
    from .distill import (
        KD as KD,
    )
    from .distill import (
        distill as distill,
    )
    from .lowrank import (
        SVD as SVD,
    )
    from .lowrank import (
        ConvDecompose as ConvDecompose,
    )
    from .lowrank import (
        lowrank_ as lowrank_,
    )
    from .models.io import (
        load_model as load_model,
    )
    from .models.io import (
        save_model as save_model,
    )
    from .pipeline import (
        run_recipe as run_recipe,
    )
    from .profile import (
        Profile as Profile,
    )
    from .profile import (
        profile as profile,
    )
    from .prune import (
        MagnitudePrune as MagnitudePrune,
    )
    from .prune import (
        apply_masks_ as apply_masks_,
    )
    from .prune import (
        prune_ as prune_,
    )
    from .prune import (
        prune_iteratively_ as prune_iteratively_,
    )
    from .report import (
        render_report as render_report,
    )
    from .train import (
        TrainConfig as TrainConfig,
    )
    from .train import (
        evaluate as evaluate,
    )
    from .train import (
        finetune as finetune,
    )
    from .train import (
        fit as fit,
    )
