"""spec.py's TFLite Micro additions: multipliers from float32 scales, ReLU6 range, requantize,
and the int8 softmax (gemmlowp fixed point), against hand-worked values and float math."""

import math

import numpy as np
import pytest

from edgeslim.quant import spec
from edgeslim.quant import spec_nonlinear as nl


def test_fc_multiplier_multiplies_scales_in_float32():
    s_in, s_w, s_out = 0.061122696846723557, 0.0017794385785236955, 0.004789016675204039
    assert spec.fc_multiplier(s_in, s_w, s_out) == (1560698470, -5)
    m, shift = spec.conv_multipliers(s_in, np.array([s_w]), s_out)  # double product
    assert (int(m[0]), int(shift[0])) == (1560698469, -5)
    by_hand = float(np.float32(s_in) * np.float32(s_w)) / float(np.float32(s_out))
    assert spec.fc_multiplier(s_in, s_w, s_out) == spec.quantize_multiplier(by_hand)


def test_conv_multipliers_per_channel_from_float32_scales():
    m, shift = spec.conv_multipliers(0.1, np.array([0.01, 0.02, 0.0]), 0.5)
    expect = [
        spec.quantize_multiplier(
            float(np.float32(0.1)) * float(np.float32(s)) / float(np.float32(0.5))
        )
        for s in (0.01, 0.02)
    ]
    assert list(zip(m.tolist(), shift.tolist(), strict=True))[:2] == expect
    assert (m[2], shift[2]) == (0, 0)  # a zero weight scale gives a zero multiplier


def test_tflite_relu6_range_divides_in_float32():
    scale = float(np.float32(6 / 2.5))  # 2.4000000954: 6 / scale = 2.49999996 in double
    assert spec.activation_range("relu6", scale, 0) == (0, 2)
    assert spec.tflite_activation_range("relu6", scale, 0) == (0, 3)  # 6.0f / scale == 2.5f
    assert spec.tflite_activation_range("relu", 0.1, -5) == (-5, 127)
    assert spec.tflite_activation_range(None, 0.1, -5) == (-128, 127)
    assert spec.tflite_activation_range("relu6", 6 / 255, -128) == (-128, 127)


def test_requantize_int8_hand_worked():
    m, shift = spec.requantize_params(0.5, 0.25)  # x2
    assert (m, shift) == (1 << 30, 2)
    q = spec.requantize_int8(np.array([-128, -3, 0, 5, 100]), -3, m, shift, 10)
    assert q.tolist() == [-128, 10, 16, 26, 127]


def test_saturating_shift_and_rounding_half_sum():
    x = np.array([3, -5, 1 << 29, -(1 << 29), (1 << 29) + 1])
    assert nl.saturating_rounding_mul_by_pot(x, 2).tolist() == [
        12,
        -20,
        spec.INT32_MAX,
        spec.INT32_MIN,
        spec.INT32_MAX,
    ]
    assert nl.saturating_rounding_mul_by_pot(np.array([-5, 5, 6]), -1).tolist() == [
        -3,
        3,
        3,
    ]
    assert nl.rounding_half_sum(
        np.array([3, -3, spec.INT32_MAX]), np.array([4, -4, spec.INT32_MAX])
    ).tolist() == [4, -4, spec.INT32_MAX]


def test_fixed_point_exp_and_reciprocal_are_close_to_float():
    a = np.linspace(-31.0, 0.0, 4001)
    raw = np.round(a * 2**26).astype(np.int64)  # Q5.26
    got = nl.exp_on_negative_values(raw, 5) / 2**31
    assert np.max(np.abs(got - np.exp(raw / 2**26))) < 5e-7  # a few Q0.31 steps
    assert nl.exp_on_negative_values(np.array([0]), 5)[0] == spec.INT32_MAX
    x = np.linspace(0, 0.999, 1000)
    got = nl.one_over_one_plus_x_for_x_in_0_1(np.round(x * 2**31).astype(np.int64)) / 2**31
    assert np.max(np.abs(got - 1 / (1 + x))) < 1e-8
    recip, bits = nl.get_reciprocal(np.array([3 << 19]), 12)  # 3.0 in Q12.19
    assert recip[0] / 2**31 * 2.0 ** -bits[0] == pytest.approx(1 / 3, rel=1e-8)


def test_softmax_params_hand_worked():
    # 0.1f * 2^26 = 6710886.5 = 0.80000001 * 2^23 -> m = round(0.80000001 * 2^31), shift 23
    p = nl.softmax_params(0.1)
    assert (p.input_multiplier, p.input_left_shift) == (1717986944, 23)
    assert p.diff_min == -math.floor(31 * 2**26 / 2**23) == -248
    with pytest.raises(ValueError, match="too small"):
        nl.softmax_params(1e-9)


def test_softmax_int8_is_close_to_float_softmax():
    rng = np.random.default_rng(0)
    for scale in (0.02, 0.1, 0.5):
        q = rng.integers(-128, 128, (64, 10))
        got = nl.softmax_int8(q, nl.softmax_params(scale))
        assert got.min() >= -128 and got.max() <= 127
        z = q * np.float32(scale)
        want = np.exp(z - z.max(1, keepdims=True))
        want = want / want.sum(1, keepdims=True) * 256 - 128
        assert np.max(np.abs(got - np.clip(want, -128, 127))) <= 1.0
    # a hand-checked row: two equal maxima share the probability mass
    q = np.array([[10, 20, -5, 127, -128, 0, 0, 3, 100, 127]])
    assert nl.softmax_int8(q, nl.softmax_params(0.1)).tolist() == [
        [-128, -128, -128, -4, -128, -128, -128, -128, -120, -4]
    ]
