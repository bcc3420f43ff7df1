"""The int8 integer graph both microcontroller exporters share: ``lower(model, calib)``.

A PyTorch model becomes an :class:`.ir.Graph` (int8 ops on NHWC tensors with TFLite's
quantization parameters) in four steps, one module each:

1. :mod:`.trace`: ``torch.fx`` trace and classification of every node as a float op;
2. :mod:`.fuse`: BatchNorm folded, ReLU / ReLU6 and zero padding fused;
3. :mod:`.qparams`: each tensor's qparams, from a quantized model's quantizers or from
   min-max calibration of a float model;
4. :mod:`.build`: int8 weights, int32 biases, NCHW -> NHWC, fixed-point parameters.

:mod:`.reference` runs the graph in numpy with TFLite Micro's arithmetic (the oracle) and
:mod:`.check` builds the graph and checks it against the PyTorch model.
:func:`edgeslim.export.c.export_c` (C99) and :func:`edgeslim.export.tflite.export_tflite`
(``.tflite``) write it out.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from edgeslim.core.errors import ShapeError
from edgeslim.export.int8 import build, fuse, ir, qparams, trace
from edgeslim.quant.modules import QuantModule

__all__ = ["example_of", "lower"]


def example_of(model: nn.Module, example: Any) -> Any:
    """``example`` or a zero batch of ``model.input_shape`` (zoo models know theirs).

    A model with several inputs gives ``input_shape`` as a tuple of shapes (one per input,
    without the batch dimension) and gets a tuple of zero batches.
    """
    if example is not None:
        return example
    shape = getattr(model, "input_shape", None)
    if shape is None:
        raise ShapeError(
            f"{type(model).__name__} has no input_shape; pass example= or calib= inputs"
        )
    if len(shape) and all(isinstance(s, (tuple, list)) for s in shape):
        return tuple(torch.zeros(1, *s) for s in shape)
    return torch.zeros(1, *shape)


def lower(
    model: nn.Module,
    calib: torch.Tensor | tuple[torch.Tensor, ...],
    *,
    source: qparams.QParamSource | None = None,
    per_channel_fc: bool = False,
    name: str = "model",
) -> ir.Graph:
    """The integer graph of ``model``: trace, classify, fuse, quantize.

    ``calib`` is a batch of inputs ``(N, ...)``, or for a model with several inputs a tuple
    of batches (one per input, in argument order, the same ``N``); the graph then has one
    input per argument and one output per tensor the model returns (a tuple, list or dict of
    tensors). A quantized model (``edgeslim.quantize_``) brings its own qparams
    (:class:`.qparams.QuantizedModelQParams`); a float model is calibrated on ``calib``
    (:class:`.qparams.CalibratedQParams`). Raises :class:`LoweringError` naming every
    unsupported layer, :class:`ShapeError` when ``calib`` does not fit the model's inputs.
    """
    xs = trace.as_inputs(calib)
    if any(x.dim() < 2 or x.shape[0] == 0 for x in xs):
        raise ShapeError("calib must be a non-empty batch of inputs (N, ...)")
    gm = trace.trace(model, xs if len(xs) > 1 else xs[0])
    ops, input_values, output_values = trace.float_ops_io(gm)
    ops = fuse.fuse(ops, output_values)
    if source is None and any(isinstance(m, QuantModule) for m in model.modules()):
        source = qparams.QuantizedModelQParams(gm)
    elif source is None:
        source = qparams.CalibratedQParams(
            qparams.calibrate_ranges(gm, xs if len(xs) > 1 else xs[0])
        )
    return build.build_graph(
        ops,
        input_values,
        output_values,
        [(1, *x.shape[1:]) for x in xs],
        source,
        per_channel_fc=per_channel_fc,
        name=name,
    )
