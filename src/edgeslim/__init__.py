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
    ContainerError,
    DataError,
    EdgeslimError,
    ExportError,
    LoweringError,
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
    "Wanda": "edgeslim.prune",
    "SparseGPT": "edgeslim.prune",
    "quantize_": "edgeslim.quant",
    "GPTQ": "edgeslim.quant",
    "RTN": "edgeslim.quant",
    "SmoothQuant": "edgeslim.quant",
    "compress_sharded": "edgeslim.oneshot.streaming",
    "compress_layerwise": "edgeslim.oneshot.engine",
    "load_text": "edgeslim.data.text",
    "save_hf": "edgeslim.models.hf",
    "Int8PTQ": "edgeslim.quant",
    "QAT": "edgeslim.quant",
    "LSQ": "edgeslim.quant",
    "MixedPrecision": "edgeslim.quant",
    "DynamicFixedPoint": "edgeslim.quant",
    "BWN": "edgeslim.quant",
    "TWN": "edgeslim.quant",
    "TTQ": "edgeslim.quant",
    "layer_qparams": "edgeslim.quant",
    "export_onnx": "edgeslim.export.onnx",
    "OBDPrune": "edgeslim.prune",
    "OBSPrune": "edgeslim.prune",
    "DepthPrune": "edgeslim.prune",
    "NMPrune": "edgeslim.prune",
    "ChannelPrune": "edgeslim.prune",
    "AGPSchedule": "edgeslim.prune",
    "prune_agp_": "edgeslim.prune",
    "sensitivity": "edgeslim.prune",
    "Sensitivity": "edgeslim.prune",
    "english_sentences": "edgeslim.data.text",
    "Recipe": "edgeslim.config",
    "run_recipe": "edgeslim.pipeline",
    "render_report": "edgeslim.report",
    "share_": "edgeslim.share",
    "KMeansShare": "edgeslim.share",
    "HashShare": "edgeslim.share",
    "HashedLinear": "edgeslim.share",
    "HashedConv2d": "edgeslim.share",
    "pack": "edgeslim.codec",
    "unpack": "edgeslim.codec",
    "PackConfig": "edgeslim.codec",
    "export_tflite": "edgeslim.export.tflite",
    "export_c": "edgeslim.export.c",
    "load_device": "edgeslim.profile.devices",
}
_SUBMODULES = {"zoo"}

__all__ = [
    "CheckpointError",
    "ConfigError",
    "ContainerError",
    "DataError",
    "EdgeslimError",
    "ExportError",
    "LoweringError",
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


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only (matches _LAZY)
    from . import zoo as zoo
    from .codec import (
        PackConfig as PackConfig,
    )
    from .codec import (
        pack as pack,
    )
    from .codec import (
        unpack as unpack,
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
    from .data.text import (
        english_sentences as english_sentences,
    )
    from .data.text import (
        load_text as load_text,
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
    from .export.c import (
        export_c as export_c,
    )
    from .export.onnx import (
        export_onnx as export_onnx,
    )
    from .export.tflite import (
        export_tflite as export_tflite,
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
    from .models.hf import (
        save_hf as save_hf,
    )
    from .models.io import (
        load_model as load_model,
    )
    from .models.io import (
        save_model as save_model,
    )
    from .oneshot.engine import (
        compress_layerwise as compress_layerwise,
    )
    from .oneshot.streaming import (
        compress_sharded as compress_sharded,
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
    from .profile.devices import (
        load_device as load_device,
    )
    from .prune import (
        AGPSchedule as AGPSchedule,
    )
    from .prune import (
        ChannelPrune as ChannelPrune,
    )
    from .prune import (
        DepthPrune as DepthPrune,
    )
    from .prune import (
        MagnitudePrune as MagnitudePrune,
    )
    from .prune import (
        NMPrune as NMPrune,
    )
    from .prune import (
        OBDPrune as OBDPrune,
    )
    from .prune import (
        OBSPrune as OBSPrune,
    )
    from .prune import (
        Sensitivity as Sensitivity,
    )
    from .prune import (
        SparseGPT as SparseGPT,
    )
    from .prune import (
        Wanda as Wanda,
    )
    from .prune import (
        apply_masks_ as apply_masks_,
    )
    from .prune import (
        prune_ as prune_,
    )
    from .prune import (
        prune_agp_ as prune_agp_,
    )
    from .prune import (
        prune_iteratively_ as prune_iteratively_,
    )
    from .prune import (
        sensitivity as sensitivity,
    )
    from .quant import (
        BWN as BWN,
    )
    from .quant import (
        GPTQ as GPTQ,
    )
    from .quant import (
        LSQ as LSQ,
    )
    from .quant import (
        QAT as QAT,
    )
    from .quant import (
        RTN as RTN,
    )
    from .quant import (
        TTQ as TTQ,
    )
    from .quant import (
        TWN as TWN,
    )
    from .quant import (
        DynamicFixedPoint as DynamicFixedPoint,
    )
    from .quant import (
        Int8PTQ as Int8PTQ,
    )
    from .quant import (
        MixedPrecision as MixedPrecision,
    )
    from .quant import (
        SmoothQuant as SmoothQuant,
    )
    from .quant import (
        layer_qparams as layer_qparams,
    )
    from .quant import (
        quantize_ as quantize_,
    )
    from .report import (
        render_report as render_report,
    )
    from .share import (
        HashedConv2d as HashedConv2d,
    )
    from .share import (
        HashedLinear as HashedLinear,
    )
    from .share import (
        HashShare as HashShare,
    )
    from .share import (
        KMeansShare as KMeansShare,
    )
    from .share import (
        share_ as share_,
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
