"""``.tflite`` writers of the sequence / transformer ops (:mod:`edgeslim.export.int8.ops_seq`).

:func:`install` adds one method per op to :mod:`.tflite_format`'s flattener. Each op is
written with builtins TFLite Micro runs in int8:

- ``Transpose`` -> [RESHAPE] TRANSPOSE [RESHAPE] (the reshapes only where the IR shapes
  differ from the merged shape the permutation works on);
- ``Normalize`` -> MEAN (keep dims) -> SUB -> L2_NORMALIZATION;
- ``Lut`` -> CAST (int8 -> int32) -> ADD 128 (int32) -> GATHER from the 256-entry table;
- ``BatchMatMul`` -> BATCH_MATMUL; ``Gather`` -> GATHER; ``Constant`` -> a constant tensor.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgeslim.export.int8 import ops_seq

OP_CODES = {
    "L2_NORMALIZATION": 11,
    "GATHER": 36,
    "TRANSPOSE": 39,
    "MEAN": 40,
    "SUB": 41,
    "CAST": 53,
    "BATCH_MATMUL": 126,
}
OPTIONS = {
    "L2NormOptions": 12,
    "GatherOptions": 23,
    "ReducerOptions": 27,
    "SubOptions": 28,
    "BatchMatMulOptions": 101,
}
OPTION_SLOTS = {
    "L2NormOptions": ["fused_activation_function"],
    "GatherOptions": ["axis", "batch_dims"],
    "ReducerOptions": ["keep_dims"],
    "SubOptions": ["fused_activation_function"],
    "BatchMatMulOptions": ["adj_x", "adj_y"],
}


def _internal(flat: Any, name: str, shape, dtype: str, scale=None, zp=None, data=None) -> int:
    from edgeslim.export.tflite_format import _TflTensor

    return flat._add(_TflTensor(name, tuple(int(s) for s in shape), dtype, scale, zp, 0, data))


def _reshape(flat: Any, src: int, shape, like, name: str, source: str) -> int:
    """RESHAPE tensor ``src`` to ``shape`` (qparams of IR tensor ``like``); the new index."""
    out = _internal(flat, name, shape, like.dtype, like.scale, like.zero_point)
    new = np.array(shape, np.int32)
    shape_t = flat.const_int32(f"{name}_shape", new)
    fields = {"new_shape": ("Int32Vector", new.tolist())}
    flat.ops.append(_op("RESHAPE", [src, shape_t], [out], "ReshapeOptions", fields, source))
    return out


def _op(code, inputs, outputs, options_type=None, options=None, source=""):
    from edgeslim.export.tflite_format import _TflOp

    return _TflOp(code, inputs, outputs, options_type, options or {}, source)


def _transpose(flat: Any, op: ops_seq.Transpose) -> None:
    x, out = flat.graph[op.inputs[0]], flat.graph[op.output]
    src = flat.tensor(op.inputs[0])
    if tuple(x.shape) != tuple(op.in_shape):
        src = _reshape(flat, src, op.in_shape, x, f"{op.output}_in", op.name)
    perm = flat.const_int32(f"{op.output}_perm", np.array(op.perm, np.int32))
    moved = tuple(op.in_shape[p] for p in op.perm)
    if moved == tuple(out.shape):
        flat.ops.append(_op("TRANSPOSE", [src, perm], [flat.tensor(op.output)], source=op.name))
        return
    mid = _internal(flat, f"{op.output}_t", moved, out.dtype, out.scale, out.zero_point)
    flat.ops.append(_op("TRANSPOSE", [src, perm], [mid], source=op.name))
    shape = np.array(out.shape, np.int32)
    shape_t = flat.const_int32(f"{op.output}_shape", shape)
    fields = {"new_shape": ("Int32Vector", shape.tolist())}
    flat.ops.append(
        _op("RESHAPE", [mid, shape_t], [flat.tensor(op.output)], "ReshapeOptions", fields, op.name)
    )


def _normalize(flat: Any, op: ops_seq.Normalize) -> None:
    x = flat.graph[op.inputs[0]]
    src = flat.tensor(op.inputs[0])
    axis = flat.const_int32(f"{op.output}_axis", np.array([len(x.shape) - 1], np.int32))
    mean = _internal(flat, f"{op.output}_mean", (*x.shape[:-1], 1), "int8", x.scale, x.zero_point)
    keep = {"keep_dims": ("Bool", True)}
    flat.ops.append(_op("MEAN", [src, axis], [mean], "ReducerOptions", keep, op.name))
    scale = np.array([ops_seq.diff_scale(x.qscale)])
    diff = _internal(flat, f"{op.output}_diff", x.shape, "int8", scale, np.zeros(1, np.int64))
    act = {"fused_activation_function": ("Int8", 0)}
    flat.ops.append(_op("SUB", [src, mean], [diff], "SubOptions", act, op.name))
    out = flat.tensor(op.output)
    flat.ops.append(_op("L2_NORMALIZATION", [diff], [out], "L2NormOptions", act, op.name))


def _lut(flat: Any, op: ops_seq.Lut) -> None:
    x, out = flat.graph[op.inputs[0]], flat.graph[op.output]
    src = flat.tensor(op.inputs[0])
    wide = _internal(flat, f"{op.output}_i32", x.shape, "int32")
    flat.ops.append(_op("CAST", [src], [wide], source=op.name))
    offset = flat.const_int32(f"{op.output}_offset", np.array([128], np.int32))
    index = _internal(flat, f"{op.output}_index", x.shape, "int32")
    act = {"fused_activation_function": ("Int8", 0)}
    flat.ops.append(_op("ADD", [wide, offset], [index], "AddOptions", act, op.name))
    data = np.asarray(op.table, np.int8).tobytes()
    table = _internal(flat, f"{op.output}_table", (256,), "int8", out.scale, out.zero_point, data)
    fields = {"axis": ("Int32", 0), "batch_dims": ("Int32", 0)}
    flat.ops.append(
        _op("GATHER", [table, index], [flat.tensor(op.output)], "GatherOptions", fields, op.name)
    )


def _batch_matmul(flat: Any, op: ops_seq.BatchMatMul) -> None:
    inputs = [flat.tensor(n) for n in op.inputs]
    fields = {"adj_x": ("Bool", False), "adj_y": ("Bool", bool(op.adj_y))}
    flat.ops.append(
        _op(
            "BATCH_MATMUL",
            inputs,
            [flat.tensor(op.output)],
            "BatchMatMulOptions",
            fields,
            op.name,
        )
    )


def _constant(flat: Any, op: ops_seq.Constant) -> None:
    from edgeslim.export.tflite_format import _TflTensor

    t = flat.graph[op.output]
    data = np.ascontiguousarray(np.asarray(op.data).reshape(t.shape), np.int8).tobytes()
    flat.index[op.output] = flat._add(
        _TflTensor(op.output, t.shape, t.dtype, t.scale, t.zero_point, 0, data)
    )


def _gather(flat: Any, op: ops_seq.Gather) -> None:
    index = flat.const_int32(f"{op.output}_indices", np.array(op.indices, np.int32))
    fields = {"axis": ("Int32", op.axis), "batch_dims": ("Int32", 0)}
    flat.ops.append(
        _op(
            "GATHER",
            [flat.tensor(op.inputs[0]), index],
            [flat.tensor(op.output)],
            "GatherOptions",
            fields,
            op.name,
        )
    )


WRITERS = {
    "_Transpose": _transpose,
    "_Normalize": _normalize,
    "_Lut": _lut,
    "_BatchMatMul": _batch_matmul,
    "_Constant": _constant,
    "_Gather": _gather,
}


def install(flattener: type, op_codes: dict, options: dict, slots: dict) -> None:
    """Add the writers to the flattener class and the codes / option tables."""
    for name, fn in WRITERS.items():
        setattr(flattener, name, fn)
    op_codes.update(OP_CODES)
    options.update(OPTIONS)
    slots.update(OPTION_SLOTS)
