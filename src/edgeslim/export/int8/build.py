"""Quantize the fused float ops into the integer graph (:class:`.ir.Graph`).

:func:`build_graph` lowers the ops one by one: qparams of each tensor from a
:class:`.qparams.QParamSource`, int8 weights per output channel (per tensor for fully
connected layers, TFLite's default), int32 biases, and NCHW converted to TFLite's NHWC (a
flatten that feeds a linear layer permutes that layer's weight columns instead of the
data). The graph's fixed-point parameters are then filled in (:func:`.ir.prepare`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from torch import nn

from edgeslim.core.errors import LoweringError
from edgeslim.export.int8 import ir
from edgeslim.export.int8.lower_seq import SeqLowering
from edgeslim.export.int8.qparams import CalibratedQParams, QParamSource
from edgeslim.export.int8.trace import FloatOp, conv_pair
from edgeslim.quant import spec, spec_nonlinear

LOGISTIC_MIN_SCALE = 2.0**-28  # the smallest input scale TFLite's int8 logistic takes


@dataclass
class _Value:
    """An IR tensor and how the PyTorch value maps onto it."""

    tensor: str
    torch_shape: tuple[int, ...]
    nchw_flatten: tuple[int, int, int] | None = None  # (C, H, W) of a flattened feature map
    perm: tuple[int, ...] | None = None  # layout (.lower_seq); None: the CNN ops' layout
    factor: float = 1.0  # a multiply by a number not applied yet (a softmax's beta)


def _nhwc(shape: tuple[int, ...]) -> tuple[int, ...]:
    if len(shape) == 4:
        n, c, h, w = shape
        return (n, h, w, c)
    if len(shape) == 3:  # (N, C, L) of a Conv1d net: a feature map with H = 1
        n, c, length = shape
        return (n, 1, length, c)
    if len(shape) == 2:
        return shape
    raise LoweringError(f"tensors must be (N, C, H, W), (N, C, L) or (N, F), got shape {shape}")


def build_graph(
    ops: list[FloatOp],
    input_value: str | list[str],
    output_value: str | list[str],
    input_shape: tuple[int, ...] | list[tuple[int, ...]],
    source: QParamSource,
    *,
    per_channel_fc: bool = False,
    name: str = "model",
) -> ir.Graph:
    """Quantize the fused float ops into an :class:`ir.Graph` (with fixed-point params).

    ``input_value`` / ``output_value`` / ``input_shape`` are one value (shape) or lists of
    them, one per graph input and output; the inputs are named ``input`` (``input0``,
    ``input1`` ... for several)."""
    several = isinstance(input_value, list)
    input_values = input_value if several else [input_value]
    output_values = output_value if isinstance(output_value, list) else [output_value]
    shapes = input_shape if several else [input_shape]
    b = _Builder(source, per_channel_fc)
    for k, (value, shape) in enumerate(zip(input_values, shapes, strict=True)):
        qp = source.activation(value)
        label = f"input{k}" if len(input_values) > 1 else "input"
        b.values[value] = _Value(b.act(label, _nhwc(shape), qp), shape)
    for o in ops:
        b.lower(o)
    inputs = [b.values[v].tensor for v in input_values]
    outputs = [b.values[v].tensor for v in output_values]
    graph = ir.Graph(
        b.tensors, b.ops, inputs[0], outputs[0], name=name, inputs=inputs, outputs=outputs
    )
    ir.prepare(graph)
    graph.validate()
    return graph


class _Builder(SeqLowering):
    """Accumulates IR tensors and ops while the float ops are lowered one by one."""

    def __init__(self, source: QParamSource, per_channel_fc: bool) -> None:
        self.source = source
        self.per_channel_fc = per_channel_fc
        self.tensors: dict[str, ir.Tensor] = {}
        self.ops: list[ir.Op] = []
        self.values: dict[str, _Value] = {}

    # ---- tensors

    def _unique(self, name: str) -> str:
        base = "".join(c if c.isalnum() else "_" for c in name).strip("_") or "t"
        out, i = base, 1
        while out in self.tensors:
            i += 1
            out = f"{base}_{i}"
        return out

    def act(self, name: str, shape: tuple[int, ...], qp: spec.QParams) -> str:
        name = self._unique(name)
        scale = spec.to_float32(qp.scale)
        self.tensors[name] = ir.Tensor(name, tuple(shape), "int8", scale, qp.zero_point.copy())
        return name

    def same_qparams_as(self, name: str, src: str, shape: tuple[int, ...]) -> str:
        t = self.tensors[src]
        name = self._unique(name)
        self.tensors[name] = ir.Tensor(name, tuple(shape), "int8", t.scale, t.zero_point)
        return name

    def const(self, name: str, data: np.ndarray, dtype: str, scale, axis: int | None) -> str:
        name = self._unique(name)
        scale = np.atleast_1d(np.asarray(scale, np.float64))
        zp = np.zeros(len(scale), np.int64)
        self.tensors[name] = ir.Tensor(
            name, tuple(data.shape), dtype, scale, zp, np.asarray(data, np.int64), axis
        )
        return name

    def _input(self, o: FloatOp, i: int = 0) -> _Value:
        return self._legacy(self.values[o.inputs[i]], o.name)

    def _output(self, o: FloatOp, tensor: str) -> None:
        self.values[o.value] = _Value(tensor, o.shape)

    # ---- ops

    def lower(self, o: FloatOp) -> None:
        if not self.seq_dispatch(o):
            getattr(self, f"_lower_{o.kind}")(o)

    def _weights(self, o: FloatOp, layout: Callable, axis: int | None, x: _Value):
        """int8 weights and int32 bias of a conv / linear, in TFLite layout (``layout``).

        A quantized layer's frozen integers are taken as they are (per output channel);
        float weights are quantized with the source's qparams.
        """
        s_in = self.tensors[x.tensor].qscale
        if "weight_int" in o.attrs:
            wq = layout(o.attrs["weight_int"])
            w_scale = spec.to_float32(o.attrs["weight_scale"])
            bq = o.attrs["bias_int"]
        else:
            w = layout(o.attrs["weight"])
            w_scale = spec.to_float32(self.source.weight(o, w, axis).scale)
            zero = np.zeros(len(w_scale), np.int64)
            wq = spec.quantize(
                w, spec.QParams(w_scale, zero, spec.WEIGHT_MIN, spec.WEIGHT_MAX, axis)
            )
            n_out = w.shape[axis] if axis is not None else w.shape[0]
            per_channel = np.broadcast_to(w_scale, (n_out,)) if len(w_scale) == 1 else w_scale
            bq = spec.quantize_bias(o.attrs["bias"], s_in, per_channel)
        weight = self.const(f"{o.name}.weight", wq, "int8", w_scale, axis)
        bias = self.const(f"{o.name}.bias", bq, "int32", spec.to_float32(s_in * w_scale), 0)
        return weight, bias

    def _layer_input(self, o: FloatOp) -> _Value:
        """The input of a conv / linear, on the qparams the layer was quantized with.

        A quantized layer's input quantizer is the source of truth for the tensor it reads:
        where the tensor's qparams differ (it comes from a qparam-preserving op such as a
        mean / pooling head, whose output the layer's quantizer observed), it is requantized
        to them first -- exactly what the quantized model simulates.
        """
        x = self._input(o)
        if "weight_int" not in o.attrs:
            return x
        qp = o.module.input_quant.qparams()
        t = self.tensors[x.tensor]
        if (spec.to_float32(qp.scale[0]), int(qp.zero_point[0])) == (t.qscale, t.qzero):
            return x
        out = self.act(f"{x.tensor}_requant", t.shape, qp)
        self.ops.append(ir.Requantize(f"{o.name} (input)", [x.tensor], out))
        return _Value(out, x.torch_shape, x.nchw_flatten)

    def _lower_conv(self, o: FloatOp) -> None:
        x = self._layer_input(o)
        conv: nn.Conv2d | nn.Conv1d = o.module

        def as_2d(w: np.ndarray) -> np.ndarray:  # a Conv1d's (Cout, Cin, K): KH = 1
            return w[:, :, None, :] if w.ndim == 3 else w

        if conv.groups == 1:  # (Cout, Cin, KH, KW) -> (Cout, KH, KW, Cin)
            depthwise, axis = False, 0
            weight, bias = self._weights(o, lambda w: as_2d(w).transpose(0, 2, 3, 1), axis, x)
        else:  # depthwise (checked when classified): (Cout, 1, KH, KW) -> (1, KH, KW, Cout)
            depthwise, axis = True, 3
            weight, bias = self._weights(o, lambda w: as_2d(w).transpose(1, 2, 3, 0), axis, x)
        out = self.act(o.value, _nhwc(o.shape), self.source.activation(o.value))
        self.ops.append(
            ir.Conv2D(
                o.name,
                [x.tensor],
                out,
                weight=weight,
                bias=bias,
                stride=conv_pair(conv, conv.stride),
                padding=o.attrs["padding"],
                depthwise=depthwise,
                activation=o.attrs.get("activation"),
            )
        )
        self._output(o, out)

    def _lower_linear(self, o: FloatOp) -> None:
        x = self._layer_input(o)
        if len(x.torch_shape) != 2:
            raise LoweringError(f"{o.name}: Linear needs a (N, F) input, got {x.torch_shape}")

        def layout(w: np.ndarray) -> np.ndarray:  # (Cout, Cin)
            if x.nchw_flatten is None:
                return w
            c, h, wd = x.nchw_flatten  # the input was flattened in NCHW order; ours is NHWC
            return w.reshape(-1, c, h, wd).transpose(0, 2, 3, 1).reshape(w.shape[0], -1)

        per_channel = self.per_channel_fc or "weight_int" in o.attrs
        weight, bias = self._weights(o, layout, 0 if per_channel else None, x)
        out = self.act(o.value, o.shape, self.source.activation(o.value))
        self.ops.append(
            ir.FullyConnected(
                o.name,
                [x.tensor],
                out,
                weight=weight,
                bias=bias,
                activation=o.attrs.get("activation"),
            )
        )
        self._output(o, out)

    def _lower_quant(self, o: FloatOp) -> None:
        """A quantizer: nothing when its qparams are its input's, else a requantize."""
        x = self._input(o)
        qp = self.source.activation(o.value)
        t = self.tensors[x.tensor]
        if (spec.to_float32(qp.scale[0]), int(qp.zero_point[0])) == (t.qscale, t.qzero):
            self.values[o.value] = x
            return
        out = self.act(o.value, t.shape, qp)
        self.ops.append(ir.Requantize(o.name, [x.tensor], out))
        self._output(o, out)

    def _lower_add(self, o: FloatOp) -> None:
        a, b = self._input(o, 0), self._input(o, 1)
        out = self.act(o.value, _nhwc(o.shape), self.source.activation(o.value))
        self.ops.append(
            ir.Add(o.name, [a.tensor, b.tensor], out, activation=o.attrs.get("activation"))
        )
        self._output(o, out)

    def _lower_pool(self, o: FloatOp) -> None:
        x = self._input(o)
        ph, pw = o.attrs["padding"]
        out = self.same_qparams_as(o.value, x.tensor, _nhwc(o.shape))
        self.ops.append(
            ir.Pool2D(
                o.name,
                [x.tensor],
                out,
                mode=o.attrs["mode"],
                kernel=o.attrs["kernel"],
                stride=o.attrs["stride"],
                padding=(ph, pw, ph, pw),
            )
        )
        self._output(o, out)

    def _lower_gap(self, o: FloatOp) -> None:
        x = self._input(o)
        c, h, w = x.torch_shape[1], *self.tensors[x.tensor].shape[1:3]  # (N, C, L): H = 1
        pooled = self.same_qparams_as(o.value, x.tensor, (1, 1, 1, c))
        self.ops.append(
            ir.Pool2D(o.name, [x.tensor], pooled, mode="avg", kernel=(h, w), stride=(h, w))
        )
        if len(o.shape) == 2:  # mean(dim=(2, 3)) without keepdim: (N, C)
            flat = self.same_qparams_as(f"{o.value}_flat", pooled, (1, c))
            self.ops.append(ir.Reshape(o.name, [pooled], flat))
            pooled = flat
        self._output(o, pooled)

    def _lower_flatten(self, o: FloatOp) -> None:
        x = self._input(o)
        src = x.torch_shape
        out = self.same_qparams_as(o.value, x.tensor, o.shape)
        self.ops.append(ir.Reshape(o.name, [x.tensor], out))
        self.values[o.value] = _Value(out, o.shape)
        if len(src) == 4 and src[2] * src[3] > 1:  # NCHW order differs from NHWC
            self.values[o.value].nchw_flatten = (src[1], src[2], src[3])
        if len(src) == 3 and src[2] > 1:  # NCL: a feature map with H = 1
            self.values[o.value].nchw_flatten = (src[1], 1, src[2])

    def _lower_cat(self, o: FloatOp) -> None:
        xs = [self._input(o, i) for i in range(len(o.inputs))]
        rank = len(o.shape)
        dim = o.attrs["dim"] % rank
        axis = {4: (0, 3, 1, 2), 2: (0, 1)}[rank][dim]  # NCHW dim -> NHWC axis
        qp = self.source.activation(o.value)
        out = self.act(o.value, _nhwc(o.shape), qp)
        inputs = []
        for x in xs:  # TFLite's CONCATENATION needs every input on the output's qparams
            t = self.tensors[x.tensor]
            if t.qscale == self.tensors[out].qscale and t.qzero == self.tensors[out].qzero:
                inputs.append(x.tensor)
                continue
            r = self.same_qparams_as(f"{x.tensor}_requant", out, t.shape)
            self.ops.append(ir.Requantize(f"{o.name} (input {x.tensor})", [x.tensor], r))
            inputs.append(r)
        self.ops.append(ir.Concat(o.name, inputs, out, axis=axis))
        self._output(o, out)

    def _lower_softmax(self, o: FloatOp) -> None:
        x = self._input(o)
        rank = len(o.shape)
        dim = o.attrs["dim"]
        if dim is None or (dim % rank) not in ((1,) if rank in (2, 4) else ()):
            raise LoweringError(f"{o.name}: softmax must be over dim 1 (features / channels)")
        qp = spec.QParams(
            np.array([spec_nonlinear.SOFTMAX_OUTPUT_SCALE]),
            np.array([spec_nonlinear.SOFTMAX_OUTPUT_ZERO_POINT]),
        )
        out = self.act(o.value, _nhwc(o.shape), qp)
        self.ops.append(ir.Softmax(o.name, [x.tensor], out))
        self._output(o, out)

    # ---- elementwise activations and multiply

    def _logistic(self, o: FloatOp, x: str) -> str:
        """TFLite LOGISTIC of ``x``: its output has the fixed scale 1/256, zero point -128."""
        qp = spec.QParams(
            np.array([spec_nonlinear.LOGISTIC_OUTPUT_SCALE]),
            np.array([spec_nonlinear.LOGISTIC_OUTPUT_ZERO_POINT]),
        )
        t = self.tensors[x]
        if t.qscale < LOGISTIC_MIN_SCALE:
            # TFLite's logistic needs s_in * 2^27 >= 1/2; values this small (an all but
            # constant tensor) are sigmoid 0.5 anyway: requantized to that scale first
            fine = spec.QParams(np.array([LOGISTIC_MIN_SCALE]), np.array([t.qzero]))
            small = self.act(f"{x}_for_sigmoid", t.shape, fine)
            self.ops.append(ir.Requantize(f"{o.name} (input)", [x], small))
            x = small
        out = self.act(f"{o.value}_sigmoid", t.shape, qp)
        self.ops.append(ir.Logistic(o.name, [x], out))
        return out

    def _lower_sigmoid(self, o: FloatOp) -> None:
        x = self._input(o)
        out = self._logistic(o, x.tensor)
        qp = self.source.activation(o.value)
        t = self.tensors[out]
        same = (spec.to_float32(qp.scale[0]), int(qp.zero_point[0])) == (t.qscale, t.qzero)
        if not (same or isinstance(self.source, CalibratedQParams)):
            # a quantized model's quantizer after the sigmoid: its qparams, as simulated
            req = self.act(o.value, t.shape, qp)
            self.ops.append(ir.Requantize(f"{o.name} (output)", [out], req))
            out = req
        self._output(o, out)

    def _lower_silu(self, o: FloatOp) -> None:
        """SiLU as TFLite writes it: ``x * logistic(x)`` (LOGISTIC, then MUL)."""
        x = self._input(o)
        sig = self._logistic(o, x.tensor)
        out = self.act(o.value, self.tensors[x.tensor].shape, self.source.activation(o.value))
        self.ops.append(ir.Mul(o.name, [x.tensor, sig], out))
        self._output(o, out)

    def _lower_hardswish(self, o: FloatOp) -> None:
        x = self._input(o)
        out = self.act(o.value, self.tensors[x.tensor].shape, self.source.activation(o.value))
        self.ops.append(ir.HardSwish(o.name, [x.tensor], out))
        self._output(o, out)

    def _lower_mul(self, o: FloatOp) -> None:
        a, b = self._input(o, 0), self._input(o, 1)
        out = self.act(o.value, _nhwc(o.shape), self.source.activation(o.value))
        self.ops.append(ir.Mul(o.name, [a.tensor, b.tensor], out))
        self._output(o, out)
