"""Profiler: exact parameter, MAC, memory and byte counts on hand-checkable models."""

import json
import math

import pytest
import torch
from rich.console import Console
from torch import nn

from edgeslim.core.errors import EdgeslimError, ShapeError
from edgeslim.core.models import zoo
from edgeslim.core.models.storage import deployable_state, payload_bytes
from edgeslim.profiling import LayerProfile, Profile, profile

LENET5_MACS = 24 * 24 * 20 * 25 + 8 * 8 * 50 * 20 * 25 + 800 * 500 + 500 * 10  # 2,293,000


def _prof(model: nn.Module, shape: tuple[int, ...]) -> Profile:
    return profile(model, torch.randn(*shape), latency=False)


def test_lenet5_counts_are_exact_and_per_sample():
    model = zoo.create("lenet5")
    one = _prof(model, (1, 1, 28, 28))
    four = _prof(model, (4, 1, 28, 28))
    assert one.params == 431_080 == one.nonzero_params
    assert one.macs == LENET5_MACS == 2_293_000 == one.effective_macs
    assert (four.macs, four.effective_macs) == (one.macs, one.effective_macs)
    assert four.peak_activation_bytes == one.peak_activation_bytes
    assert one.input_shape == (1, 28, 28)
    rows = {layer.name: layer for layer in one.layers}
    assert [layer.name for layer in one.layers] == ["conv1", "conv2", "fc1", "fc2"]
    assert rows["conv1"] == LayerProfile(
        "conv1", "Conv2d", 520, 520, 288_000, 288_000, (20, 24, 24)
    )
    assert rows["conv2"].macs == 1_600_000 and rows["conv2"].output_shape == (50, 8, 8)
    assert rows["fc1"].macs == 400_000 and rows["fc2"].output_shape == (10,)
    assert sum(layer.params for layer in one.layers) == one.params
    # input 1x28x28 dies after conv1; peak is conv1's output + pool's output
    assert one.peak_activation_bytes == (20 * 24 * 24 + 20 * 12 * 12) * 4


def test_lenet300_macs():
    p = _prof(zoo.create("lenet300"), (2, 1, 28, 28))
    assert p.macs == 784 * 300 + 300 * 100 + 100 * 10 == 266_200
    assert p.params == 266_610


def test_zeroed_weights_lower_effective_macs_and_sparse_bytes_only():
    model = zoo.create("lenet5")
    dense = _prof(model, (1, 1, 28, 28))
    keep = torch.ones(500, 800, dtype=torch.bool)
    keep[:, ::2] = False  # exactly half of fc1's weights
    with torch.no_grad():
        model.fc1.weight.mul_(keep)
    model.fc1.register_buffer("weight_keep", keep)  # a pruning mask: not a param, not stored
    sparse = _prof(model, (1, 1, 28, 28))

    assert sparse.params == dense.params
    assert sparse.nonzero_params == dense.nonzero_params - 200_000
    assert sparse.macs == dense.macs
    assert sparse.effective_macs == dense.effective_macs - 200_000  # 1 row x 200,000 zeros
    fc1 = next(layer for layer in sparse.layers if layer.name == "fc1")
    assert (fc1.nonzero_params, fc1.effective_macs) == (200_500, 200_000)

    assert sparse.bytes["fp32"] == dense.bytes["fp32"] == 431_080 * 4
    rest = dense.bytes["fp32"] - 400_000 * 4
    assert sparse.bytes["sparse"] == 200_000 * 4 + math.ceil(400_000 / 8) + rest
    state = deployable_state(model)
    assert "fc1.weight_keep" not in state
    assert sparse.bytes["sparse"] == payload_bytes(state, "sparse")


def test_pruned_conv_effective_macs_are_out_spatial_times_nnz():
    model = zoo.create("lenet5")
    with torch.no_grad():
        model.conv2.weight[:10].zero_()  # 10 of 50 filters: 10 * 20 * 25 zeros
    conv2 = next(layer for layer in _prof(model, (1, 1, 28, 28)).layers if layer.name == "conv2")
    assert conv2.macs == 1_600_000
    assert conv2.effective_macs == 8 * 8 * (40 * 20 * 25)


class _MLP(nn.Module):
    def __init__(self, inplace: bool = False) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(10, 20), nn.ReLU(inplace), nn.Linear(20, 5)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))


class _Flatten(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(32, 4)

    def forward(self, x):
        return self.fc(x.flatten(1))


def test_peak_memory_mlp():
    # x 40 B dies after fc1; relu: fc1 out 80 + relu out 80 = 160; fc2: 80 + 20
    assert _prof(_MLP(), (3, 10)).peak_activation_bytes == 160
    # in-place ReLU allocates nothing: peak is fc1 (x 40 + out 80)
    assert _prof(_MLP(inplace=True), (3, 10)).peak_activation_bytes == 120


def test_peak_memory_residual_keeps_input_alive():
    # fc1: x 32 + h 64; relu: x 32 + h 64 + r 64 = 160; fc2: 32 + 64 + 32; add: 32 * 3
    p = _prof(_Residual(), (2, 8))
    assert p.peak_activation_bytes == 160
    assert p.macs == 8 * 16 + 16 * 8


def test_peak_memory_flatten_is_a_view():
    # flatten allocates nothing but keeps x (128 B) alive until fc: 128 + 16
    p = _prof(_Flatten(), (5, 2, 4, 4))
    assert p.peak_activation_bytes == 144
    assert [layer.name for layer in p.layers] == ["fc"]


def test_grouped_and_depthwise_conv_macs():
    model = nn.Sequential(
        nn.Conv2d(8, 16, 3, padding=1, groups=4),  # 16 x 10 x 10 outputs x (2 x 9)
        nn.Conv2d(16, 16, 3, groups=16, bias=False),  # 16 x 8 x 8 outputs x 9
    )
    p = _prof(model, (2, 8, 10, 10))
    assert [layer.macs for layer in p.layers] == [16 * 100 * 18, 16 * 64 * 9]
    assert p.macs == 28_800 + 9_216
    assert [layer.output_shape for layer in p.layers] == [(16, 10, 10), (16, 8, 8)]


def test_attention_macs_count_both_products():
    class Attn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv = nn.Linear(8, 24)

        def forward(self, x):  # x: (B, 5, 8)
            q, k, v = self.qkv(x).chunk(3, dim=-1)
            return nn.functional.scaled_dot_product_attention(q, k, v)

    p = _prof(Attn(), (1, 5, 8))
    assert p.macs == 5 * 8 * 24 + 5 * 5 * 8 * 2  # qkv projection + QK^T + AV
    assert {layer.name for layer in p.layers} == {"", "qkv"}


@pytest.mark.parametrize("name", ["mobilenetv2", "resnet8"])
def test_zoo_models_profile(name):
    model = zoo.create(name)
    model.train()
    p = _prof(model, (2, 1, 28, 28))
    assert model.training  # the training flag is restored
    assert p.params == sum(t.numel() for t in model.parameters())
    assert p.macs == sum(layer.macs for layer in p.layers) > 0
    assert p.peak_activation_bytes > 28 * 28 * 4
    json.dumps(p.to_dict())


def test_wrong_shape_raises_shape_error():
    with pytest.raises(ShapeError, match=r"LeNet5 cannot run on input of shape \(1, 3, 32, 32\)"):
        _prof(zoo.create("lenet5"), (1, 3, 32, 32))


def test_untraceable_model_raises_edgeslim_error():
    class DataDependent(nn.Module):
        def forward(self, x):
            return x[x > 0].sum() if x.sum().item() > 0 else x

    with pytest.raises(EdgeslimError, match="cannot trace"):
        profile(DataDependent(), torch.ones(1, 4), latency=False)


def test_latency():
    model = zoo.create("lenet300")
    p = profile(model, torch.randn(2, 1, 28, 28), repeats=3, warmup=1)
    assert isinstance(p.latency_ms, float) and p.latency_ms > 0
    assert _prof(model, (1, 1, 28, 28)).latency_ms is None


def test_table_and_dict_render():
    p = _prof(zoo.create("lenet5"), (1, 1, 28, 28))
    console = Console(record=True, width=200)
    console.print(p.table(title="lenet5"))
    text = console.export_text()
    assert "conv1" in text and "431,080" in text and "2,293,000" in text
    assert "fp32" in text and "sparse" in text
    d = json.loads(json.dumps(p.to_dict()))
    assert d["macs"] == 2_293_000 and d["layers"][0]["name"] == "conv1"
    assert "431,080" in p.summary()


def test_transposed_conv_macs():
    model = nn.ConvTranspose2d(4, 6, 3, stride=2)  # each input pixel feeds 6 x 9 outputs
    p = _prof(model, (1, 4, 5, 5))
    assert p.macs == 4 * 5 * 5 * 6 * 9


def test_memory_access_cost_counts_reads_and_writes_of_each_op():
    # fc1: bias 20 + x 10 + W 200 + out 20; relu: 20 in + 20 out; fc2: 5 + 20 + 100 + 5
    assert _prof(_MLP(), (3, 10)).memory_access_bytes == (250 + 40 + 130) * 4
    # flatten is a view and moves nothing; fc: bias 4 + x 32 + W 128 + out 4
    assert _prof(_Flatten(), (5, 2, 4, 4)).memory_access_bytes == 168 * 4
    # a depthwise conv moves nearly as many bytes as a dense one with 16x the MACs
    dw = _prof(nn.Conv2d(16, 16, 3, groups=16, bias=False), (1, 16, 10, 10))
    dense = _prof(nn.Conv2d(16, 16, 3, bias=False), (1, 16, 10, 10))
    assert dw.memory_access_bytes == (1600 + 144 + 16 * 64) * 4
    assert dense.memory_access_bytes == (1600 + 2304 + 16 * 64) * 4
    assert dense.macs == 16 * dw.macs


def test_profile_stays_callable_after_its_submodules_are_imported():
    import edgeslim as es
    import edgeslim.profiling.latency

    assert es.profile(nn.Linear(3, 2), torch.rand(1, 3), latency=False).macs == 6
