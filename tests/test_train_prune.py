import pytest
import torch

import edgeslim as es
from edgeslim.core.masks import iter_masks


def _small(mnist, n=600):
    return mnist.limit(n)


def test_fit_is_deterministic_and_learns(mnist):
    data = _small(mnist)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        m = es.load_model("zoo:lenet300")
        es.fit(m, data, epochs=2, seed=3, shift=1)
        runs.append(m.state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    torch.manual_seed(0)
    m = es.load_model("zoo:lenet300")
    assert es.evaluate(m, mnist) < 0.3  # untrained
    es.fit(m, data, epochs=6, batch_size=32)
    assert es.evaluate(m, mnist) > 0.8


def test_evaluate_wrong_input_shape_is_a_shape_error(mnist):
    m = es.load_model("zoo:lenet5")
    from edgeslim.core.data.datasets import Split

    bad = Split(torch.zeros(4, 3, 32, 32), torch.zeros(4, dtype=torch.long))
    with pytest.raises(es.ShapeError, match=r"\(3, 32, 32\)"):
        es.evaluate(m, bad)


def test_train_config_rejects_bad_values(mnist):
    m = es.load_model("zoo:lenet300")
    with pytest.raises(ValueError, match="lr"):
        es.fit(m, mnist, lr=-1.0)
    with pytest.raises(ValueError, match="optimizer"):
        es.fit(m, mnist, optimizer="lbfgs")


def _sparsity(w):
    return float((w == 0).float().mean())


def test_global_sparsity_is_exact():
    m = es.load_model("zoo:lenet300")
    layers = (m.fc1, m.fc2, m.fc3)
    original = [layer.weight.detach().abs().clone() for layer in layers]
    es.prune_(m, es.MagnitudePrune(sparsity=0.9))
    total = sum(layer.weight.numel() for layer in (m.fc1, m.fc2, m.fc3))
    zeros = sum(int((layer.weight == 0).sum()) for layer in (m.fc1, m.fc2, m.fc3))
    assert zeros == round(0.9 * total)
    # one global threshold: every kept weight is at least as large as every pruned one
    kept = torch.cat([w[layer.weight_keep] for w, layer in zip(original, layers, strict=True)])
    pruned = torch.cat([w[~layer.weight_keep] for w, layer in zip(original, layers, strict=True)])
    assert float(pruned.max()) <= float(kept.min())
    # layers are pruned unevenly by one threshold: fc3 (largest init scale) keeps the most
    assert m.fc3.weight_keep.float().mean() > m.fc1.weight_keep.float().mean()
    assert int((m.fc1.bias == 0).sum()) == 0  # biases are not pruned


def test_layer_sparsity_and_patterns():
    m = es.load_model("zoo:lenet5")
    got = es.prune_(m, es.MagnitudePrune(layer_sparsity={"conv*": 0.5, "fc1": 0.9}))
    assert set(got) == {"conv1", "conv2", "fc1"}
    assert int((m.conv1.weight == 0).sum()) == 250
    assert int((m.fc1.weight == 0).sum()) == 360_000
    assert int((m.fc2.weight == 0).sum()) == 0
    with pytest.raises(es.ConfigError, match="match no prunable layer"):
        es.prune_(m, es.MagnitudePrune(layer_sparsity={"fc9": 0.5}))


def test_quality_threshold_is_quality_times_std():
    m = es.load_model("zoo:lenet300")
    w = m.fc1.weight.detach().clone()
    es.prune_(m, es.MagnitudePrune(quality=1.0))
    expected = w.abs() > w.std()
    assert torch.equal(m.fc1.weight_keep, expected)
    assert torch.equal(m.fc1.weight, w * expected)


def test_filter_fn_and_exclude():
    m = es.load_model("zoo:lenet300")
    es.prune_(m, es.MagnitudePrune(sparsity=0.5), filter_fn=lambda mod, name: name != "fc3")
    assert not hasattr(m.fc3, "weight_keep")
    m2 = es.load_model("zoo:lenet300")
    es.prune_(m2, es.MagnitudePrune(sparsity=0.5, exclude=["fc1"]))
    assert not hasattr(m2.fc1, "weight_keep") and hasattr(m2.fc2, "weight_keep")


def test_magnitude_config_validation():
    with pytest.raises(ValueError, match="exactly one"):
        es.MagnitudePrune()
    with pytest.raises(ValueError, match="exactly one"):
        es.MagnitudePrune(sparsity=0.5, quality=1.0)
    with pytest.raises(ValueError, match="layer_sparsity"):
        es.MagnitudePrune(layer_sparsity={"fc1": 1.5})
    with pytest.raises(ValueError):
        es.MagnitudePrune(sparsity=1.0)


def test_masks_persist_through_finetuning(mnist):
    m = es.load_model("zoo:lenet300")
    es.fit(m, mnist.limit(500), epochs=1)
    es.prune_(m, es.MagnitudePrune(sparsity=0.8))
    before = {n: k.clone() for n, _, _, k in iter_masks(m)}
    es.finetune(m, mnist.limit(500), epochs=2, lr=1e-2, weight_decay=1e-3)
    for name, module, pname, keep in iter_masks(m):
        assert torch.equal(keep, before[name])
        w = getattr(module, pname)
        assert int((w[~keep] != 0).sum()) == 0  # pruned weights stay exactly zero
        assert int((w[keep] == 0).sum()) < 5  # kept weights did train


def test_pruned_weights_stay_pruned_when_repruning():
    m = es.load_model("zoo:lenet300")
    es.prune_(m, es.MagnitudePrune(sparsity=0.5))
    first = m.fc1.weight_keep.clone()
    with torch.no_grad():
        m.fc1.weight.add_(torch.randn_like(m.fc1.weight))  # would revive weights if unmasked
    es.prune_(m, es.MagnitudePrune(sparsity=0.6))
    assert not bool((m.fc1.weight_keep & ~first).any())


def test_iterative_pruning_reaches_target_and_recovers(mnist):
    data = mnist.limit(1000)
    m = es.load_model("zoo:lenet300")
    es.fit(m, data, epochs=8, lr=2e-3)
    dense = es.evaluate(m, mnist, "val")
    cfg = es.MagnitudePrune(layer_sparsity={"fc1": 0.92, "fc2": 0.91, "fc3": 0.74})
    ft = es.TrainConfig(epochs=3, weight_decay=1e-4)
    log = es.prune_iteratively_(m, cfg, data, steps=3, finetune_cfg=ft)
    assert [r["step"] for r in log] == [1, 2, 3]
    assert log[0]["sparsity"] < log[1]["sparsity"] < log[2]["sparsity"]
    assert int((m.fc1.weight == 0).sum()) == round(0.92 * 784 * 300)
    assert int((m.fc3.weight == 0).sum()) == 740
    # each cycle's fine-tuning recovers what its pruning lost, ending near the dense model
    assert all(r["val_after_finetune"] >= r["val_before_finetune"] for r in log)
    assert log[-1]["val_after_finetune"] - log[-1]["val_before_finetune"] > 0.05
    assert es.evaluate(m, mnist, "val") > dense - 0.02


def test_prune_with_an_unregistered_config_names_the_known_ones():
    class NotAPruner(es.TrainConfig):
        pass

    with pytest.raises(
        es.ConfigError, match=r"prune_: no handler for config NotAPruner.*Magnitude"
    ):
        es.prune_(es.load_model("zoo:lenet300"), NotAPruner())
