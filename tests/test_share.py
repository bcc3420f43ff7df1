"""Weight sharing: k-means (Deep Compression) and HashedNets."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import edgeslim as es
from edgeslim.core.masks import add_mask_buffers_, apply_masks_, iter_shared, mask_grads_
from edgeslim.profiling import profile
from edgeslim.share.hashed import fmix64, hash_index, hash_sign
from edgeslim.share.kmeans import assign, init_centroids, kmeans_1d


def _reference_kmeans(values, centroids, iterations):
    """Lloyd's algorithm, one value at a time."""
    centroids = list(centroids)
    labels = None
    for _ in range(iterations + 1):
        new = [
            min(range(len(centroids)), key=lambda j, v=v: (abs(v - centroids[j]), j))
            for v in values
        ]
        if new == labels:
            break
        labels = new
        for j in range(len(centroids)):
            members = [v for v, lab in zip(values, labels, strict=True) if lab == j]
            if members:
                centroids[j] = sum(members) / len(members)
    return np.array(centroids), np.array(labels)


def test_kmeans_1d_matches_lloyd_reference():
    rng = np.random.default_rng(1)
    values = np.concatenate([rng.normal(-0.5, 0.1, 300), rng.normal(0.4, 0.2, 200)])
    init = init_centroids(values, 8, "linear")
    assert np.allclose(init, np.linspace(values.min(), values.max(), 8))
    centroids, labels = kmeans_1d(values, 8, "linear", iterations=100)
    ref_c, ref_l = _reference_kmeans(values.tolist(), init.tolist(), 100)
    assert np.allclose(centroids, ref_c, atol=1e-12) and np.array_equal(labels, ref_l)
    assert np.array_equal(assign(values, centroids), labels)
    density = init_centroids(values, 4, "density")
    assert np.allclose(density, np.quantile(values, [0.125, 0.375, 0.625, 0.875]))
    assert set(init_centroids(values, 5, "random", seed=3)) <= set(values)


@pytest.fixture
def pruned_lenet5():
    model = es.load_model("zoo:lenet5")
    es.prune_(model, es.MagnitudePrune(sparsity=0.9))
    return model


def test_kmeans_keeps_pruned_zeros_and_uses_bits_per_layer_type(pruned_lenet5, mnist):
    model = pruned_lenet5
    zeros = {n: m.weight.detach() == 0 for n, m in model.named_modules() if hasattr(m, "weight")}
    log = es.share_(model, es.KMeansShare(bits={"conv": 8, "linear": 5, "fc2": 3}))
    assert {k: v["clusters"] for k, v in log.items()} == {
        "conv1.weight": 256,
        "conv2.weight": 256,
        "fc1.weight": 32,
        "fc2.weight": 8,  # a name wins over the layer type
    }
    es.finetune(model, mnist.limit(200), epochs=1, lr=1e-3)
    for _, module, pname, codes, centroids in iter_shared(model):
        w = getattr(module, pname).detach()
        name = next(n for n, m in model.named_modules() if m is module)
        assert torch.equal(w == 0, zeros[name])  # k-means and training never move a zero
        assert torch.equal(w[codes > 0], centroids.detach()[codes[codes > 0].long() - 1])
        assert torch.unique(w[w != 0]).numel() <= centroids.numel()


def test_centroid_gradient_is_the_sum_of_its_weights_gradients():
    torch.manual_seed(0)
    layer = nn.Linear(6, 4)
    es.share_(layer, es.KMeansShare(bits=2), filter_fn=lambda m, n: True)
    x = torch.randn(5, 6)
    layer(x).pow(2).sum().backward()
    w_grad = layer.weight.grad.clone()
    codes = layer.weight_codes.long()
    mask_grads_(layer)
    assert layer.weight.grad is None
    want = torch.stack([w_grad[codes == c].sum() for c in range(1, 5)])
    assert torch.allclose(layer.weight_centroids.grad, want, atol=1e-6)
    opt = torch.optim.SGD([layer.weight_centroids], lr=0.1)
    before = layer.weight_centroids.detach().clone()
    opt.step()
    apply_masks_(layer)
    assert torch.allclose(layer.weight_centroids.detach(), before - 0.1 * want, atol=1e-7)
    assert torch.equal(layer.weight.detach(), layer.weight_centroids.detach()[codes - 1])


def test_shared_model_survives_safetensors_export_and_profile(pruned_lenet5, tmp_path):
    model = pruned_lenet5
    es.share_(model, es.KMeansShare(bits={"conv": 6, "linear": 4}, bias_bits=3))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, tmp_path / "s.safetensors")
    fresh = es.load_model("zoo:lenet5")
    loaded = load_file(tmp_path / "s.safetensors")
    add_mask_buffers_(fresh, loaded)
    fresh.load_state_dict(loaded, strict=True)
    assert isinstance(fresh.fc1.weight_centroids, nn.Parameter)
    assert len(list(iter_shared(fresh))) == 8  # 4 weights + 4 biases
    x = torch.randn(3, 1, 28, 28)
    assert torch.equal(fresh(x), model(x))
    es.save_model(model, tmp_path / "m.pt2")
    assert torch.equal(es.load_model(tmp_path / "m.pt2")(x), model.eval()(x))
    prof = profile(model, x, latency=False)  # (es.profile can be shadowed by the subpackage)
    centroids = sum(c.numel() for *_, c in iter_shared(model))
    assert prof.params == 431_080 + centroids
    assert prof.bytes["fp32"] == 431_080 * 4  # codes and centroids are not deployed


def test_kmeans_config_errors(pruned_lenet5):
    with pytest.raises(es.ConfigError, match=r"bits names \['fc9'\] match no"):
        es.share_(pruned_lenet5, es.KMeansShare(bits={"fc9": 4}))
    with pytest.raises(ValueError, match=r"bits = 13 must be in \[1, 12\]"):
        es.KMeansShare(bits=13)
    with pytest.raises(es.ConfigError, match="no Conv or Linear"):
        es.share_(nn.ReLU(), es.KMeansShare())


# ------------------------------------------------------------------------------ HashedNets


def _fmix64_reference(x: int) -> int:
    mask = (1 << 64) - 1
    x ^= x >> 33
    x = (x * 0xFF51AFD7ED558CCD) & mask
    x ^= x >> 33
    x = (x * 0xC4CEB9FE1A85EC53) & mask
    return x ^ (x >> 33)


def test_hash_is_murmur_fmix64_and_reproducible():
    xs = np.array([0, 1, 2, 12345, 2**63 + 7], dtype=np.uint64)
    assert [int(v) for v in fmix64(xs)] == [_fmix64_reference(int(v)) for v in xs]
    salt = (7 * 0x9E3779B97F4A7C15) & ((1 << 64) - 1)
    index = hash_index((3, 5), 4, seed=7)
    assert index.reshape(-1).tolist() == [_fmix64_reference(p ^ salt) % 4 for p in range(15)]
    assert torch.equal(index, hash_index((3, 5), 4, seed=7))
    assert not torch.equal(index, hash_index((3, 5), 4, seed=8))
    sign = hash_sign((100,), seed=7)
    assert set(sign.tolist()) == {-1.0, 1.0}


def test_hashed_linear_gathers_and_sums_gradients_into_buckets():
    layer = es.HashedLinear(8, 5, buckets=6, seed=3)
    v = layer.weight
    assert torch.equal(v, layer.sign * layer.buckets[layer.index])
    x = torch.randn(4, 8)
    assert torch.allclose(layer(x), x @ v.T + layer.bias)
    layer(x).sum().backward()
    grad_v = (torch.ones(4, 5).T @ x) * layer.sign  # dL/dV times the sign, per position
    want = torch.zeros(6).index_add_(0, layer.index.reshape(-1), grad_v.reshape(-1))
    assert torch.allclose(layer.buckets.grad, want, atol=1e-5)


def test_hash_share_swaps_layers_and_trains(mnist):
    torch.manual_seed(0)
    model = es.load_model("zoo:lenet300")
    log = es.share_(model, es.HashShare(ratio=1 / 8))
    assert isinstance(model.fc1, es.HashedLinear) and model.fc1.num_buckets == 29_400
    assert log["fc3"] == {"virtual": 1000, "buckets": 125}
    assert sum(p.numel() for p in model.parameters()) == 29_400 + 3_750 + 125 + 410
    small = mnist.limit(1000)
    es.fit(model, small, epochs=2, lr=3e-3)
    assert es.evaluate(model, small) > 0.6
    conv = es.load_model("zoo:lenet5")
    es.share_(conv, es.HashShare(ratio=1 / 4, exclude=["fc*"]))
    assert isinstance(conv.conv2, es.HashedConv2d) and isinstance(conv.fc1, nn.Linear)
    assert conv(torch.randn(2, 1, 28, 28)).shape == (2, 10)
