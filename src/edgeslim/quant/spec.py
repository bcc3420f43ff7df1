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
    result = _truncating_div_pow2(nudged, 31)
    return np.where(overflow, INT32_MAX, result).astype(np.int64)


def _truncating_div_pow2(x: np.ndarray, e: int) -> np.ndarray:
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


# ---------------------------------------------------------------------------- softmax
# TFLite's int8 softmax (reference_ops::Softmax, used by TFLite Micro) computes exp() and the
# reciprocal of the sum with gemmlowp's fixed-point routines (fixedpoint.h). A value in
# fixed point with I integer bits is an int32 ``raw`` standing for ``raw / 2^(31 - I)``;
# fixed-point multiplication is :func:`srdhm`. Transcribed below on int64 arrays that hold
# int32 values.

SOFTMAX_DIFF_INTEGER_BITS = 5  # input differences in Q5.26
SOFTMAX_ACCUM_INTEGER_BITS = 12  # sum of exponentials in Q12.19
SOFTMAX_OUTPUT_SCALE = 1.0 / 256
SOFTMAX_OUTPUT_ZERO_POINT = -128


def saturating_rounding_mul_by_pot(x: np.ndarray, exponent: int) -> IntArray:
    """``x * 2^exponent``: a saturating left shift, or :func:`rounding_divide_by_pot`."""
    x = np.asarray(x, dtype=np.int64)
    if exponent == 0:
        return x
    if exponent < 0:
        return rounding_divide_by_pot(x, -exponent)
    threshold = (1 << (31 - exponent)) - 1
    shifted = x * (1 << exponent)
    return np.where(x > threshold, INT32_MAX, np.where(x < -threshold, INT32_MIN, shifted))


def rounding_half_sum(a: np.ndarray, b: np.ndarray | int) -> IntArray:
    """``(a + b) / 2`` rounded half away from zero (gemmlowp RoundingHalfSum)."""
    total = np.asarray(a, np.int64) + np.asarray(b, np.int64)
    num = total + np.where(total >= 0, 1, -1)
    return _truncating_div_pow2(num, 1)


def _exp_on_interval_between_negative_one_quarter_and_0_excl(a: np.ndarray) -> IntArray:
    """exp(a) for Q0.31 ``a`` in [-1/4, 0): a Taylor expansion around -1/8."""
    constant_term = 1895147668  # exp(-1/8) in Q0.31
    constant_1_over_3 = 715827883
    x = a + (1 << 28)  # a + 1/8
    x2 = srdhm(x, x)
    x3 = srdhm(x2, x)
    x4 = srdhm(x2, x2)
    x4_over_4 = saturating_rounding_mul_by_pot(x4, -2)
    poly = saturating_rounding_mul_by_pot(srdhm(x4_over_4 + x3, constant_1_over_3) + x2, -1)
    return constant_term + srdhm(constant_term, x + poly)


# exp(-2^k) in Q0.31 for the barrel shifter of exp_on_negative_values, k = -2 .. 4
_EXP_BARREL = (
    (-2, 1672461947),
    (-1, 1302514674),
    (0, 790015084),
    (1, 290630308),
    (2, 39332535),
    (3, 720401),
    (4, 242),
)


def exp_on_negative_values(a: np.ndarray, integer_bits: int) -> IntArray:
    """exp(a) in Q0.31 for ``a <= 0`` given in fixed point with ``integer_bits`` integer bits."""
    a = np.asarray(a, dtype=np.int64)
    fractional_bits = 31 - integer_bits
    one_quarter = 1 << (fractional_bits - 2)
    a_mod_quarter_minus_one_quarter = (a & (one_quarter - 1)) - one_quarter
    result = _exp_on_interval_between_negative_one_quarter_and_0_excl(
        saturating_rounding_mul_by_pot(a_mod_quarter_minus_one_quarter, integer_bits)
    )
    remainder = a_mod_quarter_minus_one_quarter - a
    for exponent, multiplier in _EXP_BARREL:
        if integer_bits > exponent:
            bit = (remainder & (1 << (fractional_bits + exponent))) != 0
            result = np.where(bit, srdhm(result, multiplier), result)
    if integer_bits > 5:
        clamp = -(1 << (36 - integer_bits))  # -32.0
        result = np.where(a < clamp, 0, result)
    return np.where(a == 0, INT32_MAX, result)


def one_over_one_plus_x_for_x_in_0_1(a: np.ndarray) -> IntArray:
    """1 / (1 + a) in Q0.31 for Q0.31 ``a`` in [0, 1): three Newton-Raphson steps in Q2.29."""
    half_denominator = rounding_half_sum(a, INT32_MAX)
    constant_48_over_17 = 1515870810
    constant_neg_32_over_17 = -1010580540
    one_q2 = 1 << 29
    x = constant_48_over_17 + srdhm(half_denominator, constant_neg_32_over_17)
    for _ in range(3):
        half_denominator_times_x = srdhm(half_denominator, x)
        one_minus = one_q2 - half_denominator_times_x
        x = x + saturating_rounding_mul_by_pot(srdhm(x, one_minus), 2)
    return saturating_rounding_mul_by_pot(x, 1)


def get_reciprocal(x: np.ndarray, integer_digits: int) -> tuple[IntArray, IntArray]:
    """``(1 / x)`` as TFLite's GetReciprocal: a Q0.31 mantissa and ``num_bits_over_unit``.

    ``x > 0`` is in fixed point with ``integer_digits`` integer bits.
    """
    x = np.asarray(x, dtype=np.int64)
    _, bit_length = np.frexp(x.astype(np.float64))  # exact for x < 2^53
    headroom_plus_one = 32 - bit_length.astype(np.int64)  # count of leading zeros of uint32 x
    num_bits_over_unit = integer_digits - headroom_plus_one
    shifted_sum_minus_one = (x << headroom_plus_one) - (1 << 31)
    return one_over_one_plus_x_for_x_in_0_1(shifted_sum_minus_one), num_bits_over_unit


@dataclass(frozen=True)
class SoftmaxParams:
    """Fixed-point parameters of an int8 softmax (TFLite Micro's CalculateSoftmaxParams)."""

    input_multiplier: int
    input_left_shift: int
    diff_min: int


def softmax_params(input_scale: float, beta: float = 1.0) -> SoftmaxParams:
    """PreprocessSoftmaxScaling and CalculateInputRadius for 5 integer bits.

    ``M = min(beta * s_in * 2^26, 2^31 - 1)`` is quantized with :func:`quantize_multiplier`
    (a left shift >= 0); differences below ``diff_min = -floor(31 * 2^26 / 2^shift)`` are
    treated as exp(-inf) = 0.
    """
    bits = SOFTMAX_DIFF_INTEGER_BITS
    real = min(float(beta) * float(to_float32(input_scale)) * (1 << (31 - bits)), 2.0**31 - 1)
    if real <= 1.0:
        raise ValueError(
            f"softmax input scale {input_scale} is too small for int8 softmax "
            "(TFLite needs beta * scale * 2^26 > 1)"
        )
    m, shift = quantize_multiplier(real)
    radius = math.floor(((1 << bits) - 1) * (1 << (31 - bits)) / (1 << shift))
    return SoftmaxParams(m, shift, -radius)


def softmax_int8(q: np.ndarray, params: SoftmaxParams) -> IntArray:
    """int8 softmax over the last axis, bit-exact with TFLite's reference kernel.

    The output has scale 1/256 and zero point -128.
    """
    q = np.asarray(q, dtype=np.int64)
    diff = q - q.max(axis=-1, keepdims=True)
    valid = diff >= params.diff_min
    scaled = srdhm(
        np.where(valid, diff, 0) * (1 << params.input_left_shift), params.input_multiplier
    )
    exps = exp_on_negative_values(scaled, SOFTMAX_DIFF_INTEGER_BITS)  # Q0.31
    accum = saturating_rounding_mul_by_pot(exps, -SOFTMAX_ACCUM_INTEGER_BITS)  # Q12.19
    sum_of_exps = np.where(valid, accum, 0).sum(axis=-1, keepdims=True)
    scale, num_bits_over_unit = get_reciprocal(sum_of_exps, SOFTMAX_ACCUM_INTEGER_BITS)
    exponent = num_bits_over_unit + 31 - 8
    out = rounding_divide_by_pot(srdhm(scale, exps), exponent) + INT8_MIN
    out = np.clip(out, INT8_MIN, INT8_MAX)
    return np.where(valid, out, INT8_MIN)


# ---------------------------------------------------------------------------- logistic
# TFLite Micro's int8 LOGISTIC (reference_integer_ops::Logistic, LogisticPrepare): the input
# is rescaled to Q4.27 by a multiplier with a left shift, then gemmlowp's fixed-point
# logistic gives Q0.31, rounded to the fixed output scale 1/256 (zero point -128).

LOGISTIC_INPUT_INTEGER_BITS = 4
LOGISTIC_OUTPUT_SCALE = 1.0 / 256
LOGISTIC_OUTPUT_ZERO_POINT = -128


@dataclass(frozen=True)
class LogisticParams:
    """Fixed-point parameters of an int8 logistic (TFLite Micro's LogisticPrepare)."""

    input_zero_point: int
    input_multiplier: int
    input_left_shift: int
    input_range_radius: int


def logistic_params(input_scale: float, input_zero_point: int) -> LogisticParams:
    """``frexp(s_in * 2^27)`` as a Q0.31 multiplier and shift; inputs beyond the radius
    ``floor(15 * 2^27 / 2^shift)`` saturate to -128 / 127 (CalculateInputRadius)."""
    bits = LOGISTIC_INPUT_INTEGER_BITS
    real = float(to_float32(input_scale)) * (1 << (31 - bits))
    q, shift = math.frexp(real)
    m = int(round_half_away(q * (1 << 31)))
    if m >= 1 << 31 or not 0 <= shift <= 30:  # TFLite would overflow its int32 multiplier
        raise ValueError(f"int8 logistic cannot take input scale {input_scale}")
    radius = math.floor(((1 << bits) - 1) * (1 << (31 - bits)) / (1 << shift))
    return LogisticParams(int(input_zero_point), m, shift, radius)


def logistic_fixed(a: np.ndarray, integer_bits: int) -> IntArray:
    """gemmlowp's ``logistic``: Q0.31 ``1 / (1 + exp(-a))`` of ``a`` in Q``integer_bits``."""
    a = np.asarray(a, dtype=np.int64)
    positive = a > 0
    abs_a = np.where(positive, a, -a)
    if_positive = one_over_one_plus_x_for_x_in_0_1(exp_on_negative_values(-abs_a, integer_bits))
    if_negative = INT32_MAX - if_positive
    return np.where(a == 0, 1 << 30, np.where(positive, if_positive, if_negative))


def logistic_int8(q: np.ndarray, params: LogisticParams) -> IntArray:
    """int8 logistic, bit-exact with TFLite Micro's; output scale 1/256, zero point -128."""
    x = np.asarray(q, dtype=np.int64) - params.input_zero_point
    inside = np.abs(x) < params.input_range_radius
    xq = multiply_by_quantized_multiplier(
        np.where(inside, x, 0), params.input_multiplier, params.input_left_shift
    )
    out = rounding_divide_by_pot(logistic_fixed(xq, LOGISTIC_INPUT_INTEGER_BITS), 31 - 8)
    out = np.clip(out + LOGISTIC_OUTPUT_ZERO_POINT, INT8_MIN, INT8_MAX)
    return np.where(
        x <= -params.input_range_radius,
        INT8_MIN,
        np.where(x >= params.input_range_radius, INT8_MAX, out),
    )


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


# ---------------------------------------------------------------------------- hard swish
# TFLite's int8 HARD_SWISH (reference_ops::HardSwish, HardSwishPrepare): 16-bit fixed point.
# The input, shifted left by 7 bits, is scaled to the output scale and to a "relu-ish"
# value in [0, 1] (x from [-3, 3]), and the two are multiplied.

INT16_MIN, INT16_MAX = -(2**15), 2**15 - 1


@dataclass(frozen=True)
class HardSwishParams:
    """Fixed-point parameters of an int8 hard swish (TFLite Micro's HardSwishPrepare)."""

    input_zero_point: int
    output_zero_point: int
    reluish_multiplier: int  # int16
    reluish_exponent: int
    output_multiplier: int  # int16
    output_exponent: int


def _int16_multiplier(real: float) -> tuple[int, int]:
    """QuantizeMultiplier, then DownScaleInt32ToInt16Multiplier (rounding the top 16 bits)."""
    m, shift = quantize_multiplier(real)
    if m >= INT32_MAX - (1 << 15):
        return INT16_MAX, shift
    return (m + (1 << 15)) >> 16, shift


def hard_swish_params(
    input_scale: float, input_zero_point: int, output_scale: float, output_zero_point: int
) -> HardSwishParams:
    """The scales are combined in float32 as TFLite Micro does, then quantized to 16 bits."""
    f32 = np.float32
    hires = f32(1.0 / 128.0) * f32(input_scale)
    reluish_scale = f32(3.0) / f32(32768.0)
    m_out, e_out = _int16_multiplier(float(hires / f32(output_scale)))
    m_relu, e_relu = _int16_multiplier(float(hires / reluish_scale))
    if not -15 <= e_out <= 0 or not -15 <= e_relu <= 30:
        raise ValueError(
            f"int8 hard swish cannot map input scale {input_scale} to output scale "
            f"{output_scale} (TFLite needs input scale / 128 < output scale)"
        )
    return HardSwishParams(
        int(input_zero_point), int(output_zero_point), m_relu, e_relu, m_out, e_out
    )


def _srdhm16(a: np.ndarray, b: int) -> IntArray:
    """gemmlowp's 16-bit SaturatingRoundingDoublingHighMul."""
    a = np.asarray(a, np.int64)
    ab = a * b
    nudge = np.where(ab >= 0, 1 << 14, 1 - (1 << 14))
    out = _truncating_div_pow2(ab + nudge, 15)
    return np.where((a == INT16_MIN) & (b == INT16_MIN), INT16_MAX, out)


def _sat_shl16(x: np.ndarray, amount: int) -> IntArray:
    return np.clip(np.asarray(x, np.int64) * (1 << amount), INT16_MIN, INT16_MAX)


def hard_swish_int8(q: np.ndarray, p: HardSwishParams) -> IntArray:
    """int8 ``x * relu6(x + 3) / 6``, bit-exact with TFLite's reference kernel."""
    hires = (np.asarray(q, np.int64) - p.input_zero_point) * (1 << 7)
    preshift_out = _srdhm16(hires, p.output_multiplier)
    reluish = hires
    if p.reluish_exponent > 0:
        reluish = _sat_shl16(reluish, p.reluish_exponent - 1)
    reluish = _srdhm16(reluish, p.reluish_multiplier)
    if p.reluish_exponent > 0:
        reluish = _sat_shl16(reluish, 1)
    if p.reluish_exponent < 0:
        reluish = rounding_divide_by_pot(reluish, -p.reluish_exponent)
    reluish = (reluish + (1 << 15)) >> 1
    preshift = _truncating_div_pow2(reluish * preshift_out, 15)  # SaturatingDoublingHighMul
    out = rounding_divide_by_pot(preshift, -p.output_exponent) + p.output_zero_point
    return np.clip(out, INT8_MIN, INT8_MAX)
