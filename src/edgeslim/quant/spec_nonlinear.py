"""The nonlinear int8 kernels, exactly as TFLite Micro computes them: softmax and logistic
with gemmlowp's fixed-point exp and reciprocal, hard swish with its int16 arithmetic.

The linear part of the int8 arithmetic (rounding, qparams, multipliers, requantization,
add / mul) is :mod:`edgeslim.quant.spec`, which this module builds on. References: TFLite's
``reference/integer_ops/{softmax,logistic,hard_swish}.h``, gemmlowp's ``fixedpoint.h``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from edgeslim.quant.spec import (
    INT8_MAX,
    INT8_MIN,
    INT32_MAX,
    INT32_MIN,
    IntArray,
    multiply_by_quantized_multiplier,
    quantize_multiplier,
    round_half_away,
    rounding_divide_by_pot,
    srdhm,
    to_float32,
    truncating_div_pow2,
)

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
    return truncating_div_pow2(num, 1)


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
    out = truncating_div_pow2(ab + nudge, 15)
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
    preshift = truncating_div_pow2(reluish * preshift_out, 15)  # SaturatingDoublingHighMul
    out = rounding_divide_by_pot(preshift, -p.output_exponent) + p.output_zero_point
    return np.clip(out, INT8_MIN, INT8_MAX)
