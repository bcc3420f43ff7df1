"""OBD saliency (Hessian diagonal), N:M masks, AGP schedule and the fit step hook."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import edgeslim as es
from edgeslim.core.masks import iter_masks
from edgeslim.prune import (
    AGPSchedule,
    NMPrune,
    OBDPrune,
    hessian_diagonal,
    nm_pattern,
    prune_,
    prune_agp_,
)
from edgeslim.prune.agp import at_fraction
from edgeslim.prune.nm import nm_mask


def _tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


def test_fisher_diagonal_equals_mean_squared_per_sample_gradient():
    model = _tiny()
    x, y = torch.randn(10, 6), torch.randint(0, 3, (10,))
    layers = {"0": model[0], "2": model[2]}
    got = hessian_diagonal(model, layers, x, y, method="fisher", batch_size=4)
    for name, layer in layers.items():
        ref = torch.zeros_like(layer.weight)
        for i in range(10):  # the definition, one sample at a time
            model.zero_grad()
            F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
            ref += layer.weight.grad.pow(2) / 10
        torch.testing.assert_close(got[name], ref, rtol=1e-5, atol=1e-8)


def test_hutchinson_matches_the_exact_hessian_diagonal():
    torch.manual_seed(0)
    layer = nn.Linear(4, 3)
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    w0 = layer.weight.detach().clone()

    def loss(w):
        return F.cross_entropy(F.linear(x, w, layer.bias), y)

    exact = torch.autograd.functional.hessian(loss, w0).reshape(12, 12).diagonal().reshape(3, 4)
    got = hessian_diagonal(
        layer, {"": layer}, x, y, method="hutchinson", batch_size=32, probes=1000
    )[""]
    assert float((got - exact.abs()).abs().max()) < 0.15 * float(exact.abs().max())


def test_obd_removes_the_lowest_saliency_and_needs_labelled_data(mnist):
    model = es.load_model("zoo:lenet300")
    data = mnist.limit(300)
    layers = {"fc1": model.fc1, "fc2": model.fc2, "fc3": model.fc3}
    x, y = data.train.x[:64], data.train.y[:64]
    h = hessian_diagonal(model, layers, x, y)
    weights = {k: v.weight.detach().clone() for k, v in layers.items()}
    got = prune_(model, OBDPrune(sparsity=0.8, samples=64), calib=(x, y))
    assert set(got) == set(layers)
    kept, pruned = [], []
    for name, layer in layers.items():
        saliency = h[name] * weights[name].pow(2) / 2
        kept.append(saliency[layer.weight_keep])
        pruned.append(saliency[~layer.weight_keep])
    assert float(torch.cat(pruned).max()) <= float(torch.cat(kept).min())
    total = sum(w.numel() for w in weights.values())
    assert sum(int((~layer.weight_keep).sum()) for layer in layers.values()) == round(0.8 * total)
    with pytest.raises(es.ConfigError, match="labelled calibration data"):
        prune_(es.load_model("zoo:lenet300"), OBDPrune(sparsity=0.5))
    with pytest.raises(ValueError, match="exactly one"):
        OBDPrune()
    assert OBDPrune(sparsity=0.75).scaled(0.5).sparsity == pytest.approx(0.5)


def test_nm_masks_keep_n_largest_of_every_m_along_the_input_dim():
    w = torch.tensor([[0.1, -4.0, 3.0, 0.2, 5.0, 6.0, -7.0, 8.0]])
    assert nm_mask(w.abs(), 2, 4).tolist() == [[False, True, True, False, False, False, True, True]]
    model = es.load_model("zoo:lenet5")
    original = model.conv2.weight.detach().abs().movedim(1, -1).reshape(50, 5, 5, 5, 4)
    with pytest.warns(UserWarning, match="left dense.*conv1"):
        got = prune_(model, NMPrune(n=2, m=4))
    assert set(got) == {"conv2", "fc1", "fc2"} and all(s == 0.5 for s in got.values())
    w = model.conv2.weight.detach()  # (50, 20, 5, 5): groups run over input channels
    nonzero = (w.movedim(1, -1).reshape(50, 5, 5, 5, 4) != 0).sum(-1)
    assert int(nonzero.max()) == 2 and int(nonzero.min()) == 2
    kept = w.movedim(1, -1).reshape(50, 5, 5, 5, 4) != 0  # the two largest of each four
    smallest_kept = original.masked_fill(~kept, float("inf")).amin(-1)
    assert bool((original.masked_fill(kept, -1).amax(-1) <= smallest_kept).all())
    assert nm_pattern(model.fc1.weight) == (2, 4) and nm_pattern(model.conv1.weight) is None
    model = es.load_model("zoo:lenet300")
    prune_(model, NMPrune(n=4, m=8))
    assert nm_pattern(model.fc1.weight) == (4, 8)
    with pytest.raises(ValueError, match="n must be smaller than m"):
        NMPrune(n=4, m=4)


def test_nm_survives_fine_tuning_and_profile_says_no_cpu_speedup(mnist):
    model = es.load_model("zoo:lenet300")
    prune_(model, NMPrune(n=2, m=4))
    es.finetune(model, mnist.limit(256), epochs=1, lr=1e-3)
    assert all(nm_pattern(m.weight) == (2, 4) for m in (model.fc1, model.fc2, model.fc3))
    prof = es.profile(model, mnist.example(), latency=False)
    assert prof.effective_macs < 0.51 * prof.macs
    assert any("2:4" in n and "gain no speed" in n for n in prof.notes)
    assert "gain no speed" in prof.summary()
    dense = es.profile(es.load_model("zoo:lenet300"), mnist.example(), latency=False)
    assert dense.notes == []


def test_agp_cubic_schedule_values():
    s = AGPSchedule(start=0.2, end=0.6, every=1)
    assert s.fraction(0, 100) == 0.0 and s.fraction(20, 100) == 0.0
    assert s.fraction(40, 100) == pytest.approx(1 - 0.5**3)
    assert s.fraction(60, 100) == 1.0 and s.fraction(99, 100) == 1.0
    assert AGPSchedule(initial=0.5, start=0.0, end=1.0).fraction(0, 10) == 0.5
    with pytest.raises(ValueError, match="must come after start"):
        AGPSchedule(start=0.5, end=0.5)
    with pytest.raises(es.ConfigError, match="'sparsity' or 'layer_sparsity'"):
        at_fraction(es.MagnitudePrune(quality=1.0), 0.5)
    assert at_fraction(OBDPrune(layer_sparsity={"fc1": 0.8}), 0.5).layer_sparsity == {"fc1": 0.4}


def test_agp_prunes_gradually_inside_fit(mnist):
    data = mnist.limit(512)
    model = es.load_model("zoo:lenet300")
    seen: list[tuple[int, int, float]] = []
    schedule = AGPSchedule(start=0.0, end=0.5, every=4)
    prune_hook = schedule.hook(es.MagnitudePrune(sparsity=0.8))

    def hook(m, step, total):
        prune_hook(m, step, total)
        zeros = sum(int((~k).sum()) for *_, k in iter_masks(m))
        size = sum(k.numel() for *_, k in iter_masks(m)) or 1
        seen.append((step, total, zeros / size))

    es.fit(model, data, epochs=2, batch_size=64, keep_best=False, step_hook=hook)
    total = seen[0][1]
    assert [s for s, _, _ in seen] == list(range(1, total + 1)) and total == 16
    sparsity = [z for *_, z in seen]
    assert all(b >= a for a, b in itertools.pairwise(sparsity))  # only grows
    assert sparsity[3] == pytest.approx(0.8 * (1 - (1 - 4 / 8) ** 3), abs=1e-3)
    assert sparsity[7] == pytest.approx(0.8, abs=1e-3) and sparsity[-1] == sparsity[7]

    model = es.load_model("zoo:lenet300")
    es.fit(model, data, epochs=3, batch_size=32)
    dense = es.evaluate(model, mnist)
    history = prune_agp_(model, es.MagnitudePrune(sparsity=0.9), data, schedule,
                         es.TrainConfig(epochs=2, lr=1e-3, keep_best=True))  # fmt: skip
    assert len(history) == 2
    zeros = sum(int((~k).sum()) for *_, k in iter_masks(model))
    assert zeros == round(0.9 * sum(k.numel() for *_, k in iter_masks(model)))
    assert es.evaluate(model, mnist) > max(0.6, dense - 0.15)


def test_iterative_obd_passes_data_through(mnist):
    data = mnist.limit(300)
    model = es.load_model("zoo:lenet300")
    log = es.prune_iteratively_(
        model, OBDPrune(sparsity=0.75, samples=64), data, steps=2,
        finetune_cfg=es.TrainConfig(epochs=0),
    )  # fmt: skip
    assert [round(r["sparsity"], 3) for r in log] == [0.5, 0.75]
    assert math.isclose(log[-1]["sparsity"], 0.75, abs_tol=1e-3)
