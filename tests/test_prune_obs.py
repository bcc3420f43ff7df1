"""Layer-wise OBD / OBS (Dong et al. 2017): Hessian, saliencies, the OBS update, allocation."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

import edgeslim as es
from edgeslim.prune import MagnitudePrune, OBDPrune, OBSPrune, prune_
from edgeslim.prune.obs import (
    damped,
    layer_hessians,
    layerwise_obd_scores,
    obs_scores,
    obs_update,
)


def _mlp(dead: int = 0) -> tuple[nn.Sequential, torch.Tensor]:
    """An MLP and inputs whose first ``dead`` features are always 0 (like MNIST's border)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))
    x = torch.randn(64, 8) @ torch.randn(8, 8)  # correlated inputs
    x[:, :dead] = 0
    return model, x


def test_layer_hessian_is_two_x_xt_over_n_for_linear_and_unfolded_conv():
    model, x = _mlp()
    h = layer_hessians(model, {"0": model[0]}, x, batch_size=10)["0"]
    torch.testing.assert_close(h, 2 * x.double().t() @ x.double() / 64, rtol=1e-5, atol=1e-5)
    conv = nn.Conv2d(2, 3, 3, padding=1, stride=2)
    img = torch.randn(5, 2, 7, 7)
    h = layer_hessians(conv, {"": conv}, img)[""]
    cols = F.unfold(img, 3, padding=1, stride=2).transpose(1, 2).reshape(-1, 18).double()
    assert h.shape == (18, 18)
    torch.testing.assert_close(h, 2 * cols.t() @ cols / len(cols), rtol=1e-5, atol=1e-5)


def test_one_weight_obs_update_equals_the_closed_form():
    model, x = _mlp()
    w = model[0].weight.detach().double()  # (6, 8)
    h = damped(2 * x.double().t() @ x.double() / len(x), 0.01)
    hinv = torch.linalg.inv(h)
    for q in (0, 5):  # the first and an inner column: the update is not column-sequential
        keep = torch.ones(6, 8, dtype=torch.bool)
        keep[2, q] = False
        got = obs_update(w, h, keep)
        ref = w.clone()
        ref[2] -= w[2, q] / hinv[q, q] * hinv[:, q]  # delta w = -w_q / [H^-1]_qq H^-1 e_q
        torch.testing.assert_close(got, ref)
        assert got[2, q] == 0


def test_obs_update_is_the_least_squares_refit_and_beats_plain_masking():
    model, x = _mlp()
    w = model[0].weight.detach().double()
    h = 2 * x.double().t() @ x.double() / len(x)
    keep = torch.rand(6, 8, generator=torch.Generator().manual_seed(1)) > 0.6
    got = obs_update(w, damped(h, 1e-9), keep)
    y = x.double() @ w.t()  # (64, 6): the dense layer's outputs
    for i in range(6):  # reference: least squares of row i's output on its kept inputs
        k = keep[i]
        ref = torch.linalg.lstsq(x.double()[:, k], y[:, i : i + 1]).solution.squeeze(1)
        torch.testing.assert_close(got[i, k], ref, rtol=1e-5, atol=1e-6)
    err_obs = (x.double() @ got.t() - y).pow(2).sum()
    err_mask = (x.double() @ (w * keep).t() - y).pow(2).sum()
    assert float(err_obs) < 0.9 * float(err_mask)


def test_dead_inputs_cost_nothing_and_go_first():
    model, x = _mlp(dead=3)
    layers = {"0": model[0], "2": model[2]}
    hessians = layer_hessians(model, layers, x)
    for scores in (layerwise_obd_scores(layers, hessians), obs_scores(layers, hessians, 0.01)):
        assert bool((scores["0"][:, :3] == 0).all()) and bool((scores["0"][:, 3:] > 0).all())
    # 18 of the 48 fc weights are dead: at 3/8 sparsity of that layer exactly those go
    for cfg in (
        OBDPrune(layer_sparsity={"0": 3 / 8}, hessian="layerwise"),
        OBSPrune(layer_sparsity={"0": 3 / 8}),
    ):
        m, _ = _mlp(dead=3)
        got = prune_(m, cfg, calib=x)
        assert got == {"0": pytest.approx(3 / 8)}
        assert not bool(m[0].weight_keep[:, :3].any()) and bool(m[0].weight_keep[:, 3:].all())


def test_obs_prune_keeps_outputs_closer_than_magnitude_and_follows_allocation():
    model, x = _mlp()
    dense = model(x).detach()
    mag = _mlp()[0]
    mag_log = prune_(mag, MagnitudePrune(sparsity=0.6))
    obs = _mlp()[0]
    obs_log = prune_(obs, OBSPrune(sparsity=0.6, percdamp=1e-6), calib=(x, torch.zeros(64)))
    assert obs_log == pytest.approx(mag_log)  # "magnitude" allocation: the same counts
    for layer in (obs[0], obs[2]):
        assert bool((layer.weight[~layer.weight_keep] == 0).all())
    with torch.no_grad():  # the first layer sees the dense inputs: its error is what OBS minimises
        first = model[0](x)
        assert float((obs[0](x) - first).pow(2).mean()) < 0.8 * float(
            (mag[0](x) - first).pow(2).mean()
        )
        assert float((obs(x) - dense).pow(2).mean()) < float((mag(x) - dense).pow(2).mean())
    lobd = _mlp()[0]
    assert prune_(lobd, OBDPrune(sparsity=0.6, hessian="layerwise"), calib=x) == pytest.approx(
        mag_log
    )
    fisher = _mlp()[0]  # the loss Hessian with the magnitude split, too
    y = torch.randint(0, 4, (64,))
    log = prune_(fisher, OBDPrune(sparsity=0.6, allocation="magnitude"), calib=(x, y))
    assert log == pytest.approx(mag_log)
    norm = _mlp()[0]
    log = prune_(norm, OBSPrune(sparsity=0.6, allocation="normalized"), calib=x)
    total = sum(int((~m.weight_keep).sum()) for m in (norm[0], norm[2]))
    assert set(log) == {"0", "2"} and total == round(0.6 * (48 + 24))


def test_lenet300_obs_beats_magnitude_at_90_percent(mnist):
    torch.manual_seed(0)
    model = es.load_model("zoo:lenet300")
    data = mnist
    es.fit(model, data, epochs=4, seed=0, progress=False)
    mag, obs = (es.load_model("zoo:lenet300") for _ in range(2))
    mag.load_state_dict(model.state_dict())
    obs.load_state_dict(model.state_dict())
    prune_(mag, MagnitudePrune(sparsity=0.9))
    prune_(obs, OBSPrune(sparsity=0.9, samples=256), data=data)
    assert es.evaluate(obs, data) > es.evaluate(mag, data) + 0.02
    assert es.evaluate(obs, data) > es.evaluate(model, data) - 0.03


def test_layerwise_validation_errors():
    with pytest.raises(ValueError, match="exactly one"):
        OBSPrune()
    with pytest.raises(ValueError, match="must be in"):
        OBSPrune(layer_sparsity={"fc1": 1.0})
    with pytest.raises(ValueError, match="allocation"):
        OBSPrune(sparsity=0.5, allocation="global")
    with pytest.raises(ValueError, match="not on one scale"):
        OBDPrune(sparsity=0.5, hessian="layerwise", allocation="global")
    with pytest.raises(ValueError, match="needs hessian='layerwise'"):
        OBDPrune(sparsity=0.5, allocation="normalized")
    assert OBDPrune(sparsity=0.5).split == "global"
    assert OBDPrune(sparsity=0.5, hessian="layerwise").split == "magnitude"
    assert OBSPrune(sparsity=0.75).scaled(0.5).sparsity == pytest.approx(0.5)
    model, x = _mlp()
    with pytest.raises(es.ConfigError, match="calibration inputs"):
        prune_(model, OBSPrune(sparsity=0.5))
    with pytest.raises(es.ConfigError, match="needs labels"):
        prune_(model, OBDPrune(sparsity=0.5), calib=x)
    with pytest.raises(es.ShapeError, match="non-empty"):
        prune_(model, OBSPrune(sparsity=0.5), calib=torch.zeros(0, 8))
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(es.ConfigError, match=r"'0'.*exclude"):
        prune_(grouped, OBSPrune(sparsity=0.5), calib=torch.randn(3, 4, 3, 3))
    log = prune_(grouped, OBSPrune(sparsity=0.5, exclude=["0"]), calib=torch.randn(3, 4, 3, 3))
    assert set(log) == {"2"}
    with pytest.raises(es.ConfigError, match="match no prunable layer"):
        prune_(model, OBSPrune(layer_sparsity={"nope": 0.5}), calib=x)


def test_shipped_obs_recipe_runs_in_the_pipeline(tmp_path):
    root = Path(__file__).resolve().parents[1]
    body = yaml.safe_load((root / "recipes" / "obs_lenet300.yaml").read_text())
    assert es.Recipe.from_dict(body).stages[0].kind == "prune"
    body.update(data={"source": "mnist", "max_train": 300}, train={"epochs": 1})
    body["stages"][0]["prune"]["samples"] = 64
    body["stages"][0]["finetune"] = {"epochs": 0}
    es.run_recipe(es.Recipe.from_dict(body), tmp_path, progress=False)
    model = es.load_model(str(next(tmp_path.rglob("*.pt2"))))
    w = torch.cat([m.weight.detach().reshape(-1) for m in (model.fc1, model.fc2, model.fc3)])
    assert float((w == 0).float().mean()) == pytest.approx(0.95, abs=0.002)
