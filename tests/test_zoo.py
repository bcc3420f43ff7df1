import pytest
import torch

import edgeslim as es
from edgeslim import zoo


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("lenet300", 266_610),
        ("lenet5", 431_080),
        ("mobilenetv1", 36_874),
        ("mobilenetv2", 86_634),
        ("shufflenetv2", 45_346),
        ("squeezenet", 31_946),
        ("vit_tiny", 139_018),
        ("resnet8", 77_754),
        ("mlp2x1200", 784 * 1200 + 1200 + 1200 * 1200 + 1200 + 1200 * 10 + 10),
        ("mlp2x800", 784 * 800 + 800 + 800 * 800 + 800 + 800 * 10 + 10),
        ("haarnet", 115_300),
    ],
)
def test_zoo_param_counts(name, params):
    model = zoo.create(name)
    assert sum(p.numel() for p in model.parameters()) == params


def test_lenet5_is_the_caffe_architecture():
    m = zoo.create("lenet5")
    assert (m.conv1.out_channels, m.conv1.kernel_size) == (20, (5, 5))
    assert (m.conv2.out_channels, m.conv2.kernel_size) == (50, (5, 5))
    assert (m.fc1.in_features, m.fc1.out_features, m.fc2.out_features) == (800, 500, 10)


@pytest.mark.parametrize("name", zoo.names())
def test_every_zoo_model_runs_on_mnist_shape(name):
    m = zoo.create(name).eval()
    # haarnet takes the 4 Haar sub-bands of a 28x28 image (data transform "haar")
    assert m.input_shape == ((4, 14, 14) if name == "haarnet" else (1, 28, 28))
    assert m(torch.randn(3, *m.input_shape)).shape == (3, 10)


def _convs(model, depthwise):
    return [
        c
        for c in model.modules()
        if isinstance(c, torch.nn.Conv2d) and (c.groups == c.in_channels > 1) == depthwise
    ]


def test_lightweight_architectures_have_their_signature_layers():
    from edgeslim.core.models.zoo import Fire, ShuffleUnit, TransformerBlock, channel_shuffle

    v1 = zoo.create("mobilenetv1")
    assert len(_convs(v1, depthwise=True)) == 5
    assert [c.kernel_size for c in _convs(v1, depthwise=False)][1:] == [(1, 1)] * 5  # pointwise
    sh = zoo.create("shufflenetv2")
    assert sum(isinstance(m, ShuffleUnit) for m in sh.modules()) == 6
    x = torch.arange(8.0).reshape(1, 8, 1, 1)
    assert channel_shuffle(x, 2).flatten().tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    sq = zoo.create("squeezenet")
    assert sum(isinstance(m, Fire) for m in sq.modules()) == 4
    assert not any(isinstance(m, torch.nn.Linear) for m in sq.modules())  # conv classifier
    vit = zoo.create("vit_tiny")
    assert sum(isinstance(m, TransformerBlock) for m in vit.modules()) == 4
    assert vit.patch(torch.zeros(1, 1, 28, 28)).shape == (1, 64, 4, 4)  # 16 patch tokens
    teacher, student = zoo.create("mlp2x1200"), zoo.create("mlp2x800")
    assert [m.p for m in teacher.modules() if isinstance(m, torch.nn.Dropout)] == [0.2, 0.5]
    assert [m.p for m in student.modules() if isinstance(m, torch.nn.Dropout)] == [0.0, 0.0]


def test_small_nets_are_small_and_use_depthwise_and_residuals():
    mb = zoo.create("mobilenetv2")
    depthwise = [
        c for c in mb.modules() if isinstance(c, torch.nn.Conv2d) and c.groups == c.in_channels > 1
    ]
    assert depthwise, "MobileNetV2 must have depthwise convolutions"
    assert sum(p.numel() for p in mb.parameters()) < 150_000
    rn = zoo.create("resnet8")
    assert sum(p.numel() for p in rn.parameters()) < 150_000


def test_unknown_zoo_name_raises_and_lists_names():
    with pytest.raises(es.UnknownModelError, match="lenet5"):
        zoo.create("alexnet")
    with pytest.raises(es.EdgeslimError, match="unknown zoo model 'nope'"):
        es.load_model("zoo:nope")
