"""Quantization: one verb, :func:`quantize_`, dispatching on the config's type.

    quantize_(model, Int8PTQ(calibration="mse"), calib=data.calib(256))

Each technique registers a handler with :func:`register`; ``method: NAME`` in a recipe's
``quantize`` stage picks the config class registered under ``NAME``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel
from torch import nn

from edgeslim.core.registry import Registry

FilterFn = Callable[[nn.Module, str], bool]
REGISTRY = Registry("quantize_")
METHODS = REGISTRY.methods  # recipe name -> config class
register = REGISTRY.register


def quantize_(
    model: nn.Module,
    cfg: BaseModel,
    *,
    calib: Any = None,
    filter_fn: FilterFn | None = None,
    **kwargs: Any,
) -> Any:
    """Quantize ``model`` as ``cfg`` says and return the quantized model.

    ``calib`` is calibration data (a tensor of inputs or an iterable of batches) for methods
    that need it; ``filter_fn(module, name)`` restricts which layers are quantized. Layers
    are replaced in place where possible, but graph-mode quantization returns a new
    ``torch.fx.GraphModule`` built from ``model``'s modules: always use the return value.
    Methods that train (QAT, LSQ, BWN, TWN, TTQ) also take ``data=`` (a DataSplits) and
    optionally ``train=`` (a TrainConfig).
    """
    if calib is not None:
        kwargs["calib"] = calib
    if filter_fn is not None:
        kwargs["filter_fn"] = filter_fn
    return REGISTRY.call(model, cfg, **kwargs)


accepted = REGISTRY.accepted


# gptq and smoothquant register their algorithms with the one-shot engine on import
from edgeslim.oneshot.engine import one_shot_  # noqa: E402
from edgeslim.quant.fixedpoint import DynamicFixedPoint, dynamic_fixed_point_  # noqa: E402
from edgeslim.quant.gptq import GPTQ, RTN, rtn_quantize_  # noqa: E402
from edgeslim.quant.mixed import MixedPrecision, mixed_precision_  # noqa: E402
from edgeslim.quant.ptq import Int8PTQ, LayerQParams, int8_ptq_, layer_qparams  # noqa: E402
from edgeslim.quant.qat import LSQ, QAT, qat_  # noqa: E402
from edgeslim.quant.smoothquant import SmoothQuant  # noqa: E402
from edgeslim.quant.ternary import BWN, TTQ, TWN, lowbit_  # noqa: E402

register("int8_ptq", Int8PTQ, int8_ptq_)
register("qat", QAT, qat_)
register("lsq", LSQ, qat_)
register("mixed_precision", MixedPrecision, mixed_precision_)
register("dynamic_fixed_point", DynamicFixedPoint, dynamic_fixed_point_)
register("bwn", BWN, lowbit_)
register("twn", TWN, lowbit_)
register("ttq", TTQ, lowbit_)


def _returning_model(handler: Callable[..., Any]) -> Callable[..., Any]:
    """Adapt an in-place handler that returns a log: keep the log as ``model.quant_info``
    (as every quantize_ handler does) and return the model."""

    def run(model: nn.Module, cfg: BaseModel, **kwargs: Any) -> nn.Module:
        model.quant_info = {"layers": handler(model, cfg, **kwargs)}
        return model

    run.__signature__ = inspect.signature(handler)  # Registry.call checks these keywords
    return run


register("gptq", GPTQ, _returning_model(one_shot_))
register("rtn", RTN, _returning_model(rtn_quantize_))
register("smoothquant", SmoothQuant, _returning_model(one_shot_))

__all__ = [
    "BWN",
    "GPTQ",
    "LSQ",
    "METHODS",
    "QAT",
    "RTN",
    "TTQ",
    "TWN",
    "DynamicFixedPoint",
    "Int8PTQ",
    "LayerQParams",
    "MixedPrecision",
    "SmoothQuant",
    "layer_qparams",
    "quantize_",
    "register",
]
