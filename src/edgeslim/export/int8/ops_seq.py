"""Integer-graph ops of sequence and vision-transformer models: their IR, their fixed-point
parameters and their reference arithmetic (TFLite Micro's, bit for bit).

- :class:`Transpose` (TFLite TRANSPOSE): moves bytes; the input is viewed as ``in_shape``
  (adjacent axes merged, so that any permutation fits in TFLite's 6 dimensions);
- :class:`Normalize`: LayerNorm without its affine part, as three TFLite ops over the last
  axis: MEAN (the input's qparams), SUB (the input's scale, zero point 0: ``x - mean`` is
  exact, and clips only where a value lies more than 127 steps from its row's mean; a
  coarser scale loses the rows of small spread, such as a ViT's class token) and
  L2_NORMALIZATION (output scale 1/128, zero point 0). ``LayerNorm(x) = sqrt(D) * that``
  (its epsilon aside), so the LayerNorm's ``gamma * sqrt(D)`` and ``beta`` follow as a
  1x1 depthwise convolution;
- :class:`Lut`: any int8 -> int8 function (GELU) as its 256 outputs; ``.tflite`` writes it
  as CAST (int8 -> int32), ADD 128 and GATHER from the table;
- :class:`BatchMatMul` (TFLite BATCH_MATMUL): ``a @ b`` (``b`` given transposed when
  ``adj_y``) over equal batch dimensions;
- :class:`Constant`: a parameter used as a tensor (ViT's class token, position embeddings):
  a constant tensor in ``.tflite``, copied from flash into the arena in C;
- :class:`Gather` (TFLite GATHER): chosen indices along one axis (``x[:, 0]``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from edgeslim.core.errors import ExportError
from edgeslim.export.int8 import ir
from edgeslim.quant import spec

L2NORM_OUTPUT_SCALE = 1.0 / 128  # TFLite's int8 L2_NORMALIZATION: fixed output qparams
L2NORM_OUTPUT_ZERO_POINT = 0
DIFF_SCALE = 1.0  # scale of x - mean(x) over the input scale


@dataclass
class SeqOp(ir.Op):
    """Base of these ops: :meth:`prepare` fills fixed-point parameters (none by default)."""

    def prepare(self, t: dict[str, ir.Tensor]) -> None:
        """Compute the op's fixed-point parameters from its tensors' qparams."""


@dataclass
class Transpose(SeqOp):
    """Output bytes = input bytes viewed as ``in_shape``, transposed by ``perm``."""

    perm: tuple[int, ...] = ()
    in_shape: tuple[int, ...] = ()


@dataclass
class Normalize(SeqOp):
    """``(x - mean(x)) / ||x - mean(x)||`` over the last axis (scale 1/128, zero point 0)."""

    mean_multiplier: int = 0
    mean_shift: int = 0
    sub: spec.AddParams | None = None

    def prepare(self, t: dict[str, ir.Tensor]) -> None:
        x = t[self.inputs[0]]
        out = t[self.output]
        if (out.qscale, out.qzero) != (L2NORM_OUTPUT_SCALE, L2NORM_OUTPUT_ZERO_POINT):
            raise ExportError(f"{self.name}: a normalization's output must be 1/128, zp 0")
        depth = x.shape[-1]
        m, s = spec.quantize_multiplier(1.0)  # MEAN keeps the input's qparams
        self.mean_multiplier, self.mean_shift = mean_multiplier(m, s, depth)
        self.sub = spec.add_params(x.qscale, x.qscale, diff_scale(x.qscale))


def diff_scale(input_scale: float) -> float:
    """Scale of ``x - mean(x)`` inside :class:`Normalize` (:data:`DIFF_SCALE` times the
    input's)."""
    return float(spec.to_float32(DIFF_SCALE * float(spec.to_float32(input_scale))))


def mean_multiplier(m: int, shift: int, count: int) -> tuple[int, int]:
    """TFLite's QuantizedMeanOrSum: the multiplier folds in ``1 / count``."""
    n = max(int(count).bit_length() - 1, 0)
    n = min(n, 32, 31 + shift)
    return (m << n) // count, shift - n


@dataclass
class Lut(SeqOp):
    """``out = table[q + 128]``: an int8 function tabulated at export time."""

    table: np.ndarray = field(default_factory=lambda: np.zeros(256, np.int64))
    function: str = ""


@dataclass
class BatchMatMul(SeqOp):
    """``a @ b`` of int8 tensors (``b`` stored transposed when ``adj_y``), TFLite's rules."""

    adj_y: bool = False
    multiplier: int = 0
    shift: int = 0

    def macs(self, graph: ir.Graph) -> int:
        """Multiply-accumulates: one per output and step of the inner dimension."""
        return graph[self.output].size * graph[self.inputs[0]].shape[-1]

    def prepare(self, t: dict[str, ir.Tensor]) -> None:
        a, b = (t[n] for n in self.inputs)
        self.multiplier, self.shift = spec.fc_multiplier(a.qscale, b.qscale, t[self.output].qscale)


@dataclass
class Constant(SeqOp):
    """A constant int8 tensor (``data``, already quantized with the output's qparams)."""

    data: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


@dataclass
class Gather(SeqOp):
    """``take(x, indices, axis)`` on the input's IR shape."""

    axis: int = 0
    indices: tuple[int, ...] = ()


OP_TYPES = (Transpose, Normalize, Lut, BatchMatMul, Constant, Gather)


# --------------------------------------------------------------------------------------
# reference kernels: (graph, op, values) -> int64 output
# --------------------------------------------------------------------------------------


def _transpose(graph: ir.Graph, op: Transpose, values) -> np.ndarray:
    return values[op.inputs[0]].reshape(op.in_shape).transpose(op.perm)


def inv_sqrt_multiplier(acc: int) -> tuple[int, int]:
    """TFLite's GetInvSqrtQuantizedMultiplierExp(acc, reverse_shift=-1): ``(m, shift)``
    with ``1 / sqrt(acc) ~ m * 2^(shift - 31)``, gemmlowp fixed point (Newton-Raphson)."""
    if acc <= 1:
        return spec.INT32_MAX, 0
    shift = 11
    while acc >= 1 << 29:
        acc //= 4
        shift += 1
    clz = 32 - int(acc).bit_length()
    pairs = (clz - 1) // 2 - 1
    shift -= pairs
    acc <<= 2 * pairs

    def mul(a: int, b: int) -> int:
        return int(spec.srdhm(a, b))

    def shl(x: int, e: int) -> int:  # SaturatingRoundingMultiplyByPOT, e > 0
        threshold = (1 << (31 - e)) - 1
        if x > threshold:
            return spec.INT32_MAX
        if x < -threshold:
            return spec.INT32_MIN
        return x * (1 << e)

    fixed_input = acc >> 1  # F3
    half_input = int(spec.rounding_divide_by_pot(fixed_input, 1))
    half_three = (1 << 28) + (1 << 27)
    x = 1 << 28  # F3 one
    for _ in range(5):
        x3 = shl(mul(mul(x, x), x), 6)  # F9 -> F3
        x = shl(mul(half_three, x) - mul(half_input, x3), 3)  # F6 -> F3
    x = mul(x, 1518500250)  # * sqrt(2) / 2 (F0)
    if shift < 0:
        x <<= -shift
        shift = 0
    return x, -shift


def normalize_int8(q: np.ndarray, zp: int, op: Normalize) -> np.ndarray:
    """:class:`Normalize` on rows of ``q`` (last axis), TFLite Micro's MEAN, SUB and
    L2_NORMALIZATION in a row."""
    rows = np.asarray(q, np.int64).reshape(-1, q.shape[-1])
    depth = rows.shape[1]
    shifted = rows.sum(axis=1, keepdims=True) - zp * depth
    mean = spec.multiply_by_quantized_multiplier(shifted, op.mean_multiplier, op.mean_shift)
    mean = np.clip(mean + zp, spec.INT8_MIN, spec.INT8_MAX)
    p = op.sub
    x1 = spec.multiply_by_quantized_multiplier(
        (rows - zp) << p.left_shift, p.input1_multiplier, p.input1_shift
    )
    x2 = spec.multiply_by_quantized_multiplier(
        (mean - zp) << p.left_shift, p.input2_multiplier, p.input2_shift
    )
    diff = spec.multiply_by_quantized_multiplier(x1 - x2, p.output_multiplier, p.output_shift)
    diff = np.clip(diff, spec.INT8_MIN, spec.INT8_MAX)
    out = np.empty_like(diff)
    for r in range(len(diff)):
        m, s = inv_sqrt_multiplier(int((diff[r] * diff[r]).sum()))
        out[r] = spec.multiply_by_quantized_multiplier(diff[r], m, s + 7)
    return np.clip(out, spec.INT8_MIN, spec.INT8_MAX).reshape(q.shape)


def _normalize(graph: ir.Graph, op: Normalize, values) -> np.ndarray:
    return normalize_int8(values[op.inputs[0]], graph[op.inputs[0]].qzero, op)


def _lut(graph: ir.Graph, op: Lut, values) -> np.ndarray:
    return op.table[values[op.inputs[0]] + 128]


def _batch_matmul(graph: ir.Graph, op: BatchMatMul, values) -> np.ndarray:
    a, b = op.inputs
    x = values[a] - graph[a].qzero
    y = values[b] - graph[b].qzero
    if op.adj_y:
        y = np.swapaxes(y, -1, -2)
    acc = x @ y
    if acc.size and (acc.min() < spec.INT32_MIN or acc.max() > spec.INT32_MAX):
        raise ExportError(f"BatchMatMul {op.name!r}: the int32 accumulator overflows")
    return spec.requantize(acc, op.multiplier, op.shift, graph[op.output].qzero)


def _constant(graph: ir.Graph, op: Constant, values) -> np.ndarray:
    return op.data


def _gather(graph: ir.Graph, op: Gather, values) -> np.ndarray:
    x = values[op.inputs[0]].reshape(graph[op.inputs[0]].shape)
    return np.take(x, list(op.indices), axis=op.axis)


REFERENCE = {
    Transpose: _transpose,
    Normalize: _normalize,
    Lut: _lut,
    BatchMatMul: _batch_matmul,
    Constant: _constant,
    Gather: _gather,
}
