"""quant/spec.py against hand-worked values and a literal, scalar transcription of the rules."""

import math

import numpy as np
import pytest

from edgeslim.quant import spec

# ----------------------------------------------------------------- scalar references
# Written from the rules in REFERENCES.md with Python ints only (no numpy, no shortcuts).


def ref_srdhm(a: int, b: int) -> int:
    if a == b == -(2**31):
        return 2**31 - 1
    ab = a * b
    nudge = 2**30 if ab >= 0 else 1 - 2**30
    num = ab + nudge
    quotient = abs(num) // 2**31  # C division truncates toward zero
    return quotient if num >= 0 else -quotient


def ref_rdbpot(x: int, e: int) -> int:
    mask = (1 << e) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (1 if x < 0 else 0)
    return (x >> e) + (1 if remainder > threshold else 0)


def ref_mbqm(x: int, m: int, shift: int) -> int:
    return ref_rdbpot(ref_srdhm(x * 2 ** max(shift, 0), m), max(-shift, 0))


# ----------------------------------------------------------------- rounding and qparams


def test_round_half_away_differs_from_numpy():
    x = np.array([0.5, 1.5, 2.5, -0.5, -2.5, 2.4999, -2.6])
    assert spec.round_half_away(x).tolist() == [1, 2, 3, -1, -3, 2, -3]
    assert np.round(x).tolist() != spec.round_half_away(x).tolist()


def test_activation_qparams_hand_worked():
    qp = spec.activation_qparams(-1.0, 1.0)  # scale 2/255, zero point -0.5 -> -1 (away from 0)
    assert qp.scale[0] == 2 / 255 and qp.zero_point[0] == -1
    qp = spec.activation_qparams(0.0, 6.0)
    assert qp.scale[0] == 6 / 255 and qp.zero_point[0] == -128
    qp = spec.activation_qparams(0.5, 2.0)  # widened to [0, 2]
    assert qp.scale[0] == 2 / 255 and qp.zero_point[0] == -128
    qp = spec.activation_qparams(-3.0, -1.0)  # widened to [-3, 0]
    assert qp.scale[0] == 3 / 255 and qp.zero_point[0] == 127
    assert spec.activation_qparams(0.0, 0.0).scale[0] == 1.0
    with pytest.raises(ValueError, match="finite"):
        spec.activation_qparams(1.0, float("nan"))
    with pytest.raises(ValueError, match="min <= max"):
        spec.activation_qparams(2.0, 1.0)


def test_weight_qparams_per_channel_and_quantize_round_trip():
    w = np.array([[0.5, -1.27, 0.0], [0.0, 0.0, 0.0], [2.54, 0.01, -0.005]])
    qp = spec.weight_qparams(w, axis=0)
    assert np.allclose(qp.scale, [0.01, 1.0, 0.02]) and qp.zero_point.tolist() == [0, 0, 0]
    q = spec.quantize(w, qp)
    # 0.005 / 0.02 = 0.25 -> 0 ; -0.005 / 0.02 = -0.25 -> 0 ; 0.01/0.02 = 0.5 -> 1 (away from 0)
    assert q.tolist() == [[50, -127, 0], [0, 0, 0], [127, 1, 0]]
    assert np.allclose(spec.dequantize(q, qp), [[0.5, -1.27, 0], [0, 0, 0], [2.54, 0.02, 0]])
    per_tensor = spec.weight_qparams(w, axis=None)
    assert per_tensor.scale.tolist() == [0.02]


def test_quantize_clamps_and_bias_scale():
    qp = spec.QParams(np.array([0.1]), np.array([-10]))
    assert spec.quantize(np.array([-100.0, 0.0, 0.05, 100.0]), qp).tolist() == [-128, -10, -9, 127]
    bias = spec.quantize_bias(np.array([0.3, -0.3, 1e9]), 0.1, np.array([0.02, 0.02, 0.02]))
    assert bias.tolist() == [150, -150, 2**31 - 1]  # scale 0.002; saturates to int32
    with pytest.raises(ValueError, match="scales must be > 0"):
        spec.QParams(np.array([0.0]), np.array([0]))


# ----------------------------------------------------------------- multipliers


def test_quantize_multiplier_hand_worked():
    assert spec.quantize_multiplier(0.5) == (2**30, 0)
    assert spec.quantize_multiplier(1.0) == (2**30, 1)
    assert spec.quantize_multiplier(0.75) == (1610612736, 0)
    assert spec.quantize_multiplier(0.0) == (0, 0)
    # q * 2^31 = 2^30 + 0.5 exactly: ties go away from zero (half-to-even would give 2^30)
    assert spec.quantize_multiplier(0.5 + 2**-32) == (2**30 + 1, 0)
    # q rounds up to 2^31: halved, shift + 1
    assert spec.quantize_multiplier(1 - 2**-33) == (2**30, 1)
    # shift below -31: too small to matter
    assert spec.quantize_multiplier(2**-40) == (0, 0)
    m, shift = spec.quantize_multiplier(0.0123)
    assert 2**30 <= m < 2**31 and abs(m * 2.0 ** (shift - 31) - 0.0123) < 1e-11
    with pytest.raises(ValueError, match=">= 0"):
        spec.quantize_multiplier(-0.5)


def test_srdhm_hand_worked():
    assert spec.srdhm(2**30, 2**30) == 2**29
    assert spec.srdhm(3, 2**30) == 2  # 1.5 -> 2
    assert spec.srdhm(-3, 2**30) == -1  # -1.5 -> -1: gemmlowp's nudge 1 - 2^30 is just below half
    assert spec.srdhm(-(2**31), -(2**31)) == 2**31 - 1  # the one overflow saturates
    assert spec.srdhm(-(2**31), 2**30) == -(2**30)


def test_rounding_divide_by_pot_hand_worked():
    x = np.array([5, -5, -3, 6, 7, -7, 0, 1, -1])
    e = np.array([1, 1, 2, 2, 0, 3, 5, 1, 1])
    # 2.5->3, -2.5->-3, -0.75->-1, 1.5->2, 7, -0.875->-1, 0, 0.5->1, -0.5->-1
    assert spec.rounding_divide_by_pot(x, e).tolist() == [3, -3, -1, 2, 7, -1, 0, 1, -1]
    with pytest.raises(ValueError, match="exponent"):
        spec.rounding_divide_by_pot(1, 32)


def test_multiply_by_quantized_multiplier_matches_scalar_reference():
    assert spec.multiply_by_quantized_multiplier(1000, 1610612736, 0) == 750
    assert spec.multiply_by_quantized_multiplier(1001, 1610612736, 0) == 751  # 750.75
    rng = np.random.default_rng(0)
    x = rng.integers(-(2**20), 2**20, 4000)
    reals = np.exp(rng.uniform(math.log(1e-6), math.log(3.9), 4000))
    mults = [spec.quantize_multiplier(float(r)) for r in reals]
    m = np.array([a for a, _ in mults])
    shift = np.array([b for _, b in mults])
    got = spec.multiply_by_quantized_multiplier(x, m, shift)
    expected = [ref_mbqm(int(a), int(b), int(c)) for a, b, c in zip(x, m, shift, strict=True)]
    assert got.tolist() == expected
    # and it is the real product, to within one unit
    assert np.all(np.abs(got - x * reals) <= 1.0)


def test_srdhm_and_rdbpot_match_scalar_reference_on_random_int32():
    rng = np.random.default_rng(1)
    a = rng.integers(-(2**31), 2**31, 3000)
    b = rng.integers(0, 2**31, 3000)
    e = rng.integers(0, 32, 3000)
    assert spec.srdhm(a, b).tolist() == [
        ref_srdhm(int(p), int(q)) for p, q in zip(a, b, strict=True)
    ]
    got = spec.rounding_divide_by_pot(a, e).tolist()
    assert got == [ref_rdbpot(int(p), int(q)) for p, q in zip(a, e, strict=True)]


# ----------------------------------------------------------------- activations and kernels


def test_activation_range():
    assert spec.activation_range(None, 0.1, 5) == (-128, 127)
    assert spec.activation_range("relu", 0.1, -20) == (-20, 127)
    assert spec.activation_range("relu6", 0.05, -10) == (-10, 110)  # -10 + round(120)
    assert spec.activation_range("relu6", 6 / 255, -128) == (-128, 127)
    with pytest.raises(ValueError, match="unknown fused activation"):
        spec.activation_range("gelu", 0.1, 0)


def test_requantize_per_channel():
    acc = np.array([[100, 100], [-100, 41], [1000, -1000]])  # (N, C)
    m = np.array([1610612736, 2**30])  # channel 0: 0.75; channel 1: 0.5 * 2^-1 = 0.25
    shift = np.array([0, -1])
    out = spec.requantize(acc, m, shift, zero_point=3)
    # 75+3, 25+3 ; -75+3 ; 753 and -247 clamp to int8.
    # 41 * 0.25 = 10.25, but double rounding gives 11: SRDHM rounds 41 * 0.5 = 20.5 up to 21,
    # then RDBPOT rounds 21 / 2 = 10.5 up to 11 -- exactly what TFLite computes.
    assert out.tolist() == [[78, 28], [-72, 14], [127, -128]]
    relu = spec.requantize(acc, m, shift, zero_point=3, act_min=3, act_max=127)
    assert relu[:, 0].tolist() == [78, 3, 127]


def test_add_int8_hand_worked():
    params = spec.add_params(0.5, 0.25, 0.5)
    assert (params.input1_multiplier, params.input1_shift) == (2**30, 0)
    assert (params.input2_multiplier, params.input2_shift) == (2**30, -1)
    assert (params.output_multiplier, params.output_shift) == (2**30, -18)
    # 10 * 0.5 + 8 * 0.25 = 7.0 -> 14 at scale 0.5
    out = spec.add_int8(np.array([10]), 0, np.array([8]), 0, params, 0)
    assert out.tolist() == [14]
    # with zero points and a relu clamp
    out = spec.add_int8(np.array([-20, 30]), 4, np.array([-12, 0]), -4, params, -6, -6, 127)
    # (-24 * 0.5 + -8 * 0.25) / 0.5 = -28 -> -34 -> clamped to -6; (13 + 1) / .5 = 28 -> 22
    assert out.tolist() == [-6, 22]


def test_rounded_average():
    totals = np.array([7, -7, -5, 6, 0, -2])
    counts = np.array([2, 2, 4, 4, 9, 4])
    # 3.5->4, -3.5->-4, -1.25->-1, 1.5->2, 0, -0.5->-1
    assert spec.rounded_average(totals, counts).tolist() == [4, -4, -1, 2, 0, -1]


def test_activation_qparams_of_a_range_float32_cannot_scale():
    """Regression (issue 13 matrix, EfficientNet): denormal activations gave scale 0 in
    float32 and a raw ValueError at freeze; such a range is degenerate (scale 1)."""
    from edgeslim.quant import spec as s

    qp = s.activation_qparams(-5e-40, 5.7e-40)
    assert float(qp.scale[0]) == 1.0 and int(qp.zero_point[0]) == 0
    assert s.activation_qparams(-1.0, 1.0).scale[0] == 2.0 / 255
