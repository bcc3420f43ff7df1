"""edgeslim: make trained PyTorch models small and fast enough for the edge, and measure it.

Heavy modules (torch and everything built on it) are imported lazily on first attribute
access, so ``import edgeslim`` and ``edgeslim --help`` stay fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from edgeslim.core.errors import (
    CalibrationError,
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
from edgeslim.core.version import __version__

# public name -> module that defines it
_LAZY = {
    "load_model": "edgeslim.core.models.io",
    "save_model": "edgeslim.core.models.io",
    "load_data": "edgeslim.core.data.datasets",
    "DataSplits": "edgeslim.core.data.datasets",
    "DatasetSplit": "edgeslim.core.data.datasets",
    "Metric": "edgeslim.core.metrics",
    "get_metric": "edgeslim.core.metrics",
    "fit": "edgeslim.core.train",
    "evaluate": "edgeslim.core.train",
    "finetune": "edgeslim.core.train",
    "TrainConfig": "edgeslim.core.train",
    "profile": "edgeslim.profiling",
    "Profile": "edgeslim.profiling",
    "prune_": "edgeslim.prune",
    "MagnitudePrune": "edgeslim.prune",
    "prune_iteratively_": "edgeslim.prune",
    "apply_masks_": "edgeslim.prune",
    "distill": "edgeslim.distillation",
    "KD": "edgeslim.distillation",
    "lowrank_": "edgeslim.lowrank",
    "SVD": "edgeslim.lowrank",
    "ConvDecompose": "edgeslim.lowrank",
    "haar_split": "edgeslim.core.data.transforms",
    "HaarSplit": "edgeslim.core.data.transforms",
    "Wanda": "edgeslim.prune",
    "SparseGPT": "edgeslim.prune",
    "quantize": "edgeslim.quant",
    "quantize_": "edgeslim.quant",
    "GPTQ": "edgeslim.quant",
    "RTN": "edgeslim.quant",
    "SmoothQuant": "edgeslim.quant",
    "compress_sharded": "edgeslim.oneshot.streaming",
    "compress_layerwise": "edgeslim.oneshot.engine",
    "load_text": "edgeslim.core.data.text",
    "save_hf": "edgeslim.core.models.hf",
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
    "export_openvino": "edgeslim.export.openvino",
    "export_executorch": "edgeslim.export.executorch",
    "OBDPrune": "edgeslim.prune",
    "OBSPrune": "edgeslim.prune",
    "DepthPrune": "edgeslim.prune",
    "NMPrune": "edgeslim.prune",
    "ChannelPrune": "edgeslim.prune",
    "AGPSchedule": "edgeslim.prune",
    "prune_agp_": "edgeslim.prune",
    "sensitivity": "edgeslim.prune",
    "Sensitivity": "edgeslim.prune",
    "english_sentences": "edgeslim.core.data.text",
    "Recipe": "edgeslim.pipeline.recipe",
    "run_recipe": "edgeslim.pipeline.runner",
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
    "load_device": "edgeslim.profiling.devices",
    "add_exits_": "edgeslim.dynamic",
    "Exits": "edgeslim.dynamic",
    "ExitTraining": "edgeslim.dynamic",
    "ExitCalibration": "edgeslim.dynamic",
    "train_exits": "edgeslim.dynamic",
    "calibrate_exits": "edgeslim.dynamic",
    "gate_channels_": "edgeslim.dynamic",
    "ChannelGating": "edgeslim.dynamic",
    "FrameCache": "edgeslim.dynamic",
    "add_frame_cache": "edgeslim.dynamic",
    "add_heads": "edgeslim.dynamic",
    "Heads": "edgeslim.dynamic",
    "dynamic_": "edgeslim.dynamic",
    "export_exits": "edgeslim.export.exits",
    "export_exits_c": "edgeslim.export.exits_c",
    "export_heads": "edgeslim.export.multitask",
    "search": "edgeslim.search.engine",
    "SearchResult": "edgeslim.search.engine",
    "Budget": "edgeslim.search.budget",
    "SearchSpace": "edgeslim.search.space",
    "nas": "edgeslim.nas.api",
    "NasResult": "edgeslim.nas.api",
    "BudgetError": "edgeslim.nas.cost",
    "Supernet": "edgeslim.nas.supernet",
    "SupernetSpec": "edgeslim.nas.supernet",
    "SubnetConfig": "edgeslim.nas.supernet",
    "SandwichTraining": "edgeslim.nas.train",
    "train_supernet": "edgeslim.nas.train",
}
_SUBMODULES = {"zoo": "edgeslim.core.models.zoo"}
# packages that register a file format with core's load_model (``.slim``): imported with it
_FORMAT_PLUGINS = ("edgeslim.codec",)

__all__ = [
    "CalibrationError",
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
        return importlib.import_module(_SUBMODULES[name])
    if name in _LAZY:
        if name == "load_model":
            for plugin in _FORMAT_PLUGINS:
                importlib.import_module(plugin)
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'edgeslim' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only (matches _LAZY)
    from edgeslim.codec import (
        PackConfig as PackConfig,
    )
    from edgeslim.codec import (
        pack as pack,
    )
    from edgeslim.codec import (
        unpack as unpack,
    )
    from edgeslim.core.data.datasets import (
        DatasetSplit as DatasetSplit,
    )
    from edgeslim.core.data.datasets import (
        DataSplits as DataSplits,
    )
    from edgeslim.core.data.datasets import (
        load_data as load_data,
    )
    from edgeslim.core.data.text import (
        english_sentences as english_sentences,
    )
    from edgeslim.core.data.text import (
        load_text as load_text,
    )
    from edgeslim.core.data.transforms import (
        HaarSplit as HaarSplit,
    )
    from edgeslim.core.data.transforms import (
        haar_split as haar_split,
    )
    from edgeslim.core.metrics import (
        Metric as Metric,
    )
    from edgeslim.core.metrics import (
        get_metric as get_metric,
    )
    from edgeslim.core.models import zoo as zoo
    from edgeslim.core.models.hf import (
        save_hf as save_hf,
    )
    from edgeslim.core.models.io import (
        load_model as load_model,
    )
    from edgeslim.core.models.io import (
        save_model as save_model,
    )
    from edgeslim.core.train import (
        TrainConfig as TrainConfig,
    )
    from edgeslim.core.train import (
        evaluate as evaluate,
    )
    from edgeslim.core.train import (
        finetune as finetune,
    )
    from edgeslim.core.train import (
        fit as fit,
    )
    from edgeslim.distillation import (
        KD as KD,
    )
    from edgeslim.distillation import (
        distill as distill,
    )
    from edgeslim.export.c import (
        export_c as export_c,
    )
    from edgeslim.export.executorch import (
        export_executorch as export_executorch,
    )
    from edgeslim.export.onnx import (
        export_onnx as export_onnx,
    )
    from edgeslim.export.openvino import (
        export_openvino as export_openvino,
    )
    from edgeslim.export.tflite import (
        export_tflite as export_tflite,
    )
    from edgeslim.lowrank import (
        SVD as SVD,
    )
    from edgeslim.lowrank import (
        ConvDecompose as ConvDecompose,
    )
    from edgeslim.lowrank import (
        lowrank_ as lowrank_,
    )
    from edgeslim.nas.api import NasResult as NasResult
    from edgeslim.nas.api import nas as nas
    from edgeslim.nas.cost import BudgetError as BudgetError
    from edgeslim.nas.supernet import SubnetConfig as SubnetConfig
    from edgeslim.nas.supernet import Supernet as Supernet
    from edgeslim.nas.supernet import SupernetSpec as SupernetSpec
    from edgeslim.nas.train import SandwichTraining as SandwichTraining
    from edgeslim.nas.train import train_supernet as train_supernet
    from edgeslim.oneshot.engine import (
        compress_layerwise as compress_layerwise,
    )
    from edgeslim.oneshot.streaming import (
        compress_sharded as compress_sharded,
    )
    from edgeslim.pipeline.recipe import (
        Recipe as Recipe,
    )
    from edgeslim.pipeline.runner import (
        run_recipe as run_recipe,
    )
    from edgeslim.profiling import (
        Profile as Profile,
    )
    from edgeslim.profiling import (
        profile as profile,
    )
    from edgeslim.profiling.devices import (
        load_device as load_device,
    )
    from edgeslim.prune import (
        AGPSchedule as AGPSchedule,
    )
    from edgeslim.prune import (
        ChannelPrune as ChannelPrune,
    )
    from edgeslim.prune import (
        DepthPrune as DepthPrune,
    )
    from edgeslim.prune import (
        MagnitudePrune as MagnitudePrune,
    )
    from edgeslim.prune import (
        NMPrune as NMPrune,
    )
    from edgeslim.prune import (
        OBDPrune as OBDPrune,
    )
    from edgeslim.prune import (
        OBSPrune as OBSPrune,
    )
    from edgeslim.prune import (
        Sensitivity as Sensitivity,
    )
    from edgeslim.prune import (
        SparseGPT as SparseGPT,
    )
    from edgeslim.prune import (
        Wanda as Wanda,
    )
    from edgeslim.prune import (
        apply_masks_ as apply_masks_,
    )
    from edgeslim.prune import (
        prune_ as prune_,
    )
    from edgeslim.prune import (
        prune_agp_ as prune_agp_,
    )
    from edgeslim.prune import (
        prune_iteratively_ as prune_iteratively_,
    )
    from edgeslim.prune import (
        sensitivity as sensitivity,
    )
    from edgeslim.quant import (
        BWN as BWN,
    )
    from edgeslim.quant import (
        GPTQ as GPTQ,
    )
    from edgeslim.quant import (
        LSQ as LSQ,
    )
    from edgeslim.quant import (
        QAT as QAT,
    )
    from edgeslim.quant import (
        RTN as RTN,
    )
    from edgeslim.quant import (
        TTQ as TTQ,
    )
    from edgeslim.quant import (
        TWN as TWN,
    )
    from edgeslim.quant import (
        DynamicFixedPoint as DynamicFixedPoint,
    )
    from edgeslim.quant import (
        Int8PTQ as Int8PTQ,
    )
    from edgeslim.quant import (
        MixedPrecision as MixedPrecision,
    )
    from edgeslim.quant import (
        SmoothQuant as SmoothQuant,
    )
    from edgeslim.quant import (
        layer_qparams as layer_qparams,
    )
    from edgeslim.quant import (
        quantize as quantize,
    )
    from edgeslim.quant import (
        quantize_ as quantize_,
    )
    from edgeslim.report import (
        render_report as render_report,
    )
    from edgeslim.share import (
        HashedConv2d as HashedConv2d,
    )
    from edgeslim.share import (
        HashedLinear as HashedLinear,
    )
    from edgeslim.share import (
        HashShare as HashShare,
    )
    from edgeslim.share import (
        KMeansShare as KMeansShare,
    )
    from edgeslim.share import (
        share_ as share_,
    )
