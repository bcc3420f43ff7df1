"""Reference interpreter of the integer graph: numpy int64, TFLite Micro's arithmetic exactly.

Every op is written from :mod:`edgeslim.quant.spec` (which is transcribed from TFLite's
reference kernels) so that its int8 results equal TFLite Micro's and the generated C's bit
for bit. It is the oracle the exporters check against; speed is secondary.

    values = run(graph, q)            # q: int8 input (1, H, W, C); every tensor by name
    q = quantize_input(graph, x)      # float NCHW batch -> int8 NHWC batch

A graph with several inputs takes a tuple of arrays (one per input, in ``graph.inputs``
order); :func:`run_outputs` returns one array per output, :func:`run_batch` all of them
packed in one row per sample (the layout the C test drivers write).
"""

from __future__ import annotations

import numpy as np

from edgeslim.core.errors import ExportError, ShapeError
from edgeslim.export.int8 import ir, ops_seq
from edgeslim.quant import spec, spec_nonlinear


def inputs_of(graph: ir.Graph, q) -> list[np.ndarray]:
    """``q`` as one array per graph input: a graph with one input takes an array, one with
    several a tuple or list of arrays (in the order of ``graph.inputs``)."""
    several = isinstance(q, (tuple, list)) and all(isinstance(x, np.ndarray) for x in q)
    qs = list(q) if several or len(graph.inputs) > 1 else [q]
    if len(qs) != len(graph.inputs):
        got = len(qs) if isinstance(q, (tuple, list)) else 1
        raise ShapeError(
            f"{graph.name} has {len(graph.inputs)} inputs ({', '.join(graph.inputs)}); got "
            f"{got}: pass a tuple with one array per input"
        )
    return [np.asarray(x) for x in qs]


def batch_size(q) -> int:
    """How many inputs a batch ``q`` holds (an array, or a tuple of arrays, one per input)."""
    return len(q[0]) if isinstance(q, (tuple, list)) else len(q)


def pack(arrays) -> np.ndarray:
    """One row per sample, each array's row flattened, back to back: ``(N, total)``.

    The layout the C test drivers read and write (every input, then every output, of one
    inference after the other); an array (a graph with one input or output) is returned as
    it is.
    """
    if isinstance(arrays, np.ndarray):
        return arrays
    return np.concatenate([np.asarray(a).reshape(len(a), -1) for a in arrays], axis=1)


def output_size(graph: ir.Graph) -> int:
    """Elements of all outputs of one inference (the width of a packed output row)."""
    return sum(graph[name].size for name in graph.outputs)


def run(graph: ir.Graph, q) -> dict[str, np.ndarray]:
    """Execute ``graph`` on one int8 input; return every activation tensor (int64) by name.

    ``q``: one array ``(1, H, W, C)``, or a tuple with one per input for several.
    """
    values = {}
    for name, x in zip(graph.inputs, inputs_of(graph, q), strict=True):
        inp = graph[name]
        where = f"input {name!r}" if len(graph.inputs) > 1 else "input"
        if x.shape != inp.shape:
            raise ShapeError(f"{where} must have shape {inp.shape} (NHWC), got {x.shape}")
        if x.min(initial=0) < spec.INT8_MIN or x.max(initial=0) > spec.INT8_MAX:
            raise ShapeError(f"{where} values must be int8 (in [-128, 127])")
        values[name] = x.astype(np.int64)
    for op in graph.ops:
        out = _KERNELS[type(op)](graph, op, values)
        expected = graph[op.output].shape
        values[op.output] = out.reshape(expected)
    return values


def run_outputs(graph: ir.Graph, q) -> list[np.ndarray]:
    """Each graph output, ``(N, ...)``, for a batch of inputs (an array, or a tuple of
    arrays ``(N, ...)``, one per input)."""
    qs = inputs_of(graph, q)
    if len({len(x) for x in qs}) != 1:
        raise ShapeError(f"the input batches differ in size: {[x.shape for x in qs]}")
    done = [run(graph, [x[i : i + 1] for x in qs]) for i in range(len(qs[0]))]
    return [np.concatenate([v[name] for v in done]) for name in graph.outputs]


def run_batch(graph: ir.Graph, q) -> np.ndarray:
    """The graph output for each input of a batch ``(N, *input shape[1:])``; with several
    inputs ``q`` is a tuple of batches, with several outputs each row holds all of them
    (:func:`pack`: ``(N, output_size(graph))``)."""
    outs = run_outputs(graph, q)
    return outs[0] if len(outs) == 1 else pack(outs)


def quantize_input(graph: ir.Graph, x):
    """A float batch in PyTorch layout (N, C, H, W), (N, C, L) or (N, F) -> int8 graph inputs
    (NHWC; (N, 1, L, C) for (N, C, L)). For a graph with several inputs ``x`` is a tuple of
    batches and so is the result."""
    xs = inputs_of(graph, x) if len(graph.inputs) > 1 else [x]
    qs = [_quantize(graph, name, v) for name, v in zip(graph.inputs, xs, strict=True)]
    return qs[0] if len(graph.inputs) == 1 else tuple(qs)


def _quantize(graph: ir.Graph, name: str, x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 4:
        x = x.transpose(0, 2, 3, 1)
    if x.ndim == 3:  # (N, C, L) -> (N, 1, L, C)
        x = x.transpose(0, 2, 1)[:, None]
    t = graph[name]
    if x.shape[1:] != t.shape[1:]:
        where = f"input {name!r}" if len(graph.inputs) > 1 else "inputs"
        raise ShapeError(f"{where} must have shape (N, {t.shape[1:]}) in NHWC, got {x.shape}")
    return spec.quantize(x, spec.QParams(t.scale, t.zero_point)).astype(np.int8)


def split_outputs(graph: ir.Graph, packed: np.ndarray) -> list[np.ndarray]:
    """Packed output rows ``(N, output_size(graph))`` back into one array per output."""
    packed = np.asarray(packed).reshape(len(packed), -1)
    out, at = [], 0
    for name in graph.outputs:
        t = graph[name]
        out.append(packed[:, at : at + t.size].reshape(len(packed), *t.shape[1:]))
        at += t.size
    return out


def dequantize(graph: ir.Graph, name: str, q: np.ndarray) -> np.ndarray:
    """Float values of tensor ``name`` from its int8 values (NHWC stays NHWC)."""
    t = graph[name]
    return spec.dequantize(q, spec.QParams(t.scale, t.zero_point))


# --------------------------------------------------------------------------------------
# kernels: (graph, op, values) -> int64 output
# --------------------------------------------------------------------------------------


def _windows(x: np.ndarray, kernel, stride, padding, out_hw, fill: int) -> np.ndarray:
    """Sliding windows of ``x`` (H, W, C) padded with ``fill``: (Ho, Wo, C, KH, KW)."""
    top, left, bottom, right = padding
    xp = np.pad(x, ((top, bottom), (left, right), (0, 0)), constant_values=fill)
    win = np.lib.stride_tricks.sliding_window_view(xp, kernel, axis=(0, 1))
    return win[:: stride[0], :: stride[1]][: out_hw[0], : out_hw[1]]


def _conv(graph: ir.Graph, op: ir.Conv2D, values) -> np.ndarray:
    x_t, out_t = graph[op.inputs[0]], graph[op.output]
    w = graph[op.weight].data
    x = values[op.inputs[0]][0] - x_t.qzero  # (H, W, Cin); padding contributes 0
    _, ho, wo, cout = out_t.shape
    kh, kw = w.shape[1:3]
    win = _windows(x, (kh, kw), op.stride, op.padding, (ho, wo), 0)  # (Ho, Wo, Cin, KH, KW)
    if op.depthwise:
        mult = cout // x.shape[2]
        win = np.repeat(win, mult, axis=2)  # output channel oc reads input channel oc // mult
        acc = np.einsum("hwckl,klc->hwc", win, w[0])
    else:
        acc = np.einsum("hwikl,okli->hwo", win, w)
    acc = _accumulate(op, acc, graph[op.bias].data)
    out = spec.requantize(acc, op.multiplier, op.shift, out_t.qzero, op.act_min, op.act_max)
    return out[None]


def _accumulate(op: ir.Layer, products: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """``products + bias``, refusing what an int32 accumulator (TFLite's, the C's) cannot
    hold: there the sum would wrap (undefined behaviour in C) instead of being exact."""
    acc = products + bias
    for what, values in (("sum of products", products), ("sum with the bias", acc)):
        if values.min() < spec.INT32_MIN or values.max() > spec.INT32_MAX:
            raise ExportError(
                f"{op.kind} {op.name!r}: the int32 accumulator overflows ({what} reaches "
                f"{int(np.abs(values).max()):,}); its scales are degenerate (e.g. a tiny "
                "input or weight scale makes the int32 bias huge)"
            )
    return acc


def _fully_connected(graph: ir.Graph, op: ir.FullyConnected, values) -> np.ndarray:
    x = values[op.inputs[0]].reshape(-1) - graph[op.inputs[0]].qzero
    acc = _accumulate(op, graph[op.weight].data @ x, graph[op.bias].data)
    out_t = graph[op.output]
    return spec.requantize(acc, op.multiplier, op.shift, out_t.qzero, op.act_min, op.act_max)


def _elementwise(graph: ir.Graph, op: ir.Add | ir.Mul, values) -> np.ndarray:
    """ADD or MUL of two int8 tensors: their zero points, the output's, the fused clamp."""
    a, b = op.inputs
    kernel = spec.add_int8 if isinstance(op, ir.Add) else spec.mul_int8
    za, zb, zo = graph[a].qzero, graph[b].qzero, graph[op.output].qzero
    return kernel(values[a], za, values[b], zb, op.params, zo, op.act_min, op.act_max)


def _pool(graph: ir.Graph, op: ir.Pool2D, values) -> np.ndarray:
    x = values[op.inputs[0]][0]
    _, ho, wo, _ = graph[op.output].shape
    if op.mode == "max":
        win = _windows(x, op.kernel, op.stride, op.padding, (ho, wo), np.iinfo(np.int64).min)
        out = win.max(axis=(3, 4))
    else:
        total = _windows(x, op.kernel, op.stride, op.padding, (ho, wo), 0).sum(axis=(3, 4))
        ones = np.ones((*x.shape[:2], 1), np.int64)
        count = _windows(ones, op.kernel, op.stride, op.padding, (ho, wo), 0).sum(axis=(3, 4))
        out = spec.rounded_average(total, count)
    return np.clip(out, op.act_min, op.act_max)[None]


def _reshape(graph: ir.Graph, op: ir.Reshape, values) -> np.ndarray:
    return values[op.inputs[0]].reshape(graph[op.output].shape)


def _concat(graph: ir.Graph, op: ir.Concat, values) -> np.ndarray:
    return np.concatenate([values[n] for n in op.inputs], axis=op.axis)


def _softmax(graph: ir.Graph, op: ir.Softmax, values) -> np.ndarray:
    return spec_nonlinear.softmax_int8(values[op.inputs[0]], op.params)


def _requantize(graph: ir.Graph, op: ir.Requantize, values) -> np.ndarray:
    src = op.inputs[0]
    return spec.requantize_int8(
        values[src], graph[src].qzero, op.multiplier, op.shift, graph[op.output].qzero
    )


def _logistic(graph: ir.Graph, op: ir.Logistic, values) -> np.ndarray:
    return spec_nonlinear.logistic_int8(values[op.inputs[0]], op.params)


def _hard_swish(graph: ir.Graph, op: ir.HardSwish, values) -> np.ndarray:
    return spec_nonlinear.hard_swish_int8(values[op.inputs[0]], op.params)


def lookup_table(graph: ir.Graph, op: ir.Op) -> np.ndarray:
    """The 256 outputs of a unary int8 op (:data:`ir.UNARY_LUT_OPS`) for inputs -128..127:
    the table the C backend indexes with ``q + 128``."""
    q = np.arange(spec.INT8_MIN, spec.INT8_MAX + 1, dtype=np.int64)
    table = _KERNELS[type(op)](graph, op, {op.inputs[0]: q})
    if table.min() < spec.INT8_MIN or table.max() > spec.INT8_MAX:
        raise ExportError(f"{op.kind} {op.name!r}: table values outside int8")
    return table


_KERNELS = {
    ir.Conv2D: _conv,
    ir.FullyConnected: _fully_connected,
    ir.Add: _elementwise,
    ir.Pool2D: _pool,
    ir.Reshape: _reshape,
    ir.Concat: _concat,
    ir.Softmax: _softmax,
    ir.Requantize: _requantize,
    ir.Logistic: _logistic,
    ir.HardSwish: _hard_swish,
    ir.Mul: _elementwise,
}
_KERNELS.update(ops_seq.REFERENCE)
