"""QAT / LSQ, binary and ternary weights, dynamic fixed point, mixed precision, packing, stage."""

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from edgeslim import zoo
from edgeslim.core.errors import ConfigError
from edgeslim.core.train import TrainConfig, evaluate
from edgeslim.quant import (
    BWN,
    LSQ,
    QAT,
    TTQ,
    TWN,
    DynamicFixedPoint,
    Int8PTQ,
    MixedPrecision,
    layer_qparams,
    quantize,
    quantize_,
)
from edgeslim.quant.mixed import candidate_bits, choose_bits
from edgeslim.quant.modules import ActQuant, quant_layers
from edgeslim.quant.pack import pack_bits, save_packed, unpack_bits, unpack_weights
from edgeslim.quant.ternary import lowbit_layers


@pytest.fixture(scope="module")
def small(mnist):
    return mnist.limit(600)


@pytest.fixture(scope="module")
def trained300(small):
    torch.manual_seed(0)
    model = zoo.create("lenet300")
    from edgeslim.core.train import fit

    fit(model, small, TrainConfig(epochs=3, lr=2e-3))
    return model.state_dict()


def _lenet300(state=None):
    torch.manual_seed(0)
    model = zoo.create("lenet300")
    if state is not None:
        model.load_state_dict(state)
    return model


# ---------------------------------------------------------------------------- binary / ternary


def test_bwn_weights_are_sign_times_channel_mean(small, trained300):
    model = _lenet300(trained300)
    model = quantize(model, BWN(epochs=2, skip_first=False), data=small)
    assert model.quant_info["float_layers"] == {"fc3": "skip_last"}
    layer = model.fc1
    w = layer.projected_weight().detach()
    alpha = layer.weight.detach().abs().mean(1, keepdim=True)
    assert torch.allclose(w.abs(), alpha.expand_as(w))
    assert torch.equal(torch.sign(w), torch.where(layer.weight >= 0, 1.0, -1.0))
    assert evaluate(model, small) > 0.6  # it trained through fit


def test_twn_threshold_and_values(small):
    model = quantize(_lenet300(), TWN(epochs=0, skip_first=False, skip_last=False))
    layer = model.fc2
    lat = layer.weight.detach()
    w = layer.projected_weight().detach()
    delta = 0.7 * lat.abs().mean()
    keep = lat.abs() > delta
    assert torch.equal(w != 0, keep)
    alpha = lat.abs()[keep].mean()
    assert torch.allclose(w[keep].abs(), alpha.expand(int(keep.sum())))


def test_ttq_learns_two_scales(small):
    model = quantize(_lenet300(), TTQ(epochs=0, skip_first=False))
    wp0, wn0 = float(model.fc1.wp.detach()), float(model.fc1.wn.detach())
    w = model.fc1.projected_weight().detach()
    assert set(torch.unique(w).tolist()) <= {wp0, 0.0, -wn0}
    quantize_(_lenet300(), TTQ(epochs=0))  # fresh model: nothing trained
    model2 = quantize(_lenet300(), TTQ(epochs=1, skip_first=False), data=small)
    assert float(model2.fc1.wp.detach()) != pytest.approx(wp0)  # the scales trained
    assert float(model2.fc1.wn.detach()) != pytest.approx(wn0)


def test_lowbit_validation(small):
    with pytest.raises(ConfigError, match="pass data"):
        quantize_(_lenet300(), BWN(epochs=1))
    with pytest.raises(ConfigError, match="no layer left"):
        quantize_(_lenet300(), BWN(exclude=["fc2"], epochs=0))
    with pytest.raises(ConfigError):
        TWN(threshold=-1)


# ---------------------------------------------------------------------------- QAT / LSQ


def test_qat_and_lsq_train_and_stay_integer(small, trained300):
    calib = small.calib(128)
    qat = quantize(_lenet300(trained300), QAT(epochs=1), data=small, calib=calib)
    assert len(qat.quant_info["history"]) == 1
    assert evaluate(qat, small) > 0.6
    assert set(layer_qparams(qat)) == {"fc1", "fc2", "fc3"}
    lsq = quantize(_lenet300(trained300), LSQ(epochs=0), data=small, calib=calib)
    before = lsq.fc2.weight_scale.detach().clone()
    lsq = quantize(_lenet300(trained300), LSQ(epochs=1), data=small, calib=calib)
    assert evaluate(lsq, small) > 0.6
    assert isinstance(lsq.fc2.weight_scale, nn.Parameter)
    assert not torch.allclose(lsq.fc2.weight_scale.detach(), before)  # the steps learned
    learnable = [m for m in lsq.modules() if isinstance(m, ActQuant) and m.lsq]
    assert learnable and all(isinstance(m.scale, nn.Parameter) for m in learnable)
    with pytest.raises(ConfigError, match="pass data"):
        quantize_(_lenet300(), QAT(), calib=calib)


# ---------------------------------------------------------------------------- fixed point


def test_dynamic_fixed_point_powers_of_two(small):
    calib = small.calib(128)
    torch.manual_seed(0)
    base = zoo.create("lenet5").eval()
    with torch.no_grad():
        ref = base(calib)
    errs = {}
    for per_layer in (True, False):
        model = zoo.create("lenet5").eval()
        model.load_state_dict(base.state_dict())
        q = quantize(model, DynamicFixedPoint(bits=4, per_layer=per_layer), calib=calib)
        info = q.quant_info
        if not per_layer:
            assert len(set(info["weight_fl"].values())) == 1
            assert len(set(info["activation_fl"].values())) == 1
        for lq in layer_qparams(q).values():
            for qp in (lq.input, lq.output):
                assert qp.zero_point[0] == 0
                assert np.log2(qp.scale[0]) == np.round(np.log2(qp.scale[0]))
            assert len(set(lq.weight.scale)) == 1
        with torch.no_grad():
            errs[per_layer] = float(((q(calib) - ref) ** 2).mean())
    assert errs[True] < errs[False]  # layer-wise fractional lengths beat one global one


# ---------------------------------------------------------------------------- mixed precision


def test_choose_bits_respects_budget():
    sens = {"a": {2: 5.0, 4: 1.0, 8: 0.0}, "b": {2: 0.5, 4: 0.1, 8: 0.0}}
    numel = {"a": 100, "b": 100}
    assert choose_bits(sens, numel, 8 * 200) == {"a": 8, "b": 8}
    assert choose_bits(sens, numel, 4 * 200) == {"a": 4, "b": 4}  # 1.1 < 2.0 (a=8, b=2)
    assert choose_bits(sens, numel, 1000) == {"a": 8, "b": 2}  # 0.5 < 1.1 (a=4, b=4)
    assert choose_bits(sens, numel, 2 * 200) == {"a": 2, "b": 2}  # exactly the narrowest
    with pytest.raises(ConfigError, match="impossible budget"):
        choose_bits(sens, numel, 2 * 200 - 1)


def test_choose_bits_is_the_exact_optimum_and_monotonic():
    rng = np.random.default_rng(0)
    menu = [2, 3, 4, 5, 6, 8]
    numel = {f"l{i}": int(n) for i, n in enumerate(rng.integers(50, 5000, 5))}
    # decreasing in bits, with a little noise (measured sensitivities are not smooth)
    sens = {
        n: {b: float(rng.uniform(0.5, 2.0) * 4.0**-b + rng.uniform(0, 1e-4)) for b in menu}
        for n in numel
    }
    full = sum(numel.values())
    combos = list(itertools.product(menu, repeat=len(numel)))
    last = float("inf")
    for avg in (2.0, 2.5, 3.0, 3.7, 4.0, 5.0, 6.5, 8.0):
        budget = avg * full
        bits = choose_bits(sens, numel, budget)
        used = sum(numel[n] * b for n, b in bits.items())
        total = sum(sens[n][b] for n, b in bits.items())
        assert used <= budget and set(bits.values()) <= set(menu)
        brute = min(
            sum(sens[n][b] for n, b in zip(numel, c, strict=True))
            for c in combos
            if sum(numel[n] * b for n, b in zip(numel, c, strict=True)) <= budget
        )
        assert total == pytest.approx(brute, rel=1e-12)  # the exact knapsack optimum
        assert total <= last  # more budget never makes the choice worse
        last = total
    assert choose_bits(sens, numel, 8 * full) == dict.fromkeys(numel, 8)
    # the candidates measured jointly: one knapsack per sub-menu, uniform widths among them
    found = candidate_bits(sens, numel, 4 * full)
    assert dict.fromkeys(numel, 4) in found and dict.fromkeys(numel, 3) in found
    assert dict.fromkeys(numel, 5) not in found  # over the budget
    assert choose_bits(sens, numel, 4 * full) in found
    assert all(sum(numel[n] * b for n, b in c.items()) <= 4 * full for c in found)


def test_mixed_precision_under_budget(small):
    calib = small.calib(64)
    q = quantize(zoo.create("lenet5").eval(), MixedPrecision(avg_bits=4), calib=calib)
    info = q.quant_info
    total = sum(lq.weight_int.size for lq in layer_qparams(q).values())
    assert info["weight_bytes"] <= 4 * total / 8
    assert {lq.weight_bits for lq in layer_qparams(q).values()} <= {2, 3, 4, 5, 6, 8}
    # measured jointly on the calibration data, the choice is never worse than uniform 4-bit
    assert info["selection"]["distance"] <= info["selection"]["uniform"]["4"]
    assert info["selection"]["candidates"] >= 2
    with pytest.raises(ConfigError, match="impossible budget"):
        quantize_(zoo.create("lenet5").eval(), MixedPrecision(budget_bytes=1000), calib=calib)
    for s in info["sensitivity"].values():
        assert s["2"] >= s["8"]
    for name, lq in layer_qparams(q).items():
        qmax = 2 ** (info["layer_bits"][name] - 1) - 1
        assert np.abs(lq.weight_int).max() <= qmax
    with pytest.raises(ConfigError, match="exactly one"):
        MixedPrecision()


# ---------------------------------------------------------------------------- packing


def test_pack_bits_round_trip():
    rng = np.random.default_rng(0)
    for bits in (1, 2, 3, 4, 8):
        v = rng.integers(0, 2**bits, 1001)
        packed = pack_bits(v, bits)
        assert packed.size == -(-1001 * bits // 8)
        assert np.array_equal(unpack_bits(packed, bits, 1001), v)


def test_packed_file_restores_integer_weights(tmp_path, small):
    calib = small.calib(64)
    q = quantize(zoo.create("lenet5").eval(), Int8PTQ(layer_bits={"fc1": 4}), calib=calib)
    size = save_packed(q, tmp_path / "w.safetensors")
    codes = unpack_weights(tmp_path / "w.safetensors")
    for name, layer in quant_layers(q).items():
        assert np.array_equal(codes[name], layer.weight_int8.numpy())
    assert size < 431_080 * 0.75  # fc1 (400K weights) at 4 bits
    t = quantize(_lenet300(), TWN(epochs=0, skip_first=False, skip_last=False))
    save_packed(t, tmp_path / "t.safetensors")
    codes = unpack_weights(tmp_path / "t.safetensors")
    for name, layer in lowbit_layers(t).items():
        assert np.array_equal(codes[name], layer.codes()[0].numpy())
    assert (tmp_path / "t.safetensors").stat().st_size < 266_610 * 4 / 12


# ---------------------------------------------------------------------------- pipeline stage


def test_quantize_stage_recipe_and_resume(tmp_path):
    from edgeslim.pipeline.recipe import Recipe
    from edgeslim.pipeline.runner import run_recipe

    base = {
        "name": "q",
        "model": "zoo:lenet300",
        "data": {"source": "mnist", "max_train": 300},
        "train": {"epochs": 1},
        "stages": [{"quantize": {"method": "mixed_precision", "avg_bits": 4, "calib_size": 64}}],
    }
    result = run_recipe(Recipe.from_dict(base), tmp_path / "run", progress=False)
    row = result.rows[-1]
    assert row["format"] == "int" and row["file"] == "weights.int.safetensors"
    assert row["size_bytes"] < result.rows[0]["size_bytes"] / 6  # ~4-bit weights vs fp32
    assert set(row["log"]["layer_bits"]) == {"fc1", "fc2", "fc3"}
    assert (tmp_path / "run" / "plots" / "layer_bits.png").is_file()
    # a longer recipe resumes after the quantize stage: its structure is rebuilt first
    longer = {
        **base,
        "stages": [*base["stages"], {"prune": {"method": "magnitude", "sparsity": 0.1}}],
    }
    again = run_recipe(Recipe.from_dict(longer), tmp_path / "run", progress=False)
    assert again.resumed_from == 1
    with pytest.raises(ConfigError, match="unknown quantization method"):
        Recipe.from_dict({**base, "stages": [{"quantize": {"method": "int3"}}]})
    with pytest.raises(ConfigError, match=r"stages\[0\]\.quantize"):
        Recipe.from_dict({**base, "stages": [{"quantize": {"method": "int8_ptq", "bogus": 1}}]})
