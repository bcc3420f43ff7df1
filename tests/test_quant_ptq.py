"""PTQ core: torch integer ops vs spec, observers, BN folding, exact vs an integer reference."""

import numpy as np
import pytest
import torch
from torch import nn

from edgeslim import zoo
from edgeslim.core.errors import ConfigError
from edgeslim.quant import Int8PTQ, layer_qparams, quantize, quantize_, spec
from edgeslim.quant import fake as F
from edgeslim.quant.fold import fold_bn_sequential_
from edgeslim.quant.modules import QuantAdd, QuantConv2d, QuantLinear, set_mode
from edgeslim.quant.observers import Observer, kl_threshold, weight_mse_scale

# ---------------------------------------------------------------------------- integer ops


def test_torch_integer_ops_equal_spec():
    rng = np.random.default_rng(0)
    a = rng.integers(spec.INT32_MIN, spec.INT32_MAX, 5000, dtype=np.int64)
    a[:4] = [spec.INT32_MIN, spec.INT32_MAX, 0, -1]
    b = rng.integers(0, spec.INT32_MAX, 5000, dtype=np.int64)
    b[0] = spec.INT32_MIN
    assert np.array_equal(
        F.srdhm(torch.from_numpy(a), torch.from_numpy(b)).numpy(), spec.srdhm(a, b)
    )
    e = rng.integers(0, 31, 5000)
    x = rng.integers(-(2**40), 2**40, 5000, dtype=np.int64)
    got = F.rounding_divide_by_pot(torch.from_numpy(x), torch.from_numpy(e)).numpy()
    assert np.array_equal(got, spec.rounding_divide_by_pot(x, e))
    acc = rng.integers(-(2**24), 2**24, 5000, dtype=np.int64)
    for real in (0.000731, 0.25, 0.9999, 1.7, 3.2):
        m, sh = spec.quantize_multiplier(real)
        got = F.multiply_by_quantized_multiplier(
            torch.from_numpy(acc), torch.tensor(m), torch.tensor(sh)
        )
        assert np.array_equal(got.numpy(), spec.multiply_by_quantized_multiplier(acc, m, sh))


def test_quantize_rounds_half_away_like_spec():
    x = torch.tensor([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 300.0, -300.0], dtype=torch.float64)
    qp = spec.QParams(np.array([1.0]), np.array([0]))
    got = F.quantize(x, torch.tensor([1.0]), torch.tensor([0]), -128, 127)
    assert got.tolist() == [-3, -2, -1, 1, 2, 3, 127, -128]
    assert np.array_equal(got.numpy(), spec.quantize(x.numpy(), qp))


def test_fake_quant_straight_through_gradient():
    x = torch.tensor([0.1, 0.26, 5.0], requires_grad=True)
    y = F.fake_quant(x, torch.tensor([0.1]), torch.tensor([0]), -8, 7)
    assert torch.allclose(y, torch.tensor([0.1, 0.3, 0.7]))
    y.sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 0.0]  # clipped value gets no gradient


def test_lsq_scale_gets_gradient():
    step = torch.tensor([0.1], requires_grad=True)
    x = torch.tensor([0.26, 5.0])
    F.lsq_quant(x, step, torch.tensor([0]), -8, 7).sum().backward()
    # d/ds: in range: round(x/s) - x/s = 3 - 2.6; clipped: qmax = 7; times g = 1/sqrt(2*7)
    assert step.grad.item() == pytest.approx((0.4 + 7) / np.sqrt(14), rel=1e-5)


# ---------------------------------------------------------------------------- observers


def test_observers_choose_ranges():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20000, generator=g)
    x[0] = 40.0  # one outlier
    mm = Observer("minmax")
    mm.update(x[:10000])
    mm.update(x[10000:])
    assert mm.range() == (pytest.approx(float(x.min())), 40.0)
    for method in ("percentile", "kl"):
        obs = Observer(method)
        obs.update(x)
        lo, hi = obs.range()
        assert 2.0 < hi < 10.0, (method, hi)  # the outlier is clipped
        assert -10.0 < lo < -2.0, (method, lo)
    # MSE's range has lower quantization error on the data than min-max's
    from edgeslim.quant.observers import quant_error

    mse = Observer("mse")
    mse.update(x)
    assert quant_error(x.numpy(), mse.qparams()) < quant_error(x.numpy(), mm.qparams())
    assert mse.range()[1] < 40.0


def test_kl_threshold_of_uniform_keeps_range():
    u = np.random.default_rng(0).uniform(0, 1, 50000)
    assert kl_threshold(u, levels=256) > 0.95


def test_kl_keeps_comb_like_relu6_output():
    # what MobileNetV2's stem gives on MNIST: half exact zeros (ReLU), 8 repeated values
    # (the black background through each channel), the strokes spread up to ~5
    rng = np.random.default_rng(0)
    x = np.concatenate(
        [
            np.zeros(50_000),
            np.repeat(np.linspace(0.05, 0.57, 8, dtype=np.float32), 4_200),
            rng.uniform(0.0, 5.0, 16_000).astype(np.float32),
        ]
    )
    obs = Observer("kl")
    obs.update(torch.as_tensor(x))
    lo, hi = obs.range()
    assert lo == 0.0
    assert np.mean(x <= hi) >= 0.99  # without the atom rule: keeps 0.87
    assert hi >= 0.9 * x.max()
    # a post-ReLU6 tensor with saturated values: the atom at 6 is never clipped
    relu6 = np.clip(np.maximum(rng.normal(1.0, 2.0, 60_000), 0), 0, 6)
    assert kl_threshold(relu6, levels=256) == 6.0
    # an input that takes 256 grey levels only is all atoms: its range is kept whole
    grey = rng.integers(0, 256, 40_000) / 255.0
    assert kl_threshold(grey, levels=256) == 1.0


def test_kl_clips_heavy_tails():
    # a Gaussian with rare large outliers (and ReLU's zeros): KL clips far below the max
    rng = np.random.default_rng(1)
    x = rng.normal(0.0, 1.0, 200_000)
    x[rng.integers(0, x.size, 40)] *= 25.0
    obs = Observer("kl")
    obs.update(torch.as_tensor(x, dtype=torch.float32))
    lo, hi = obs.range()
    assert 3.0 < hi < 0.5 * x.max() and -0.5 * abs(x.min()) < lo < -3.0
    assert np.mean((x >= lo) & (x <= hi)) > 0.999
    relu = np.maximum(x, 0.0)
    t = kl_threshold(relu, levels=256)
    assert 3.0 < t < 0.5 * relu.max()


def test_observer_validation():
    with pytest.raises(ValueError, match="unknown calibration method"):
        Observer("median")
    with pytest.raises(ValueError, match="saw no data"):
        Observer().range()


def test_weight_mse_scale_beats_max_at_4_bits():
    w = torch.randn(4, 200, generator=torch.Generator().manual_seed(1))
    s_mse = weight_mse_scale(w, bits=4)
    s_max = spec.weight_qparams(w.numpy(), 0, bits=4).scale

    def err(s):
        q = np.clip(spec.round_half_away(w.numpy() / s[:, None]), -7, 7)
        return ((q * s[:, None] - w.numpy()) ** 2).sum()

    assert err(s_mse) < 0.9 * err(s_max)


# ---------------------------------------------------------------------------- BN folding


def test_bn_folding_preserves_outputs():
    torch.manual_seed(0)
    m = zoo.create("mobilenetv2")
    for mod in m.modules():  # non-trivial running statistics
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
            mod.weight.data.uniform_(0.5, 1.5)
    m.eval()
    x = torch.rand(4, 1, 28, 28)
    ref = m(x)
    folded = fold_bn_sequential_(m)
    assert len(folded) == 22
    assert not any(isinstance(mod, nn.BatchNorm2d) for mod in m.modules())
    assert torch.allclose(m(x), ref, atol=1e-4)


# ---------------------------------------------------------------------------- integer reference


def _conv_ref(xq: np.ndarray, lq) -> np.ndarray:
    """int32 accumulator of a conv on int inputs (numpy, groups and padding supported)."""
    zp = int(lq.input.zero_point[0])
    x = xq.astype(np.int64) - zp
    ph, pw = lq.padding
    x = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))  # zero = the zero point
    w = lq.weight_int.astype(np.int64)
    cout, cin_g, kh, kw = w.shape
    sh, sw = lq.stride
    win = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))[:, :, ::sh, ::sw]
    g = lq.groups
    outs = []
    for gi in range(g):
        xs = win[:, gi * cin_g : (gi + 1) * cin_g]  # (B, cin_g, H, W, kh, kw)
        ws = w[gi * (cout // g) : (gi + 1) * (cout // g)]
        outs.append(np.einsum("bchwij,ocij->bohw", xs, ws))
    acc = np.concatenate(outs, axis=1)
    if lq.bias_int is not None:
        acc = acc + lq.bias_int.astype(np.int64)[None, :, None, None]
    return acc


def _layer_ref(xq: np.ndarray, lq) -> np.ndarray:
    if lq.kind == "conv2d":
        acc = _conv_ref(xq, lq)
        m, sh = lq.multiplier[None, :, None, None], lq.shift[None, :, None, None]
    else:
        acc = (xq.astype(np.int64) - int(lq.input.zero_point[0])) @ lq.weight_int.astype(np.int64).T
        if lq.bias_int is not None:
            acc = acc + lq.bias_int.astype(np.int64)
        m, sh = lq.multiplier[None, :], lq.shift[None, :]
    return spec.requantize(acc, m, sh, int(lq.output.zero_point[0]), lq.act_min, lq.act_max)


@pytest.fixture(scope="module")
def calib():
    g = torch.Generator().manual_seed(0)
    return torch.rand(96, 1, 28, 28, generator=g)


@pytest.mark.parametrize("name", ["lenet5", "mobilenetv2"])
def test_exact_layers_equal_integer_reference(name, calib):
    torch.manual_seed(0)
    model = zoo.create(name).eval()
    q = quantize(model, Int8PTQ(calibration="percentile"), calib=calib)
    lqs = layer_qparams(q)
    seen = {}

    def hook(mod, inputs, output, _name=None):
        seen[_name] = (inputs[0].detach(), output.detach())

    handles = []
    for n, mod in q.named_modules():
        if isinstance(mod, (QuantConv2d, QuantLinear)):
            handles.append(mod.register_forward_hook(lambda m, i, o, _n=n: hook(m, i, o, _n)))
    with torch.no_grad():
        q(calib[:8])
    for h in handles:
        h.remove()
    assert set(seen) == set(lqs)
    for n, lq in lqs.items():
        x, y = seen[n]
        xq = spec.quantize(x.double().numpy(), lq.input)
        if n != next(iter(lqs)):  # inner layers receive values exactly on their input grid
            assert np.array_equal(spec.dequantize(xq, lq.input).astype(np.float32), x.numpy())
        ref = _layer_ref(xq, lq)
        got = spec.quantize(y.double().numpy(), lq.output)
        assert np.array_equal(got, ref), n


def test_whole_lenet5_equals_integer_pipeline(calib):
    torch.manual_seed(0)
    q = quantize(zoo.create("lenet5").eval(), Int8PTQ(calibration="mse"), calib=calib)
    lq = layer_qparams(q)
    x = calib[:16]
    h = spec.quantize(x.double().numpy(), lq["conv1"].input)
    h = _layer_ref(h, lq["conv1"])
    h = h.reshape(16, 20, 12, 2, 12, 2).max(axis=(3, 5))  # maxpool on ints
    h = _layer_ref(h, lq["conv2"])
    h = h.reshape(16, 50, 4, 2, 4, 2).max(axis=(3, 5)).reshape(16, -1)
    h = _layer_ref(h, lq["fc1"])  # fused ReLU: act_min = zero point
    assert lq["fc1"].activation == "relu"
    assert lq["fc1"].act_min == lq["fc1"].output.zero_point[0]
    h = _layer_ref(h, lq["fc2"])
    with torch.no_grad():
        out = q(x)
    assert np.array_equal(spec.quantize(out.double().numpy(), lq["fc2"].output), h)


def test_quant_add_equals_spec_add_int8(calib):
    torch.manual_seed(0)
    q = quantize(zoo.create("mobilenetv2").eval(), Int8PTQ(), calib=calib)
    adds = [m for m in q.modules() if isinstance(m, QuantAdd)]
    assert len(adds) == 4 and all(a.sources is not None for a in adds)
    add = adds[0]
    (q1, q2), qo = add.sources, add.output_quant
    p1, p2, po = q1.qparams(), q2.qparams(), qo.qparams()
    g = torch.Generator().manual_seed(3)
    a_int = torch.randint(-128, 128, (2, 16, 5, 5), generator=g)
    b_int = torch.randint(-128, 128, (2, 16, 5, 5), generator=g)
    a = F.dequantize(a_int, q1.scale, q1.zero_point)
    b = F.dequantize(b_int, q2.scale, q2.zero_point)
    out = add(a, b)
    params = spec.add_params(p1.scale[0], p2.scale[0], po.scale[0])
    ref = spec.add_int8(
        a_int.numpy(), p1.zero_point[0], b_int.numpy(), p2.zero_point[0], params, po.zero_point[0]
    )
    assert np.array_equal(spec.quantize(out.double().numpy(), po), ref)


def test_fake_mode_close_to_exact(calib):
    torch.manual_seed(0)
    q = quantize(zoo.create("lenet5").eval(), Int8PTQ(), calib=calib)
    with torch.no_grad():
        exact = q(calib)
        set_mode(q, "fake")
        fake_out = q(calib)
    step = float(layer_qparams(q)["fc2"].output.scale[0])
    diff = (exact - fake_out).abs() / step
    # fake mode differs only by float rounding (bias, multiplier): one output step at most
    assert diff.max() <= 1.01
    assert (diff > 0.5).float().mean() < 0.25


def assert_tracks(out: torch.Tensor, ref: torch.Tensor, rel: float = 0.15) -> None:
    """``out`` follows ``ref`` from input to input, not just on average: its error is small
    next to how much ``ref`` varies across the batch, and the two vary together. (An
    absolute tolerance passes a model that ignores its input when outputs are small.)"""
    spread = (ref - ref.mean(0)).abs().max()
    assert spread > 0, "the reference does not depend on its input"
    err = (out - ref).abs().max()
    assert err < rel * spread, f"error {err:.4g} vs spread across inputs {spread:.4g}"
    centred = torch.stack([(out - out.mean(0)).flatten(), (ref - ref.mean(0)).flatten()])
    assert torch.corrcoef(centred)[0, 1] > 0.99


def test_assert_tracks_fails_for_a_model_that_ignores_its_input(calib):
    torch.manual_seed(0)
    ref = zoo.create("lenet5").eval()
    with torch.no_grad():
        out = ref(calib)
    with pytest.raises(AssertionError):
        assert_tracks(out.mean(0, keepdim=True).expand_as(out), out)
    with pytest.raises(AssertionError):
        assert_tracks(out[torch.randperm(len(out))], out)
    assert_tracks(out + 1e-4 * torch.randn_like(out), out)


def test_module_mode_and_first_last_handling(calib):
    torch.manual_seed(0)
    model = zoo.create("lenet5").eval()
    info = quantize_(model, Int8PTQ(graph="module", skip_first=True, skip_last=True), calib=calib)
    q = model  # module mode: changed in place
    assert info == q.quant_info
    assert q.quant_info["float_layers"] == {"conv1": "skip_first", "fc2": "skip_last"}
    assert q.quant_info["quantized"] == ["conv2", "fc1"]
    assert isinstance(q.conv1, nn.Conv2d) and not isinstance(q.conv1, QuantConv2d)
    lq = layer_qparams(q)
    assert lq["conv2"].output is None and lq["conv2"].multiplier is None
    torch.manual_seed(0)
    ref = zoo.create("lenet5").eval()
    with torch.no_grad():
        assert_tracks(q(calib), ref(calib))


def test_dynamic_activations(calib):
    torch.manual_seed(0)
    model = zoo.create("lenet300").eval()
    ref = model(calib).detach()
    q = quantize(model, Int8PTQ(activations="dynamic"))
    with torch.no_grad():
        assert_tracks(q(calib), ref)
    with pytest.raises(ConfigError, match="dynamically"):
        layer_qparams(q)


def test_ptq_validation(calib):
    model = zoo.create("lenet5")
    with pytest.raises(ConfigError, match="needs calibration data"):
        quantize_(model, Int8PTQ())
    with pytest.raises(ConfigError, match="matches no quantizable layer"):
        quantize_(model, Int8PTQ(exclude=["conv9"]), calib=calib)
    with pytest.raises(ConfigError, match="no layer"):
        quantize_(model, Int8PTQ(exclude=["*"]), calib=calib)
    q = quantize(model, Int8PTQ(), calib=calib)
    with pytest.raises(ConfigError, match="already quantized"):
        quantize_(q, Int8PTQ(), calib=calib)
    with pytest.raises(ConfigError, match=r"Int8PTQ.bogus: unknown key"):
        Int8PTQ(bogus=1)
    with pytest.raises(ConfigError, match="no handler for config"):
        quantize_(model, torch.nn.Module())  # type: ignore[arg-type]
