"""Quantization: two verbs over one registry, dispatching on the config's type.

    qmodel = quantize(model, Int8PTQ(calibration="mse"), calib=data.calib(256))  # new model
    quantize_(model, GPTQ(bits=4), calib=tokens)                                # in place

:func:`quantize` returns a quantized copy and leaves ``model`` untouched; it is the form for
graph-mode quantization (a new ``torch.fx.GraphModule``). :func:`quantize_` changes ``model``
in place (each layer quantizes its own input) and returns its ``quant_info``. Each technique
registers a handler with :func:`register`; ``method: NAME`` in a recipe's ``quantize`` stage
picks the config class registered under ``NAME``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from edgeslim.core.errors import ConfigError
from edgeslim.core.options import Options
from edgeslim.core.selection import FilterFn
from edgeslim.quant.registry import METHODS, REGISTRY

register = REGISTRY.register
accepted = REGISTRY.accepted

quantize = REGISTRY.verb(
    """Return a quantized copy of ``model`` as ``cfg`` says; ``model`` is left untouched.

    Use this form for graph-mode quantization (``Int8PTQ(graph="auto" | "fx")``,
    ``DynamicFixedPoint``), which builds a new ``torch.fx.GraphModule`` from the model.
    ``calib`` is calibration data (a tensor of inputs or an iterable of batches) for methods
    that need it; ``filter_fn(module, name)`` restricts which layers are quantized. Methods
    that train (QAT, LSQ, BWN, TWN, TTQ) also take ``data=`` (a DataSplits) and optionally
    ``train=`` (a TrainConfig). The result carries ``quant_info`` (layers quantized, float
    layers and why ...).
    """,
    in_place=False,
)


def quantize_(
    model: nn.Module,
    cfg: Options,
    *,
    calib: Any = None,
    filter_fn: FilterFn | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Quantize ``model`` in place as ``cfg`` says; returns its ``quant_info``.

    Each layer quantizes its own input (``graph="module"``): a config with
    ``graph="auto"`` is run in module mode here, and one that must build a new graph
    (``graph="fx"``, :class:`DynamicFixedPoint`) is refused -- use :func:`quantize`, which
    returns the new model. Arguments as for :func:`quantize`.
    """
    REGISTRY.handler(cfg)  # an unknown config is a ConfigError before anything else
    if "graph" in type(cfg).model_fields and cfg.graph == "auto":
        cfg = cfg.model_copy(update={"graph": "module"})
    if not cfg.in_place():
        raise ConfigError(
            f"{type(cfg).__name__} builds a new torch.fx graph module, which cannot replace "
            f"{type(model).__name__} in place: use model = edgeslim.quantize(model, cfg, ...)"
        )
    result = REGISTRY.call(model, cfg, calib=calib, filter_fn=filter_fn, **kwargs)
    if result is not model:
        raise ConfigError(
            f"{type(cfg).__name__} returned a new model; use model = edgeslim.quantize(model, cfg)"
        )
    return dict(getattr(model, "quant_info", {}))


from edgeslim.quant.fixedpoint import DynamicFixedPoint  # noqa: E402
from edgeslim.quant.gptq import GPTQ, RTN  # noqa: E402
from edgeslim.quant.mixed import MixedPrecision  # noqa: E402
from edgeslim.quant.ptq import Int8PTQ, LayerQParams, layer_qparams  # noqa: E402
from edgeslim.quant.qat import LSQ, QAT  # noqa: E402
from edgeslim.quant.smoothquant import SmoothQuant  # noqa: E402
from edgeslim.quant.ternary import BWN, TTQ, TWN  # noqa: E402

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
    "quantize",
    "quantize_",
    "register",
]
