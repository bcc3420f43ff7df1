"""The per-layer integer view of a quantized model: what the int8 exporters read.

:func:`layer_qparams` returns, for every quantized conv / linear layer, exactly the numbers
its integer kernel needs (:class:`LayerQParams`), as numpy arrays on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from torch import nn

from edgeslim.core.errors import ConfigError
from edgeslim.quant import spec
from edgeslim.quant.modules import (
    quant_layers,
)


@dataclass(frozen=True)
class LayerQParams:
    """Everything the integer kernel of one quantized conv / linear layer needs.

    ``weight_int`` has the float weight's shape (int8 values in
    ``[weight.qmin, weight.qmax]``); ``bias_int`` is int32 with scale ``s_in * s_w[c]``;
    ``output`` is None when the layer outputs float (module mode), and then ``multiplier``
    / ``shift`` are None too. ``act_min`` / ``act_max`` already include a fused ReLU/ReLU6.
    """

    name: str
    kind: Literal["conv2d", "linear"]
    input: spec.QParams
    weight: spec.QParams
    weight_int: np.ndarray
    bias_int: np.ndarray | None
    output: spec.QParams | None
    multiplier: np.ndarray | None
    shift: np.ndarray | None
    activation: str | None
    act_min: int
    act_max: int
    weight_bits: int
    stride: tuple[int, ...] = (1, 1)
    padding: tuple[int, ...] = (0, 0)
    dilation: tuple[int, ...] = (1, 1)
    groups: int = 1


def layer_qparams(model: nn.Module) -> dict[str, LayerQParams]:
    """The :class:`LayerQParams` of every quantized conv / linear layer, by module name."""
    out: dict[str, LayerQParams] = {}
    for name, layer in quant_layers(model).items():
        if layer.input_quant.dynamic:
            raise ConfigError(
                f"layer {name!r} quantizes its input dynamically: it has no fixed input "
                "qparams; quantize with activations='static' for integer-only backends"
            )
        layer.freeze()
        wq = layer.weight_quant
        scales = layer.weight_scale.detach().cpu().double().numpy().copy()
        weight = spec.QParams(scales, np.zeros(len(scales), np.int64), wq.qmin, wq.qmax, 0)
        output = None
        if layer.has_output:
            output = spec.QParams(
                layer.out_scale.cpu().double().numpy().copy(),
                layer.out_zero_point.cpu().numpy().copy(),
            )
        conv = isinstance(layer, nn.Conv2d)
        lo, hi = (int(v) for v in layer.act_limits)
        out[name] = LayerQParams(
            name=name,
            kind="conv2d" if conv else "linear",
            input=layer.input_quant.qparams(),
            weight=weight,
            weight_int=layer.weight_int8.cpu().numpy().copy(),
            bias_int=None if layer.bias is None else layer.bias_int32.cpu().numpy().copy(),
            output=output,
            multiplier=layer.multiplier.cpu().numpy().copy() if layer.has_output else None,
            shift=layer.shift.cpu().numpy().copy() if layer.has_output else None,
            activation=layer.act,
            act_min=lo if layer.has_output else spec.INT8_MIN,
            act_max=hi if layer.has_output else spec.INT8_MAX,
            weight_bits=wq.bits,
            stride=tuple(layer.stride) if conv else (1, 1),
            padding=tuple(layer.padding) if conv else (0, 0),
            dilation=tuple(layer.dilation) if conv else (1, 1),
            groups=layer.groups if conv else 1,
        )
    return out
