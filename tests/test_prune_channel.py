"""Structured pruning: channels, filters and heads physically removed, coupled layers kept
consistent. The reference for correctness: cutting channels must give *exactly* the outputs
of the dense model with those channels zeroed (every consumer then sees zeros there)."""

import copy
import warnings
from contextlib import ExitStack

import pytest
import torch
from torch import nn

import edgeslim as es
from edgeslim.export.onnx import export_onnx
from edgeslim.prune import ChannelPrune, UnsupportedOpError, prune_
from edgeslim.prune.budget import count_macs
from edgeslim.prune.groups import prepare
from edgeslim.prune.plan import ProbeOptions, plan_groups
from edgeslim.prune.surgery import zeroed


def _randomize_bn(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics, so a wrong BN slice would show in the outputs."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 0.4 - 0.2)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) * 0.4 - 0.2)
    return model.eval()


def _zeroed_reference(model, x, cfg):
    """Outputs of ``model`` with the channels ``cfg`` would cut set to zero, and the plans."""
    dg, groups = prepare(model, x, cfg)
    plans = plan_groups(groups, cfg)
    by_name = {g.name: g for g in groups}
    with ExitStack() as stack, torch.no_grad():
        for p in plans:
            stack.enter_context(zeroed(dg, by_name[p.group], p.remove))
        return model(x), plans


def _params(model):
    return sum(p.numel() for p in model.parameters())


class Concat(nn.Module):
    """Two conv branches concatenated, then a conv and a classifier (torch.cat coupling)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.mix = nn.Sequential(nn.Conv2d(24, 16, 1), nn.BatchNorm2d(16), nn.ReLU())
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        y = torch.cat([self.a(x), self.b(x)], dim=1)  # (B, 24, H, W)
        return self.fc(self.mix(y).mean((2, 3)))


class Grouped(nn.Module):
    """A grouped (groups=4, not depthwise) conv between two plain convs."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 16, 3, padding=1)
        self.g = nn.Conv2d(16, 32, 3, padding=1, groups=4)
        self.c2 = nn.Conv2d(32, 8, 1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = torch.relu(self.g(torch.relu(self.c1(x))))
        return self.fc(torch.relu(self.c2(x)).mean((2, 3)))


@pytest.mark.parametrize("name", ["resnet8", "mobilenetv2"])
def test_residual_and_depthwise_cut_equals_zeroed_channels(name):
    torch.manual_seed(0)
    model = _randomize_bn(
        es.load_model(f"zoo:{name}", **({"width": 0.5} if "mobile" in name else {}))
    )
    x = torch.randn(4, 1, 28, 28)
    cfg = ChannelPrune(ratio=0.5, round_to=4)
    expected, plans = _zeroed_reference(model, x, cfg)
    before = _params(model)
    got = prune_(model, cfg, example=x)["removed"]
    assert set(got) == {p.group for p in plans} and len(got) >= 6
    assert _params(model) < 0.45 * before  # physically smaller, not masked
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    for conv in convs:  # BN and depthwise convs follow their producer
        if conv.groups > 1:
            assert conv.groups == conv.in_channels == conv.out_channels
    if name == "resnet8":  # residual add: both sides of every add keep the same channels
        for block in model.layers:
            out = block.conv2.out_channels
            assert block.bn2.num_features == out
            short = block.shortcut
            width = short[0].out_channels if isinstance(short, nn.Sequential) else None
            assert width in (None, out)
        assert all(c.out_channels % 4 == 0 for c in convs)


def test_concat_and_grouped_convs_stay_consistent():
    torch.manual_seed(0)
    x = torch.randn(3, 1, 12, 12)
    model = _randomize_bn(Concat())
    expected, _ = _zeroed_reference(model, x, ChannelPrune(ratio=0.5))
    prune_(model, ChannelPrune(ratio=0.5), example=x)
    assert (model.a[0].out_channels, model.b[0].out_channels) == (4, 8)
    assert model.mix[0].in_channels == 12  # the concat's input slices follow both branches
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)

    model = Grouped().eval()
    expected, _ = _zeroed_reference(model, x, ChannelPrune(ratio=0.5))
    prune_(model, ChannelPrune(ratio=0.5), example=x)
    assert model.g.groups == 4 and model.g.out_channels == 16
    assert model.g.in_channels % 4 == 0 and model.c2.in_channels == 16
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


def test_squeezenet_macs_target_keeps_the_classifier_behind_pooling_and_flatten():
    """SqueezeNet's classes come from a conv followed by global pooling and ``flatten`` (no
    module produces the output tensor): that conv's group must stay whole. It used to be cut,
    and Torch-Pruning then failed (IndexError) resizing the traced graph's scalar output."""
    torch.manual_seed(0)
    model = es.load_model("zoo:squeezenet").eval()
    x = torch.randn(2, 1, 28, 28)
    dense = count_macs(model, x)
    got = prune_(model, ChannelPrune(macs=0.5), example=x)["removed"]
    assert "classifier" not in got and len(got) >= 10  # fire modules: squeeze and expands
    assert model.classifier.out_channels == 10 and model(x).shape == (2, 10)
    assert 0.4 * dense <= count_macs(model, x) <= 0.5 * dense
    # the concatenation feeding the classifier follows both expand branches
    fire4 = model.fire4
    width = fire4.expand1[0].out_channels + fire4.expand3[0].out_channels
    assert model.classifier.in_channels == width < 128


class Attention(nn.Module):
    """Self-attention built like transformers' BERT (query/key/value, num_attention_heads)."""

    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.num_attention_heads = heads
        self.attention_head_size = dim // heads
        self.query, self.key, self.value = (nn.Linear(dim, dim) for _ in range(3))
        self.out = nn.Linear(dim, dim)

    def forward(self, x):  # (B, L, dim)
        shape = (*x.shape[:2], -1, self.attention_head_size)
        q, k, v = (p(x).view(shape).transpose(1, 2) for p in (self.query, self.key, self.value))
        y = torch.softmax(q @ k.transpose(-1, -2) / 4, -1) @ v  # (B, heads, L, head)
        return self.out(y.transpose(1, 2).reshape(*x.shape[:2], -1))


class TinyTransformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = Attention()
        self.ffn = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        x = x + self.attn(x)
        return self.head((x + self.ffn(x)).mean(1))


def test_attention_loses_whole_heads_and_ffn_neurons():
    torch.manual_seed(0)
    model = TinyTransformer().eval()
    with torch.no_grad():  # head 2 contributes nothing: its values and output columns are 0
        for p in (model.attn.query, model.attn.key, model.attn.value):
            p.weight[16:24] = 0
            p.bias[16:24] = 0
        model.attn.out.weight[:, 16:24] = 0
    x = torch.randn(2, 7, 32)
    before = model(x)
    # the residual stream holds the model's input: the graph would cut it, the check refuses
    with pytest.warns(UserWarning, match="group of attn.out: cutting it breaks"):
        got = prune_(model, ChannelPrune(layer_ratio={"attn.*": 0.25}), example=x)["removed"]
    assert got == {"attn.query": 0.25}
    assert model.attn.num_attention_heads == 3
    assert model.attn.query.out_features == model.attn.out.in_features == 24
    assert model.ffn[0].out_features == 64  # not matched by layer_ratio
    torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)  # the dead head went
    with pytest.warns(UserWarning, match="attn.out"):  # FFN neurons and heads together
        prune_(model, ChannelPrune(ratio=0.5), example=x)
    assert model.ffn[0].out_features == model.ffn[2].in_features == 32
    assert model.attn.num_attention_heads == 2 and model.head.out_features == 5
    assert model(x).shape == (2, 5)


def _conv_bn_net():
    net = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 6 * 6, 3),
    )  # fmt: skip
    return net.eval()


def _kept_filters(before: torch.Tensor, after: torch.Tensor) -> list[int]:
    return [i for i in range(before.shape[0]) if any(torch.equal(before[i], a) for a in after)]


@pytest.mark.parametrize("importance", ["l1", "l2", "bn_scale", "taylor", "activation"])
def test_each_importance_removes_the_channel_it_should(importance):
    torch.manual_seed(0)
    net = _conv_bn_net()
    with torch.no_grad():
        if importance == "bn_scale":
            net[1].weight[5] = 1e-4  # network slimming: tiny gamma
        elif importance == "taylor":
            net[3].weight[:, 5] = 0  # its output is never used: zero gradient x weight
        elif importance == "activation":
            net[3].weight[:, 5] *= 1e-3  # its consumer barely reads it
        else:
            net[0].weight[5] *= 1e-3
            net[3].weight[:, 5] *= 1e-3
    x = torch.rand(16, 1, 6, 6)
    y = torch.randint(0, 3, (16,))
    w0 = net[0].weight.detach().clone()
    kw = {"calib": (x, y)} if importance in ("taylor", "activation") else {}
    prune_(net, ChannelPrune(ratio=1 / 8, importance=importance), example=x, **kw)
    assert net[0].out_channels == 7
    assert 5 not in _kept_filters(w0, net[0].weight.detach())
    assert all(p.grad is None for p in net.parameters())
    assert not any(hasattr(m, "_edgeslim_input_abs") for m in net.modules())


def test_round_to_ignore_filter_and_macs_target():
    torch.manual_seed(0)
    x = torch.rand(2, 1, 28, 28)
    model = es.load_model("zoo:resnet8").eval()
    prune_(model, ChannelPrune(ratio=0.3, round_to=8, ignore=["layers.2.*"]), example=x)
    assert model.layers[2].conv1.out_channels == 64  # ignored
    assert model.layers[1].conv1.out_channels == 24  # 32 * 0.7 = 22.4 -> 24
    model = es.load_model("zoo:resnet8").eval()
    prune_(model, ChannelPrune(ratio=0.5), example=x, filter_fn=lambda m, n: n != "stem.0")
    assert model.stem[0].out_channels == 16 and model.layers[0].conv1.out_channels == 8
    model = es.load_model("zoo:resnet8").eval()
    dense = count_macs(model, x)
    assert dense == es.profile(model, x, latency=False).macs  # fast counter == profile
    prune_(model, ChannelPrune(macs=0.5), example=x)
    assert 0.42 < count_macs(model, x) / dense <= 0.5
    assert count_macs(model, x) == es.profile(model, x, latency=False).macs


class BareScale(nn.Module):
    """A channel scale kept as a bare nn.Parameter: the graph cannot know how to cut it."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3)
        self.scale = nn.Parameter(torch.ones(1, 8, 1, 1))
        self.c2 = nn.Conv2d(8, 8, 3)
        self.c3 = nn.Conv2d(8, 4, 1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = torch.relu(self.c2(torch.relu(self.c1(x)) * self.scale))
        return self.fc(torch.relu(self.c3(x)).mean((2, 3)))


def test_unsupported_op_is_named_and_the_rest_is_pruned():
    x = torch.rand(2, 1, 10, 10)
    model = BareScale().eval()
    with pytest.warns(UserWarning, match=r"group of c1.*bare parameter.*'scale'"):
        got = prune_(model, ChannelPrune(ratio=0.5), example=x)["removed"]
    assert set(got) == {"c2", "c3"}
    assert model.c1.out_channels == 8 and model.c2.out_channels == 4
    assert model(x).shape == (2, 2)
    model = BareScale().eval()
    with pytest.raises(UnsupportedOpError, match="'scale'"):
        prune_(model, ChannelPrune(ratio=0.5, on_unsupported="error"), example=x)
    assert model.c2.out_channels == 8  # nothing was cut


def test_validation_errors():
    model = es.load_model("zoo:lenet300")
    with pytest.raises(es.ConfigError, match="example="):
        prune_(model, ChannelPrune(ratio=0.5))
    with pytest.raises(ValueError, match="exactly one of"):
        ChannelPrune(ratio=0.5, macs=0.5)
    with pytest.raises(ValueError, match=r"layer_ratio\['fc1'\]"):
        ChannelPrune(layer_ratio={"fc1": 1.5})
    with pytest.raises(es.ConfigError, match="takes no argument"):
        prune_(model, es.MagnitudePrune(sparsity=0.5), example=torch.zeros(1, 784))
    prune_(model, es.MagnitudePrune(sparsity=0.5))
    with pytest.raises(es.ConfigError, match="remove_masks_"):
        prune_(model, ChannelPrune(ratio=0.5), example=torch.zeros(1, 1, 28, 28))
    with pytest.raises(es.ConfigError, match="data="):
        prune_(
            es.load_model("zoo:resnet8"),
            ChannelPrune(macs=0.5, allocation="sensitivity"),
            example=torch.zeros(1, 1, 28, 28),
        )


def test_probe_options_are_channel_prunes_defaults():
    """Sensitivity probes and replays without a config choose channels as ChannelPrune would."""
    defaults, probe = ChannelPrune(ratio=0.5), ProbeOptions()
    for name in ("layer_ratio", "heads", "importance", "round_to", "ignore", "on_unsupported"):
        assert getattr(probe, name) == getattr(defaults, name), name
    assert probe.max_ratio == 0.99  # probes go further than a prune may


def test_pruned_model_exports_to_onnx_and_agrees(tmp_path):
    torch.manual_seed(0)
    model = _randomize_bn(es.load_model("zoo:mobilenetv2"))
    x = torch.rand(3, 1, 28, 28)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing skipped on a zoo net
        prune_(model, ChannelPrune(ratio=0.5, round_to=8), example=x)
    result = export_onnx(copy.deepcopy(model), tmp_path / "m.onnx", x, verify=True)
    assert result.max_abs_diff < 1e-4
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    assert session.run(None, {"input": x[:1].numpy()})[0].shape == (1, 10)


def test_rounding_to_8_gives_back_what_it_overcut_of_a_macs_budget():
    x = torch.randn(1, 1, 28, 28)
    dense = count_macs(es.load_model("zoo:resnet8"), x)
    over = es.load_model("zoo:resnet8")
    prune_(over, ChannelPrune(macs=0.5, round_to=8, fill=False), example=x)
    filled = es.load_model("zoo:resnet8")
    prune_(filled, ChannelPrune(macs=0.5, round_to=8), example=x)
    assert count_macs(over, x) < 0.45 * dense  # the 16-wide groups can only halve
    assert 0.47 * dense <= count_macs(filled, x) <= 0.5 * dense
    convs = [m for m in filled.modules() if isinstance(m, nn.Conv2d)]
    assert all(m.out_channels % 8 == 0 for m in convs)


def test_shufflenet_prunes_around_its_channel_shuffles():
    """A channel shuffle maps channel i to another channel: every group through one keeps its
    width (Torch-Pruning's own tracing failed there with a ZeroDivisionError); the branches'
    inner widths, the stem and the head are cut, equal to zeroing those channels."""
    torch.manual_seed(0)
    model = _randomize_bn(es.load_model("zoo:shufflenetv2"))
    x = torch.randn(4, 1, 28, 28)
    cfg = ChannelPrune(ratio=0.5)
    expected, plans = _zeroed_reference(model, x, cfg)
    widths = [(u.branch2[2][0].out_channels, u.branch2[0][0].in_channels) for u in model.units]
    macs = count_macs(model, x)
    got = prune_(model, cfg, example=x)["removed"]
    inner = {f"units.{i}.branch2.0.0" for i in range(6)}
    assert set(got) == {p.group for p in plans} == inner | {"stem.0", "head.0"}
    for unit, (out, cin) in zip(model.units, widths, strict=True):
        assert unit.branch2[2][0].out_channels == out  # into the concat and the shuffle
        assert unit.branch2[0][0].out_channels == unit.branch2[1][0].groups < out
        if unit.stride == 1:
            assert unit.branch2[0][0].in_channels == cin  # the split's half: uncut
    assert model.stem[0].out_channels == 12 and model.classifier.in_features == 96
    assert count_macs(model, x) < 0.5 * macs
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


class Halve(nn.Module):
    permutes_channels = True  # but it drops half the channels: not a permutation

    def forward(self, x):
        return x[:, : x.shape[1] // 2]


def test_a_shuffle_the_graph_cannot_trace_is_named(monkeypatch):
    from edgeslim.core.models.zoo import ChannelShuffle

    x = torch.rand(2, 1, 28, 28)
    model = es.load_model("zoo:shufflenetv2").eval()
    monkeypatch.setattr(ChannelShuffle, "permutes_channels", False)  # undeclared: as before
    with pytest.raises(UnsupportedOpError, match=r"ZeroDivisionError.*permutes_channels = True"):
        prune_(model, ChannelPrune(ratio=0.5), example=x)
    assert model.stem[0].out_channels == 24  # nothing was cut
    model = nn.Sequential(nn.Conv2d(1, 8, 3), Halve(), nn.Flatten(), nn.Linear(4 * 26 * 26, 2))
    with pytest.raises(UnsupportedOpError, match="Halve declares permutes_channels but"):
        prune_(model.eval(), ChannelPrune(ratio=0.5), example=x)
    assert model[0].out_channels == 8 and "forward" not in vars(model[1])  # restored
