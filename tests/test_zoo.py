import pytest
import torch

import edgeslim as es
from edgeslim import zoo


@pytest.mark.parametrize(
    ("name", "params"),
    [("lenet300", 266_610), ("lenet5", 431_080)],
)
def test_lenet_param_counts_match_han2015(name, params):
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
    assert m.input_shape == (1, 28, 28)
    assert m(torch.randn(3, 1, 28, 28)).shape == (3, 10)


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
