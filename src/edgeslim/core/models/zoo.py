"""Built-in networks sized for 1x28x28 inputs (MNIST).

Each factory returns an ordinary ``nn.Module`` with two extra attributes that the rest of
edgeslim reads: ``input_shape`` (one example, without the batch dimension) and
``num_classes``. Use :func:`create` or the ``zoo:NAME`` model source::

    model = edgeslim.zoo.create("lenet5")
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from edgeslim.core.errors import UnknownModelError

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


def conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: bool = True):
    """k x k conv (no bias, same padding) -> BatchNorm -> ReLU6 (unless ``act`` is False)."""
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """1x1 expand -> k x k depthwise -> 1x1 linear project, with a residual when shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int, kernel: int = 3) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_residual = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(conv_bn(cin, hidden, 1))
        layers += [
            conv_bn(hidden, hidden, kernel, stride, groups=hidden),
            conv_bn(hidden, cout, 1, act=False),
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
        self.stem = conv_bn(1, stem, 3)  # (B, 16, 28, 28)
        blocks: list[nn.Module] = []
        cin = stem
        for t, c, n, s in self.SETTINGS:
            cout = max(8, int(c * width))
            for i in range(n):
                blocks.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        self.blocks = nn.Sequential(*blocks)  # (B, 64, 7, 7)
        self.head = conv_bn(cin, 128, 1)  # (B, 128, 7, 7)
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


# --------------------------------------------------------------------------------------
# MobileNetV1: depthwise separable convolutions (Howard et al. 2017)
# --------------------------------------------------------------------------------------


class MobileNetV1(nn.Module):
    """A small MobileNetV1 for 1x28x28 inputs: 3x3 depthwise + 1x1 pointwise blocks.

    Andrew G. Howard et al. "MobileNets: Efficient Convolutional Neural Networks for Mobile
    Vision Applications", 2017. https://arxiv.org/abs/1704.04861
    """

    # (output channels, stride) of each depthwise separable block: 28 -> 14 -> 7 spatial
    SETTINGS = ((32, 1), (64, 2), (64, 1), (128, 2), (128, 1))

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = conv_bn(1, 16, 3)  # (B, 16, 28, 28)
        blocks: list[nn.Module] = []
        cin = 16
        for cout, stride in self.SETTINGS:
            blocks.append(
                nn.Sequential(
                    conv_bn(cin, cin, 3, stride, groups=cin),  # depthwise 3x3
                    conv_bn(cin, cout, 1),  # pointwise 1x1
                )
            )
            cin = cout
        self.blocks = nn.Sequential(*blocks)  # (B, 128, 7, 7)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))  # (B, 128, 7, 7)
        return self.classifier(torch.flatten(self.pool(x), 1))  # (B, classes)


@register("mobilenetv1")
def mobilenetv1(num_classes: int = 10) -> nn.Module:
    """MobileNetV1-style net (depthwise separable blocks), 36,874 params, for 28x28 inputs."""
    return _tag(MobileNetV1(num_classes), (1, 28, 28), num_classes)


# --------------------------------------------------------------------------------------
# ShuffleNetV2: channel split, branch, concat, channel shuffle (Ma et al. 2018)
# --------------------------------------------------------------------------------------


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Interleave the channels of ``groups`` groups: (B, g*n, H, W) -> (B, n*g, H, W)."""
    b, c, h, w = x.shape
    x = x.reshape(b, groups, c // groups, h, w).transpose(1, 2)  # (B, n, g, H, W)
    return x.reshape(b, c, h, w)


class ChannelShuffle(nn.Module):
    """:func:`channel_shuffle` as a module. ``permutes_channels`` tells structured pruning
    (``edgeslim.prune.groups``) that output channel ``i`` is not input channel ``i``: it
    keeps the width of every channel group that passes through a shuffle."""

    permutes_channels = True

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return channel_shuffle(x, self.groups)


class ShuffleUnit(nn.Module):
    """ShuffleNetV2 unit. Stride 1: split channels in half, transform one half, concat,
    shuffle. Stride 2: both branches see the whole input and halve the resolution."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        half = cout // 2
        branch_in = cin if stride == 2 else cin // 2
        if stride == 1 and cin != cout:
            raise ValueError(f"a stride-1 ShuffleUnit keeps its width (got {cin} -> {cout})")
        self.branch2 = nn.Sequential(
            _relu_conv_bn(branch_in, half, 1),
            conv_bn(half, half, 3, stride, groups=half, act=False),  # depthwise
            _relu_conv_bn(half, half, 1),
        )
        self.branch1: nn.Module = nn.Identity()
        self.shuffle = ChannelShuffle(2)
        if stride == 2:
            self.branch1 = nn.Sequential(
                conv_bn(cin, cin, 3, stride, groups=cin, act=False),  # depthwise
                _relu_conv_bn(cin, half, 1),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)  # (B, C/2, H, W) each
            out = torch.cat([x1, self.branch2(x2)], dim=1)
        else:
            out = torch.cat([self.branch1(x), self.branch2(x)], dim=1)  # (B, cout, H/2, W/2)
        return self.shuffle(out)


def _relu_conv_bn(cin: int, cout: int, k: int) -> nn.Sequential:
    """conv -> BN -> ReLU (ShuffleNetV2 uses ReLU, not ReLU6)."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, 1, k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class ShuffleNetV2(nn.Module):
    """A small ShuffleNetV2 for 1x28x28 inputs: 28 -> 14 -> 7 spatial, 2 stages of 3 units.

    Ningning Ma, Xiangyu Zhang, Hai-Tao Zheng, Jian Sun. "ShuffleNet V2: Practical Guidelines
    for Efficient CNN Architecture Design", ECCV 2018. https://arxiv.org/abs/1807.11164
    """

    def __init__(self, num_classes: int = 10, widths: tuple[int, int] = (48, 96)) -> None:
        super().__init__()
        self.stem = _relu_conv_bn(1, 24, 3)  # (B, 24, 28, 28)
        units: list[nn.Module] = []
        cin = 24
        for width in widths:
            units += [ShuffleUnit(cin, width, 2), ShuffleUnit(width, width, 1)]
            units.append(ShuffleUnit(width, width, 1))
            cin = width
        self.units = nn.Sequential(*units)  # (B, 96, 7, 7)
        self.head = _relu_conv_bn(cin, 192, 1)  # (B, 192, 7, 7)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(192, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.units(self.stem(x)))
        return self.classifier(torch.flatten(self.pool(x), 1))  # (B, classes)


@register("shufflenetv2")
def shufflenetv2(num_classes: int = 10) -> nn.Module:
    """ShuffleNetV2-style net (channel split + shuffle units), 45,346 params, 28x28 inputs."""
    return _tag(ShuffleNetV2(num_classes), (1, 28, 28), num_classes)


# --------------------------------------------------------------------------------------
# SqueezeNet: Fire modules (Iandola et al. 2016)
# --------------------------------------------------------------------------------------


class Fire(nn.Module):
    """Squeeze (1x1 to few channels), then expand with 1x1 and 3x3 convs side by side."""

    def __init__(self, cin: int, squeeze: int, expand1: int, expand3: int) -> None:
        super().__init__()
        self.squeeze = _relu_conv_bn(cin, squeeze, 1)
        self.expand1 = _relu_conv_bn(squeeze, expand1, 1)
        self.expand3 = _relu_conv_bn(squeeze, expand3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.squeeze(x)  # (B, squeeze, H, W)
        return torch.cat([self.expand1(s), self.expand3(s)], dim=1)


class SqueezeNet(nn.Module):
    """A small SqueezeNet for 1x28x28 inputs: conv, 4 Fire modules, 1x1 conv classifier.

    Forrest N. Iandola et al. "SqueezeNet: AlexNet-level accuracy with 50x fewer parameters
    and <0.5MB model size", 2016. https://arxiv.org/abs/1602.07360
    Like the original there is no fully connected layer: a 1x1 conv makes one map per class
    and global average pooling turns the maps into logits. Unlike the original, every conv
    but the classifier is followed by BatchNorm: without it this small net barely trains in
    8 epochs on the MNIST subset (54% test accuracy, 97% with it).
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = _relu_conv_bn(1, 32, 3)  # (B, 32, 28, 28)
        self.pool = nn.MaxPool2d(2)
        self.fire1 = Fire(32, 8, 32, 32)  # (B, 64, 14, 14)
        self.fire2 = Fire(64, 8, 32, 32)  # (B, 64, 14, 14)
        self.fire3 = Fire(64, 16, 64, 64)  # (B, 128, 7, 7)
        self.fire4 = Fire(128, 16, 64, 64)  # (B, 128, 7, 7)
        self.dropout = nn.Dropout(0.5)
        self.classifier = nn.Conv2d(128, num_classes, 1)  # (B, classes, 7, 7)
        self.gap = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.stem(x))  # (B, 32, 14, 14)
        x = self.pool(self.fire2(self.fire1(x)))  # (B, 64, 7, 7)
        x = self.fire4(self.fire3(x))  # (B, 128, 7, 7)
        x = self.classifier(self.dropout(x))
        return torch.flatten(self.gap(x), 1)  # (B, classes)


@register("squeezenet")
def squeezenet(num_classes: int = 10) -> nn.Module:
    """SqueezeNet-style net (Fire modules, conv classifier), 31,946 params, 28x28 inputs."""
    return _tag(SqueezeNet(num_classes), (1, 28, 28), num_classes)


# --------------------------------------------------------------------------------------
# A tiny Vision Transformer (Dosovitskiy et al. 2021)
# --------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head self-attention: one qkv projection, scaled dot product, output projection."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape  # (B, N, D)
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, heads, N, D/heads)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, D/heads)
        return self.proj(y.transpose(1, 2).reshape(b, n, d))  # (B, N, D)


class TransformerBlock(nn.Module):
    """Pre-norm transformer encoder block: x + attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViTTiny(nn.Module):
    """A tiny ViT for 1x28x28 inputs: 7x7 patches (16 tokens + class token), 4 blocks of width 64.

    Alexey Dosovitskiy et al. "An Image is Worth 16x16 Words: Transformers for Image
    Recognition at Scale", ICLR 2021. https://arxiv.org/abs/2010.11929
    With 4x4 patches (49 tokens) the same net reaches only ~80% test accuracy in 8 epochs on
    the MNIST subset; 16 larger patches train faster (95% in 20 epochs, batch 32, lr 1e-3).
    """

    def __init__(
        self, num_classes: int = 10, dim: int = 64, depth: int = 4, heads: int = 4, mlp: int = 128
    ) -> None:
        super().__init__()
        self.patch = nn.Conv2d(1, dim, 7, stride=7)  # (B, D, 4, 4)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, 17, dim) * 0.02)
        self.blocks = nn.Sequential(*[TransformerBlock(dim, heads, mlp) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)  # (B, 16, D)
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # (B, 1, D)
        x = torch.cat([cls, x], dim=1) + self.pos  # (B, 17, D)
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])  # (B, classes)


@register("vit_tiny")
def vit_tiny(num_classes: int = 10) -> nn.Module:
    """Tiny ViT (7x7 patches, 4 pre-norm blocks, width 64, 4 heads), 139,018 params."""
    return _tag(ViTTiny(num_classes), (1, 28, 28), num_classes)


# --------------------------------------------------------------------------------------
# Hinton et al. 2015's MNIST MLPs: the distillation teacher and student
# --------------------------------------------------------------------------------------


class MLP(nn.Module):
    """784 -> hidden -> hidden -> classes with ReLU; optional dropout on input and hidden."""

    def __init__(
        self, hidden: int, num_classes: int = 10, in_drop: float = 0.0, drop: float = 0.0
    ) -> None:
        super().__init__()
        self.in_drop = nn.Dropout(in_drop)
        self.fc1 = nn.Linear(784, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, num_classes)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.in_drop(torch.flatten(x, 1))  # (B, 784)
        x = self.drop(torch.relu(self.fc1(x)))  # (B, hidden)
        x = self.drop(torch.relu(self.fc2(x)))  # (B, hidden)
        return self.fc3(x)  # (B, classes)


@register("mlp2x1200")
def mlp2x1200(num_classes: int = 10) -> nn.Module:
    """Hinton et al.'s MNIST teacher: 2x1200 ReLU, dropout 0.2 in / 0.5 hidden, 2,395,210 params."""
    return _tag(MLP(1200, num_classes, in_drop=0.2, drop=0.5), (1, 28, 28), num_classes)


@register("mlp2x800")
def mlp2x800(num_classes: int = 10) -> nn.Module:
    """Hinton et al.'s MNIST student: 2x800 ReLU, no regularisation, 1,276,810 params."""
    return _tag(MLP(800, num_classes), (1, 28, 28), num_classes)


# --------------------------------------------------------------------------------------
# A LeNet for Haar sub-band inputs (edgeslim.core.data.transforms.haar_split)
# --------------------------------------------------------------------------------------


class HaarNet(nn.Module):
    """LeNet-5's layout for 4x14x14 Haar sub-bands: half the resolution, 3x3 convolutions.

    The four sub-bands (LL, LH, HL, HH) of a 28x28 image hold all of its information at a
    quarter of the positions, so the network runs on 14x14 maps: ~6x fewer MACs than LeNet-5.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 20, 3)
        self.conv2 = nn.Conv2d(20, 50, 3)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(200, 500)
        self.fc2 = nn.Linear(500, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv1(x)))  # (B, 20, 6, 6)
        x = self.pool(torch.relu(self.conv2(x)))  # (B, 50, 2, 2)
        x = torch.relu(self.fc1(torch.flatten(x, 1)))  # (B, 500)
        return self.fc2(x)  # (B, classes)


@register("haarnet")
def haarnet(num_classes: int = 10) -> nn.Module:
    """LeNet-style net for 4x14x14 Haar sub-bands (data transform ``haar``), 115,300 params."""
    return _tag(HaarNet(num_classes), (4, 14, 14), num_classes)
