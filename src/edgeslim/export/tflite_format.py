"""The ``.tflite`` file format: the integer graph as a TFLite flatbuffer.

The file is written with the ``flatbuffers`` runtime directly from the tables of TFLite's
``schema.fbs`` (Model, SubGraph, Tensor, QuantizationParameters, Operator, OperatorCode,
Buffer; field slots as numbered there), so no TensorFlow is needed. Weights are stored in
their own 16-byte aligned buffers; activation tensors point at the empty buffer 0.

PyTorch pads convolutions symmetrically, TFLite's SAME padding puts the odd row at the end:
where the two differ the conv gets an explicit PAD op in front (pad value = the input's zero
point) and VALID padding, so the file computes exactly what the model computes.
:mod:`edgeslim.export.tflite` writes the file and runs it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import flatbuffers
import numpy as np

from edgeslim.core.errors import ExportError
from edgeslim.export.int8 import ir

# BuiltinOperator and BuiltinOptions codes, TensorType, Padding, ActivationFunctionType
# (from tensorflow/lite/schema/schema.fbs)
OP_CODES = {
    "ADD": 0,
    "AVERAGE_POOL_2D": 1,
    "CONCATENATION": 2,
    "CONV_2D": 3,
    "DEPTHWISE_CONV_2D": 4,
    "FULLY_CONNECTED": 9,
    "LOGISTIC": 14,
    "MAX_POOL_2D": 17,
    "MUL": 18,
    "RESHAPE": 22,
    "SOFTMAX": 25,
    "PAD": 34,
    "PADV2": 60,
    "QUANTIZE": 114,
    "HARD_SWISH": 117,
}
OPTIONS = {
    "Conv2DOptions": 1,
    "DepthwiseConv2DOptions": 2,
    "Pool2DOptions": 5,
    "FullyConnectedOptions": 8,
    "SoftmaxOptions": 9,
    "ConcatenationOptions": 10,
    "AddOptions": 11,
    "ReshapeOptions": 17,
    "MulOptions": 21,
    "PadOptions": 22,
    "QuantizeOptions": 89,
}
TENSOR_TYPES = {"int8": 9, "int32": 2, "float32": 0}
NUMPY_TYPES = {"int8": np.int8, "int32": np.dtype("<i4"), "float32": np.dtype("<f4")}
PADDING_SAME, PADDING_VALID = 0, 1
ACTIVATIONS = {None: 0, "relu": 1, "relu6": 3}
SCHEMA_VERSION = 3
FILE_IDENTIFIER = b"TFL3"


# --------------------------------------------------------------------------------------
# IR -> flat list of TFLite tensors and operators
# --------------------------------------------------------------------------------------


@dataclass
class _TflTensor:
    name: str
    shape: tuple[int, ...]
    dtype: str
    scale: np.ndarray | None
    zero_point: np.ndarray | None
    axis: int
    data: bytes | None


@dataclass
class _TflOp:
    code: str
    inputs: list[int]
    outputs: list[int]
    options_type: str | None
    options: dict[str, tuple[str, Any]]  # field slot name -> (flatbuffers type, value)
    source: str  # IR op name, for messages


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int, int]:
    """``(out, before, after)`` of TFLite SAME padding."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return out, total // 2, total - total // 2


def tflite_padding(
    in_hw: tuple[int, int], out_hw: tuple[int, int], kernel, stride, padding
) -> int | None:
    """TFLite's SAME / VALID code for explicit ``padding`` (t, l, b, r), or None if neither.

    Only the rows and columns a window actually reads matter: padding beyond the last window
    (PyTorch's bottom row at stride 2) is ignored.
    """
    top, left = padding[0], padding[1]
    same, valid = True, True
    for i, before in ((0, top), (1, left)):
        out, s_before, _ = _same_padding(in_hw[i], kernel[i], stride[i])
        if (out, s_before) != (out_hw[i], before):
            same = False
        valid_out = math.ceil((in_hw[i] - kernel[i] + 1) / stride[i])
        if (valid_out, 0) != (out_hw[i], before):
            valid = False
    if same:
        return PADDING_SAME
    if valid:
        return PADDING_VALID
    return None


def _activation_code(graph: ir.Graph, op: ir.Op) -> int:
    """The fused activation code of ``op``. A ReLU6 whose 6.0 is beyond int32 on the output's
    scale (a tiny scale: an all but constant output) clamps exactly as a ReLU does, and TFLite
    Micro refuses to prepare it (it quantizes 6.0 first): it is written as a ReLU."""
    out = graph[op.output]
    if out.scale is None:  # a float32 graph: the activation as it is
        return ACTIVATIONS[op.activation]
    if op.activation == "relu6" and 6.0 / np.float32(out.qscale) >= 2.0**31:
        return ACTIVATIONS["relu"]
    return ACTIVATIONS[op.activation]


class _Flattener:
    """Turns the IR graph into TFLite tensors and ops (adding PAD ops where needed)."""

    def __init__(self, graph: ir.Graph) -> None:
        self.graph = graph
        self.tensors: list[_TflTensor] = []
        self.index: dict[str, int] = {}
        self.ops: list[_TflOp] = []

    def tensor(self, name: str) -> int:
        if name not in self.index:
            t = self.graph[name]
            data = None
            if t.is_const:
                data = np.ascontiguousarray(t.data.astype(NUMPY_TYPES[t.dtype])).tobytes()
            self.index[name] = self._add(
                _TflTensor(name, t.shape, t.dtype, t.scale, t.zero_point, t.axis or 0, data)
            )
        return self.index[name]

    def _add(self, t: _TflTensor) -> int:
        self.tensors.append(t)
        return len(self.tensors) - 1

    def const_int32(self, name: str, values: np.ndarray) -> int:
        data = np.ascontiguousarray(values, dtype="<i4").tobytes()
        return self._add(_TflTensor(name, values.shape, "int32", None, None, 0, data))

    def op(self, code, inputs, output, options_type=None, options=None, source="") -> None:
        self.ops.append(
            _TflOp(code, inputs, [self.tensor(output)], options_type, options or {}, source)
        )

    def run(self) -> None:
        for op in self.graph.ops:
            getattr(self, f"_{type(op).__name__}")(op)

    # ---- one method per IR op

    def _Conv2D(self, op: ir.Conv2D) -> None:
        x = self.graph[op.inputs[0]]
        out = self.graph[op.output]
        w = self.graph[op.weight]
        kernel = w.shape[1:3]
        code = tflite_padding(x.shape[1:3], out.shape[1:3], kernel, op.stride, op.padding)
        src = self.tensor(op.inputs[0])
        if code is None:  # explicit padding: PAD (with the zero point) then VALID
            src = self._pad(op, x, src)
            code = PADDING_VALID
        inputs = [src, self.tensor(op.weight), self.tensor(op.bias)]
        fields = {
            "padding": ("Int8", code),
            "stride_w": ("Int32", op.stride[1]),
            "stride_h": ("Int32", op.stride[0]),
        }
        act = ("Int8", _activation_code(self.graph, op))
        if op.depthwise:
            fields["depth_multiplier"] = ("Int32", out.shape[3] // x.shape[3])
            fields["fused_activation_function"] = act
            self.op(
                "DEPTHWISE_CONV_2D", inputs, op.output, "DepthwiseConv2DOptions", fields, op.name
            )
        else:
            fields["fused_activation_function"] = act
            self.op("CONV_2D", inputs, op.output, "Conv2DOptions", fields, op.name)

    def _pad(self, op: ir.Conv2D | ir.Pool2D, x: ir.Tensor, src: int, value=None) -> int:
        top, left, bottom, right = op.padding
        pads = np.array([[0, 0], [top, bottom], [left, right], [0, 0]], np.int32)
        shape = (1, x.shape[1] + top + bottom, x.shape[2] + left + right, x.shape[3])
        padded = self._add(
            _TflTensor(
                f"{x.name}_padded_for_{op.output}", shape, x.dtype, x.scale, x.zero_point, 0, None
            )
        )
        paddings = self.const_int32(f"{x.name}_paddings_for_{op.output}", pads)
        if value is None:  # PAD: the input's zero point
            self.ops.append(_TflOp("PAD", [src, paddings], [padded], "PadOptions", {}, op.name))
            return padded
        fill = self._add(  # PADV2: a constant on the input's qparams
            _TflTensor(
                f"{x.name}_fill_for_{op.output}",
                (1,),
                x.dtype,
                x.scale,
                x.zero_point,
                0,
                np.array([value], NUMPY_TYPES[x.dtype]).tobytes(),
            )
        )
        self.ops.append(_TflOp("PADV2", [src, paddings, fill], [padded], None, {}, op.name))
        return padded

    def _FullyConnected(self, op: ir.FullyConnected) -> None:
        inputs = [self.tensor(op.inputs[0]), self.tensor(op.weight), self.tensor(op.bias)]
        fields = {"fused_activation_function": ("Int8", _activation_code(self.graph, op))}
        self.op("FULLY_CONNECTED", inputs, op.output, "FullyConnectedOptions", fields, op.name)

    def _Add(self, op: ir.Add) -> None:
        fields = {"fused_activation_function": ("Int8", _activation_code(self.graph, op))}
        self.op(
            "ADD", [self.tensor(n) for n in op.inputs], op.output, "AddOptions", fields, op.name
        )

    def _Pool2D(self, op: ir.Pool2D) -> None:
        x, out = self.graph[op.inputs[0]], self.graph[op.output]
        code = tflite_padding(x.shape[1:3], out.shape[1:3], op.kernel, op.stride, op.padding)
        src = self.tensor(op.inputs[0])
        if code is None and op.mode == "max":  # PyTorch's padding: -128 never wins a max
            lowest = -128 if x.dtype == "int8" else np.finfo(np.float32).min  # (float32)
            src, code = self._pad(op, x, src, value=lowest), PADDING_VALID
        if code is None:
            raise ExportError(
                f"{op.name}: pooling padding {op.padding} is neither TFLite SAME nor VALID; "
                "it cannot be written to .tflite (use padding 0)"
            )
        fields = {
            "padding": ("Int8", code),
            "stride_w": ("Int32", op.stride[1]),
            "stride_h": ("Int32", op.stride[0]),
            "filter_width": ("Int32", op.kernel[1]),
            "filter_height": ("Int32", op.kernel[0]),
        }
        code_name = "MAX_POOL_2D" if op.mode == "max" else "AVERAGE_POOL_2D"
        self.op(code_name, [src], op.output, "Pool2DOptions", fields, op.name)

    def _Reshape(self, op: ir.Reshape) -> None:
        # the batch dimension as -1, so that a runtime may resize the input (LiteRT batches)
        shape = np.array(self.graph[op.output].shape, np.int32)
        shape[0] = -1
        shape_t = self.const_int32(f"{op.output}_shape", shape)
        fields = {"new_shape": ("Int32Vector", shape.tolist())}
        self.op(
            "RESHAPE",
            [self.tensor(op.inputs[0]), shape_t],
            op.output,
            "ReshapeOptions",
            fields,
            op.name,
        )

    def _Concat(self, op: ir.Concat) -> None:
        fields = {"axis": ("Int32", op.axis), "fused_activation_function": ("Int8", 0)}
        self.op(
            "CONCATENATION",
            [self.tensor(n) for n in op.inputs],
            op.output,
            "ConcatenationOptions",
            fields,
            op.name,
        )

    def _Softmax(self, op: ir.Softmax) -> None:
        fields = {"beta": ("Float32", op.beta)}
        self.op(
            "SOFTMAX", [self.tensor(op.inputs[0])], op.output, "SoftmaxOptions", fields, op.name
        )

    def _Requantize(self, op: ir.Requantize) -> None:
        self.op("QUANTIZE", [self.tensor(op.inputs[0])], op.output, "QuantizeOptions", {}, op.name)

    def _Logistic(self, op: ir.Logistic) -> None:
        self.op("LOGISTIC", [self.tensor(op.inputs[0])], op.output, source=op.name)

    def _HardSwish(self, op: ir.HardSwish) -> None:
        self.op("HARD_SWISH", [self.tensor(op.inputs[0])], op.output, source=op.name)

    def _Mul(self, op: ir.Mul) -> None:
        fields = {"fused_activation_function": ("Int8", 0)}
        inputs = [self.tensor(n) for n in op.inputs]
        self.op("MUL", inputs, op.output, "MulOptions", fields, op.name)


# field slots of each options table, in schema.fbs order
_OPTION_SLOTS = {
    "Conv2DOptions": ["padding", "stride_w", "stride_h", "fused_activation_function"],
    "DepthwiseConv2DOptions": [
        "padding",
        "stride_w",
        "stride_h",
        "depth_multiplier",
        "fused_activation_function",
    ],
    "Pool2DOptions": [
        "padding",
        "stride_w",
        "stride_h",
        "filter_width",
        "filter_height",
        "fused_activation_function",
    ],
    "FullyConnectedOptions": ["fused_activation_function"],
    "SoftmaxOptions": ["beta"],
    "ConcatenationOptions": ["axis", "fused_activation_function"],
    "AddOptions": ["fused_activation_function"],
    "MulOptions": ["fused_activation_function"],
    "ReshapeOptions": ["new_shape"],
    "PadOptions": [],
    "QuantizeOptions": [],
}


# --------------------------------------------------------------------------------------
# flatbuffer serialization
# --------------------------------------------------------------------------------------


def _vector(b: flatbuffers.Builder, kind: str, values) -> int:
    """A vector of scalars (``kind`` is a flatbuffers Prepend method suffix) or offsets."""
    values = list(values)
    size = {"Int32": 4, "Int64": 8, "Float32": 4, "UOffsetTRelative": 4}[kind]
    b.StartVector(size, len(values), size)
    for v in reversed(values):
        getattr(b, f"Prepend{kind}")(v)
    return b.EndVector()


def _bytes(b: flatbuffers.Builder, data: bytes, alignment: int = 16) -> int:
    """A [ubyte] vector whose first byte is ``alignment``-aligned in the final buffer."""
    b.StartVector(1, len(data), alignment)
    b.head = b.head - len(data)
    b.Bytes[b.head : b.head + len(data)] = data
    return b.EndVector()


def _table(b: flatbuffers.Builder, fields: list[tuple[int, str, Any]]) -> int:
    """A table from ``(slot, type, value)``; offsets must have been created before."""
    b.StartObject(max((slot for slot, _, _ in fields), default=-1) + 1)
    for slot, kind, value in fields:
        if kind == "Offset":
            b.PrependUOffsetTRelativeSlot(slot, value, 0)
        else:
            getattr(b, f"Prepend{kind}Slot")(slot, value, 0 if kind != "Float32" else 0.0)
    return b.EndObject()


def _options(b: flatbuffers.Builder, op: _TflOp) -> int | None:
    if op.options_type is None:
        return None
    fields = []
    for slot, name in enumerate(_OPTION_SLOTS[op.options_type]):
        if name not in op.options:
            continue
        kind, value = op.options[name]
        if kind == "Int32Vector":
            fields.append((slot, "Offset", _vector(b, "Int32", value)))
        else:
            fields.append((slot, kind, value))
    return _table(b, fields)


def serialize(graph: ir.Graph) -> bytes:
    """The ``.tflite`` bytes of ``graph`` (one subgraph whose inputs and outputs are the
    graph's, in order; int8 in and out, or float32 for a float graph from
    :func:`edgeslim.export.tflite_float.lower_float`)."""
    flat = _Flattener(graph)
    input_indices = [flat.tensor(name) for name in graph.inputs]
    flat.run()
    output_indices = [flat.index[name] for name in graph.outputs]
    b = flatbuffers.Builder(1024)

    # buffers: 0 is the empty buffer every activation uses; then one per constant tensor
    buffer_of: list[int] = []
    datas: list[bytes] = []
    for t in flat.tensors:
        if t.data is None:
            buffer_of.append(0)
        else:
            datas.append(t.data)
            buffer_of.append(len(datas))
    data_offsets = [_bytes(b, d) for d in datas]
    buffers = [_table(b, [])] + [_table(b, [(0, "Offset", off)]) for off in data_offsets]

    tensors = []
    for i, t in enumerate(flat.tensors):
        name = b.CreateString(t.name)
        shape = _vector(b, "Int32", t.shape)
        quant = None
        if t.scale is not None:
            scale = _vector(b, "Float32", np.asarray(t.scale, np.float32).tolist())
            zp = _vector(b, "Int64", np.asarray(t.zero_point, np.int64).tolist())
            quant = _table(b, [(2, "Offset", scale), (3, "Offset", zp), (6, "Int32", t.axis)])
        fields = [
            (0, "Offset", shape),
            (1, "Int8", TENSOR_TYPES[t.dtype]),
            (2, "Uint32", buffer_of[i]),
            (3, "Offset", name),
        ]
        if quant is not None:
            fields.append((4, "Offset", quant))
        tensors.append(_table(b, fields))

    codes = sorted({op.code for op in flat.ops}, key=lambda c: OP_CODES[c])
    operators = []
    for op in flat.ops:
        options = _options(b, op)
        inputs = _vector(b, "Int32", op.inputs)
        outputs = _vector(b, "Int32", op.outputs)
        fields = [
            (0, "Uint32", codes.index(op.code)),
            (1, "Offset", inputs),
            (2, "Offset", outputs),
        ]
        if options is not None:
            fields += [(3, "Uint8", OPTIONS[op.options_type]), (4, "Offset", options)]
        operators.append(_table(b, fields))
    opcodes = [
        _table(b, [(0, "Int8", min(OP_CODES[c], 127)), (2, "Int32", 1), (3, "Int32", OP_CODES[c])])
        for c in codes
    ]

    sg_name = b.CreateString(graph.name)
    subgraph = _table(
        b,
        [
            (0, "Offset", _vector(b, "UOffsetTRelative", tensors)),
            (1, "Offset", _vector(b, "Int32", input_indices)),
            (2, "Offset", _vector(b, "Int32", output_indices)),
            (3, "Offset", _vector(b, "UOffsetTRelative", operators)),
            (4, "Offset", sg_name),
        ],
    )
    description = b.CreateString("edgeslim")
    model = _table(
        b,
        [
            (0, "Uint32", SCHEMA_VERSION),
            (1, "Offset", _vector(b, "UOffsetTRelative", opcodes)),
            (2, "Offset", _vector(b, "UOffsetTRelative", [subgraph])),
            (3, "Offset", description),
            (4, "Offset", _vector(b, "UOffsetTRelative", buffers)),
        ],
    )
    b.Finish(model, file_identifier=FILE_IDENTIFIER)
    return bytes(b.Output())


def io_counts(data: bytes) -> tuple[int, int]:
    """How many inputs and outputs the first subgraph of ``.tflite`` bytes has."""
    from flatbuffers import encode, packer, table

    buf = bytearray(data)
    model = table.Table(buf, encode.Get(packer.uoffset, buf, 0))
    subgraphs = model.Offset(4 + 2 * 2)  # Model.subgraphs: field slot 2
    if not subgraphs or not model.VectorLen(subgraphs):
        raise ExportError("the .tflite file has no subgraph")
    sg = table.Table(buf, model.Indirect(model.Vector(subgraphs)))
    return tuple(sg.VectorLen(sg.Offset(4 + 2 * slot)) for slot in (1, 2))  # inputs, outputs


def tensor_indices(graph: ir.Graph) -> dict[str, int]:
    """Index in the ``.tflite`` tensor table of each IR tensor (as :func:`serialize` writes it)."""
    flat = _Flattener(graph)
    for name in graph.inputs:
        flat.tensor(name)
    flat.run()
    return dict(flat.index)


def _install_sequence_ops() -> None:
    from edgeslim.export import tflite_seq

    tflite_seq.install(_Flattener, OP_CODES, OPTIONS, _OPTION_SLOTS)


_install_sequence_ops()
