"""Built-in networks sized for 1x28x28 inputs (MNIST).

Each factory returns an ordinary ``nn.Module`` with two extra attributes that the rest of
edgeslim reads: ``input_shape`` (one example, without the batch dimension) and
``num_classes``. Use :func:`create` or the ``zoo:NAME`` model source::

    model = edgeslim.zoo.create("lenet5")
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..errors import UnknownModelError

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator that adds a model factory to the zoo under ``name``."""

    def wrap(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _REGISTRY[name] = factory
        return factory

    return wrap


def names() -> list[str]:
    """The names of all zoo models, sorted."""
    return sorted(_REGISTRY)


def create(name: str, **kwargs: object) -> nn.Module:
    """Build the zoo model ``name`` with fresh (seeded by the caller) weights."""
    if name not in _REGISTRY:
        raise UnknownModelError(f"unknown zoo model {name!r}; available: {', '.join(names())}")
    model = _REGISTRY[name](**kwargs)
    return model


def _tag(model: nn.Module, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    model.input_shape = tuple(input_shape)
    model.num_classes = num_classes
    return model


# --------------------------------------------------------------------------------------
# LeNets, as pruned by Han et al. 2015
# --------------------------------------------------------------------------------------


class LeNet300(nn.Module):
    """LeNet-300-100: an MLP 784-300-100-10 with ReLU (266,610 parameters)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(784, 300)
        self.fc2 = nn.Linear(300, 100)
        self.fc3 = nn.Linear(100, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)  # (B, 784)
        x = torch.relu(self.fc1(x))  # (B, 300)
        x = torch.relu(self.fc2(x))  # (B, 100)
        return self.fc3(x)  # (B, classes)


class LeNet5(nn.Module):
    """Caffe's LeNet-5 as used by Han et al. (431,080 parameters).

    conv 20@5x5 -> maxpool 2 -> conv 50@5x5 -> maxpool 2 -> fc 500 -> ReLU -> fc 10.
    Like the Caffe model, the only non-linearity is the ReLU after the first FC layer.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 20, 5)
        self.conv2 = nn.Conv2d(20, 50, 5)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(800, 500)
        self.fc2 = nn.Linear(500, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.conv1(x))  # (B, 20, 12, 12)
        x = self.pool(self.conv2(x))  # (B, 50, 4, 4)
        x = torch.flatten(x, 1)  # (B, 800)
        x = torch.relu(self.fc1(x))  # (B, 500)
        return self.fc2(x)  # (B, classes)


@register("lenet300")
def lenet300(num_classes: int = 10) -> nn.Module:
    """LeNet-300-100 (Han et al. 2015), 266,610 params."""
    return _tag(LeNet300(num_classes), (1, 28, 28), num_classes)


@register("lenet5")
def lenet5(num_classes: int = 10) -> nn.Module:
    """Caffe LeNet-5 (Han et al. 2015), 431,080 params."""
    return _tag(LeNet5(num_classes), (1, 28, 28), num_classes)


# --------------------------------------------------------------------------------------
# MobileNetV2-style: inverted residual blocks (Sandler et al. 2018)
# --------------------------------------------------------------------------------------


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: bool = True):
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """1x1 expand -> 3x3 depthwise -> 1x1 linear project, with a residual when shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_residual = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(_conv_bn(cin, hidden, 1))
        layers += [
            _conv_bn(hidden, hidden, 3, stride, groups=hidden),
            _conv_bn(hidden, cout, 1, act=False),
        ]
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return x + y if self.use_residual else y


class MobileNetV2(nn.Module):
    """A small MobileNetV2 for 1x28x28 inputs: 28 -> 14 -> 7 spatial, ~87K params."""

    # (expansion t, output channels c, repeats n, first stride s), as in the paper's table
    SETTINGS = ((1, 16, 1, 1), (4, 24, 2, 2), (4, 32, 2, 1), (4, 64, 2, 2))

    def __init__(self, num_classes: int = 10, width: float = 1.0) -> None:
        super().__init__()
        stem = max(8, int(16 * width))
        self.stem = _conv_bn(1, stem, 3)  # (B, 16, 28, 28)
        blocks: list[nn.Module] = []
        cin = stem
        for t, c, n, s in self.SETTINGS:
            cout = max(8, int(c * width))
            for i in range(n):
                blocks.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        self.blocks = nn.Sequential(*blocks)  # (B, 64, 7, 7)
        self.head = _conv_bn(cin, 128, 1)  # (B, 128, 7, 7)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.blocks(self.stem(x)))
        x = torch.flatten(self.pool(x), 1)  # (B, 128)
        return self.classifier(x)


@register("mobilenetv2")
def mobilenetv2(num_classes: int = 10, width: float = 1.0) -> nn.Module:
    """A small MobileNetV2-style net (inverted residuals, depthwise 3x3) for 28x28 inputs."""
    return _tag(MobileNetV2(num_classes, width), (1, 28, 28), num_classes)


# --------------------------------------------------------------------------------------
# ResNet-8-style: basic residual blocks (He et al. 2016)
# --------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity or 1x1-projection shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + self.shortcut(x))


class ResNet(nn.Module):
    """A small ResNet for 1x28x28 inputs: stem, three stages of basic blocks, avg pool, fc."""

    def __init__(self, num_classes: int = 10, widths=(16, 32, 64), blocks_per_stage: int = 1):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()
        )  # (B, 16, 28, 28)
        stages: list[nn.Module] = []
        cin = widths[0]
        for i, w in enumerate(widths):
            for j in range(blocks_per_stage):
                stride = 2 if (i > 0 and j == 0) else 1
                stages.append(BasicBlock(cin, w, stride))
                cin = w
        self.layers = nn.Sequential(*stages)  # (B, 64, 7, 7)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


@register("resnet8")
def resnet8(num_classes: int = 10) -> nn.Module:
    """ResNet-8: stem + 3 basic blocks (16/32/64 channels), ~78K params, for 28x28 inputs."""
    return _tag(ResNet(num_classes), (1, 28, 28), num_classes)
