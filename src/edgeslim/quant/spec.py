"""Integer arithmetic of int8 inference, exactly as TFLite / TFLite Micro / CMSIS-NN do it.

Everything that must agree bit for bit between edgeslim's fake-quant models, its numpy
reference interpreter, the generated C code and TFLite Micro is defined here, once:

- ``real = (q - zero_point) * scale``. Weights: int8 in [-127, 127], zero point 0, one scale
  per output channel (conv) or per tensor. Activations: int8 [-128, 127], asymmetric, one
  scale and zero point per tensor. Bias: int32, scale ``s_in * s_w[c]``, zero point 0.
- Rounding of real values to integers is *half away from zero* (C's ``round``, TFLite's
  ``TfLiteRound``), not numpy's / torch's half-to-even.
- Requantization by a real multiplier ``M = s_in * s_w[c] / s_out`` uses a 32-bit fixed-point
  multiplier and a power-of-two shift (:func:`quantize_multiplier`), applied with the "double
  rounding" of gemmlowp: :func:`srdhm` then :func:`rounding_divide_by_pot`.

References: Jacob et al. 2018, "Quantization and Training of Neural Networks for Efficient
Integer-Arithmetic-Only Inference" (https://arxiv.org/abs/1712.05877); TFLite's
``kernels/internal/quantization_util.cc`` and ``reference/integer_ops/*.h``; gemmlowp's
``fixedpoint.h``. The integer functions take and return numpy int64 arrays (or Python
ints) so that intermediate products never overflow; results that C keeps in int32 are in
int32 range.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np

INT8_MIN, INT8_MAX = -128, 127
WEIGHT_MIN, WEIGHT_MAX = -127, 127  # weights are symmetric: -128 is never used
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1

IntArray = np.ndarray


# ---------------------------------------------------------------------------- rounding


def round_half_away(x: np.ndarray | float) -> np.ndarray:
    """Round to the nearest integer, ties away from zero (C ``round``). Returns float64."""
    x = np.asarray(x, dtype=np.float64)
    return np.sign(x) * np.floor(np.abs(x) + 0.5)


# ---------------------------------------------------------------------------- qparams


@dataclass(frozen=True)
class QParams:
    """Scale(s) and zero point(s) of a quantized tensor.

    ``scale`` and ``zero_point`` are 1-D arrays: one entry for a per-tensor tensor, one per
    channel (along ``axis``) for a per-channel one.
    """

    scale: np.ndarray  # float64 (C,)
    zero_point: np.ndarray  # int64 (C,)
    qmin: int = INT8_MIN
    qmax: int = INT8_MAX
    axis: int | None = None  # channel axis for per-channel, None for per-tensor

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", np.atleast_1d(np.asarray(self.scale, np.float64)))
        object.__setattr__(self, "zero_point", np.atleast_1d(np.asarray(self.zero_point, np.int64)))
        if self.scale.shape != self.zero_point.shape:
            raise ValueError("scale and zero_point must have the same shape")
        if not np.all(self.scale > 0):
            raise ValueError(f"scales must be > 0, got {self.scale}")

    def _broadcast(self, values: np.ndarray, ndim: int) -> np.ndarray:
        if self.axis is None:
            return values[0] if values.size == 1 else values
        shape = [1] * ndim
        shape[self.axis] = -1
        return values.reshape(shape)


def int_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """``(qmin, qmax)`` of a signed ``bits``-bit integer; symmetric drops the lowest value.

    8 bits: activations [-128, 127], weights [-127, 127]; 4 bits: [-8, 7] / [-7, 7];
    2 bits: [-2, 1] / [-1, 1].
    """
    if not 2 <= bits <= 16:
        raise ValueError(f"bit width must be in 2..16, got {bits}")
    qmax = (1 << (bits - 1)) - 1
    return (-qmax if symmetric else -qmax - 1), qmax


def activation_qparams(rmin: float, rmax: float, bits: int = 8) -> QParams:
    """Asymmetric qparams for values in ``[rmin, rmax]`` (TFLite ChooseQuantizationParams).

    The range is first widened to contain 0 (so 0 is exactly representable). The zero point
    is derived from whichever end gives the smaller error, clamped to [qmin, qmax] ([-128,
    127] for 8 bits), rounded half away from zero. A degenerate range (all zeros, or so
    small that its scale is below float32's smallest normal number) gets scale 1 and zero
    point 0.
    """
    if not (math.isfinite(rmin) and math.isfinite(rmax)) or rmin > rmax:
        raise ValueError(f"activation range must be finite with min <= max, got [{rmin}, {rmax}]")
    rmin, rmax = min(float(rmin), 0.0), max(float(rmax), 0.0)
    lo, hi = int_range(bits, symmetric=False)
    qmin, qmax = float(lo), float(hi)
    scale = (rmax - rmin) / (qmax - qmin)
    if scale < np.finfo(np.float32).tiny:  # all zeros, or only values float32 cannot scale
        return QParams(np.array([1.0]), np.array([0]), lo, hi)
    zp_from_min = qmin - rmin / scale
    zp_from_max = qmax - rmax / scale
    err_min = abs(qmin) + abs(rmin / scale)
    err_max = abs(qmax) + abs(rmax / scale)
    zp = zp_from_min if err_min < err_max else zp_from_max
    nudged = int(min(max(round_half_away(zp), qmin), qmax))
    return QParams(np.array([scale]), np.array([nudged]), lo, hi)


def weight_qparams(w: np.ndarray, axis: int | None = 0, bits: int = 8) -> QParams:
    """Symmetric qparams: ``scale = max|w| / 127`` per channel along ``axis`` (or tensor).

    ``bits`` other than 8 use ``qmax = 2^(bits-1) - 1`` in place of 127. A channel of all
    zeros gets scale 1 (any scale represents it exactly).
    """
    w = np.asarray(w, dtype=np.float64)
    if axis is None:
        amax = np.array([np.abs(w).max(initial=0.0)])
    else:
        amax = np.abs(np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)).max(axis=1, initial=0.0)
    qmin, qmax = int_range(bits, symmetric=True)
    scale = np.where(amax > 0, amax / qmax, 1.0)
    return QParams(scale, np.zeros_like(scale, dtype=np.int64), qmin, qmax, axis)


def quantize(x: np.ndarray, qp: QParams) -> IntArray:
    """``clamp(round(x / scale) + zero_point)`` with half-away rounding; int64 array."""
    x = np.asarray(x, dtype=np.float64)
    scale = qp._broadcast(qp.scale, x.ndim)
    zp = qp._broadcast(qp.zero_point, x.ndim)
    q = round_half_away(x / scale) + zp
    return np.clip(q, qp.qmin, qp.qmax).astype(np.int64)


def dequantize(q: np.ndarray, qp: QParams) -> np.ndarray:
    """``(q - zero_point) * scale`` as float64."""
    q = np.asarray(q, dtype=np.int64)
    scale = qp._broadcast(qp.scale, q.ndim)
    zp = qp._broadcast(qp.zero_point, q.ndim)
    return (q - zp).astype(np.float64) * scale


def quantize_bias(bias: np.ndarray, input_scale: float, weight_scale: np.ndarray) -> IntArray:
    """int32 bias with scale ``input_scale * weight_scale[c]`` and zero point 0 (int64 array)."""
    scale = float(input_scale) * np.asarray(weight_scale, dtype=np.float64)
    q = round_half_away(np.asarray(bias, dtype=np.float64) / scale)
    return np.clip(q, INT32_MIN, INT32_MAX).astype(np.int64)


# ---------------------------------------------------------------------------- multipliers


def quantize_multiplier(real: float) -> tuple[int, int]:
    """``(m, shift)`` with ``real ~= m * 2**(shift - 31)``, ``m`` in [2^30, 2^31) or 0.

    TFLite's QuantizeMultiplier: ``(q, shift) = frexp(real)``; ``m = round(q * 2^31)`` ties
    away from zero; ``m == 2^31`` becomes ``2^30`` with ``shift + 1``; a shift below -31
    (a multiplier too small to matter) gives ``m = shift = 0``.
    """
    if real < 0 or not math.isfinite(real):
        raise ValueError(f"requantization multiplier must be finite and >= 0, got {real}")
    if real == 0.0:
        return 0, 0
    q, shift = math.frexp(real)
    m = int(round_half_away(q * (1 << 31)))
    if m == 1 << 31:
        m //= 2
        shift += 1
    if shift < -31:
        return 0, 0
    if shift > 30:
        raise ValueError(f"requantization multiplier {real} is too large (shift {shift} > 30)")
    return m, shift


def srdhm(a: np.ndarray | int, b: np.ndarray | int) -> IntArray:
    """SaturatingRoundingDoublingHighMul: ``round(a * b / 2^31)`` as gemmlowp computes it.

    ``ab = a * b`` (64-bit); ``nudge = 2^30`` if ``ab >= 0`` else ``1 - 2^30``; the result is
    ``(ab + nudge) / 2^31`` with C's truncating division. ``INT32_MIN * INT32_MIN`` saturates
    to ``INT32_MAX``.
    """
    a = np.asarray(a, dtype=np.int64)
    b = np.asarray(b, dtype=np.int64)
    overflow = (a == INT32_MIN) & (b == INT32_MIN)
    ab = a * b
    nudged = ab + np.where(ab >= 0, 1 << 30, 1 - (1 << 30))
    result = truncating_div_pow2(nudged, 31)
    return np.where(overflow, INT32_MAX, result).astype(np.int64)


def truncating_div_pow2(x: np.ndarray, e: int) -> np.ndarray:
    """``x / 2^e`` rounded toward zero (C integer division), for int64 ``x``."""
    q = np.abs(x) >> e
    return np.where(x < 0, -q, q)


def rounding_divide_by_pot(x: np.ndarray | int, exponent: np.ndarray | int) -> IntArray:
    """RoundingDivideByPOT: ``x / 2^exponent`` rounded to nearest, ties away from zero.

    ``mask = 2^e - 1``; ``remainder = x & mask``; ``threshold = (mask >> 1) + (x < 0)``;
    result ``(x >> e) + (remainder > threshold)`` with an arithmetic right shift.
    """
    x = np.asarray(x, dtype=np.int64)
    e = np.asarray(exponent, dtype=np.int64)
    if np.any((e < 0) | (e > 31)):
        raise ValueError(f"rounding_divide_by_pot exponent must be in [0, 31], got {exponent}")
    mask = (np.int64(1) << e) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (x < 0)
    return (x >> e) + (remainder > threshold)


def multiply_by_quantized_multiplier(
    x: np.ndarray | int, m: np.ndarray | int, shift: np.ndarray | int
) -> IntArray:
    """``x * M`` for ``M = m * 2^(shift - 31)``, TFLite's MultiplyByQuantizedMultiplier.

    ``RDBPOT(SRDHM(x * 2^max(shift, 0), m), max(-shift, 0))``; ``m``/``shift`` may be arrays
    that broadcast against ``x`` (per-channel requantization).
    """
    x = np.asarray(x, dtype=np.int64)
    shift = np.asarray(shift, dtype=np.int64)
    left = np.maximum(shift, 0)
    right = np.maximum(-shift, 0)
    return rounding_divide_by_pot(srdhm(x * (np.int64(1) << left), m), right)


# ---------------------------------------------------------------------------- activations


def activation_range(activation: str | None, scale: float, zero_point: int) -> tuple[int, int]:
    """``(act_min, act_max)`` of an int8 output with a fused activation.

    ``None``: [-128, 127]; ``"relu"``: [max(-128, zp), 127]; ``"relu6"``: additionally
    ``act_max = min(127, zp + round(6 / scale))`` (TFLite CalculateActivationRangeQuantized).
    """
    if activation is None:
        return INT8_MIN, INT8_MAX
    if activation == "relu":
        return max(INT8_MIN, zero_point), INT8_MAX
    if activation == "relu6":
        six = zero_point + int(round_half_away(6.0 / scale))
        return max(INT8_MIN, zero_point), min(INT8_MAX, six)
    raise ValueError(f"unknown fused activation {activation!r}; expected None, 'relu' or 'relu6'")


def requantize(
    acc: np.ndarray,
    m: np.ndarray | int,
    shift: np.ndarray | int,
    zero_point: int,
    act_min: int = INT8_MIN,
    act_max: int = INT8_MAX,
) -> IntArray:
    """int32 accumulator -> int8 output: ``clamp(MBQM(acc, m, shift) + zp, act_min, act_max)``."""
    out = multiply_by_quantized_multiplier(acc, m, shift) + zero_point
    return np.clip(out, act_min, act_max)


# ---------------------------------------------------------------------------- kernels


@dataclass(frozen=True)
class AddParams:
    """Fixed-point parameters of an int8 elementwise add (TFLite PrepareGeneralSubOp/Add)."""

    left_shift: int
    input1_multiplier: int
    input1_shift: int
    input2_multiplier: int
    input2_shift: int
    output_multiplier: int
    output_shift: int

    def values(self) -> list[int]:
        """The fields in declaration order (the order of the C ``add_params_t`` struct)."""
        return [int(getattr(self, f.name)) for f in fields(self)]


ADD_LEFT_SHIFT = 20


def add_params(s1: float, s2: float, s_out: float) -> AddParams:
    """Inputs are rescaled by ``s_i / (2 max(s1, s2))``, the sum by ``2 max / (2^20 s_out)``."""
    twice_max = 2.0 * max(s1, s2)
    m1, sh1 = quantize_multiplier(s1 / twice_max)
    m2, sh2 = quantize_multiplier(s2 / twice_max)
    mo, sho = quantize_multiplier(twice_max / ((1 << ADD_LEFT_SHIFT) * s_out))
    return AddParams(ADD_LEFT_SHIFT, m1, sh1, m2, sh2, mo, sho)


def add_int8(
    q1: np.ndarray,
    zp1: int,
    q2: np.ndarray,
    zp2: int,
    params: AddParams,
    zp_out: int,
    act_min: int = INT8_MIN,
    act_max: int = INT8_MAX,
) -> IntArray:
    """Elementwise int8 add, bit-exact with TFLite's reference ``AddElementwise`` for int8."""
    x1 = (np.asarray(q1, np.int64) - zp1) << params.left_shift
    x2 = (np.asarray(q2, np.int64) - zp2) << params.left_shift
    s1 = multiply_by_quantized_multiplier(x1, params.input1_multiplier, params.input1_shift)
    s2 = multiply_by_quantized_multiplier(x2, params.input2_multiplier, params.input2_shift)
    out = multiply_by_quantized_multiplier(s1 + s2, params.output_multiplier, params.output_shift)
    return np.clip(out + zp_out, act_min, act_max)


def rounded_average(total: np.ndarray, count: np.ndarray | int) -> IntArray:
    """``total / count`` rounded half away from zero, as TFLite's int8 average pool does.

    ``(total + count/2) / count`` for positive totals, ``(total - count/2) / count``
    otherwise, with C's truncating division.
    """
    total = np.asarray(total, dtype=np.int64)
    count = np.asarray(count, dtype=np.int64)
    half = count // 2
    num = np.where(total > 0, total + half, total - half)
    q = np.abs(num) // count
    return np.where(num < 0, -q, q)


# ---------------------------------------------------------------------------- TFLite Micro
# TFLite stores every scale as float32 and derives multipliers from those float32 values,
# so edgeslim's integer graph keeps its scales float32-representable and computes the
# multipliers exactly as TFLite Micro's Prepare functions do.


def to_float32(x: np.ndarray | float) -> np.ndarray:
    """``x`` rounded to float32 and widened back to float64 (how a .tflite stores scales)."""
    return np.asarray(x, dtype=np.float32).astype(np.float64)


def conv_multipliers(
    input_scale: float, weight_scales: np.ndarray, output_scale: float
) -> tuple[IntArray, IntArray]:
    """Per-channel ``(m, shift)`` of a conv / depthwise / per-channel FC layer.

    TFLite's PopulateConvolutionQuantizationParams: ``double(s_in) * double(s_w[c]) /
    double(s_out)`` from the float32 scales, then :func:`quantize_multiplier`.
    """
    s_in, s_out = float(to_float32(input_scale)), float(to_float32(output_scale))
    pairs = [quantize_multiplier(s_in * float(s) / s_out) for s in to_float32(weight_scales)]
    return np.array([m for m, _ in pairs], np.int64), np.array([s for _, s in pairs], np.int64)


def fc_multiplier(input_scale: float, weight_scale: float, output_scale: float) -> tuple[int, int]:
    """``(m, shift)`` of a per-tensor fully connected layer.

    TFLite's GetQuantizedConvolutionMultipler multiplies the two float32 scales *in float32*
    (``double(s_in * s_w)``) before dividing by ``double(s_out)``: a different rounding from
    :func:`conv_multipliers`, which can change the multiplier's last bit.
    """
    product = np.float32(input_scale) * np.float32(weight_scale)  # float32 product, as in C
    return quantize_multiplier(float(product) / float(to_float32(output_scale)))


def tflite_activation_range(
    activation: str | None, scale: float, zero_point: int
) -> tuple[int, int]:
    """``(act_min, act_max)`` exactly as TFLite Micro computes them for an int8 output.

    Like :func:`activation_range`, but ReLU6's upper end is ``zp + round(6.0f / scale)``
    with the division done in *float32* (CalculateActivationRangeQuantized): where
    ``6 / scale`` lies within a float32 rounding step of ``k + 0.5`` the two differ by one.
    """
    if activation != "relu6":
        return activation_range(activation, scale, zero_point)
    six = np.float32(6.0) / np.float32(scale)
    top = zero_point + int(round_half_away(float(six)))
    return max(INT8_MIN, zero_point), min(INT8_MAX, top)


def requantize_params(input_scale: float, output_scale: float) -> tuple[int, int]:
    """``(m, shift)`` of an int8 -> int8 QUANTIZE (requantize): ``double(s_in) / double(s_out)``."""
    return quantize_multiplier(float(to_float32(input_scale)) / float(to_float32(output_scale)))


def requantize_int8(q: np.ndarray, zp_in: int, m: int, shift: int, zp_out: int) -> IntArray:
    """TFLite's reference Requantize: ``clamp(MBQM(q - zp_in, m, shift) + zp_out)``."""
    return requantize(np.asarray(q, np.int64) - zp_in, m, shift, zp_out)


# ---------------------------------------------------------------------------- mul


@dataclass(frozen=True)
class MulParams:
    """Fixed-point parameters of an int8 elementwise multiply (TFLite's CalculateOpDataMul)."""

    multiplier: int
    shift: int


def mul_params(s1: float, s2: float, s_out: float) -> MulParams:
    """``double(s1) * double(s2) / double(s_out)`` from the float32 scales, quantized."""
    a, b, o = (float(to_float32(s)) for s in (s1, s2, s_out))
    return MulParams(*quantize_multiplier(a * b / o))


def mul_int8(
    q1: np.ndarray,
    zp1: int,
    q2: np.ndarray,
    zp2: int,
    params: MulParams,
    zp_out: int,
    act_min: int = INT8_MIN,
    act_max: int = INT8_MAX,
) -> IntArray:
    """int8 multiply (numpy broadcasting), bit-exact with TFLite's ``MulElementwise``."""
    prod = (np.asarray(q1, np.int64) - zp1) * (np.asarray(q2, np.int64) - zp2)
    out = multiply_by_quantized_multiplier(prod, params.multiplier, params.shift) + zp_out
    return np.clip(out, act_min, act_max)
