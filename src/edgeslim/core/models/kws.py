"""A keyword-spotting network: DS-CNN for 49 x 10 MFCC inputs (Hello Edge).

Yundong Zhang, Naveen Suda, Liangzhen Lai, Vikas Chandra. "Hello Edge: Keyword Spotting on
Microcontrollers", 2017. https://arxiv.org/abs/1711.07128 (DS-CNN-S: a 10x4 stride-2 conv
with 64 filters, four depthwise-separable blocks of 64 channels, average pooling, a
fully connected classifier; ~24K parameters, ~2.7M MACs for 49 frames x 10 MFCCs).

The first conv pads the way TensorFlow's SAME does (4 rows above, 5 below, 1 column each
side), with an explicit ``nn.ZeroPad2d``, so the int8 graph and the ``.tflite`` file use
SAME padding with no extra PAD op. Load it with
``load_model("py:edgeslim.core.models.kws:ds_cnn")``.
"""

from __future__ import annotations

import torch
from torch import nn


def _bn_relu(channels: int) -> list[nn.Module]:
    return [nn.BatchNorm2d(channels), nn.ReLU(inplace=True)]


class DSCNN(nn.Module):
    """DS-CNN for (1, 49, 10) inputs: (B, 1, 49, 10) -> (B, num_classes)."""

    def __init__(self, num_classes: int = 12, channels: int = 64, blocks: int = 4) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.ZeroPad2d((1, 1, 4, 5)),  # (left, right, top, bottom): TF SAME for 10x4 / 2
            nn.Conv2d(1, channels, (10, 4), stride=2, bias=False),
            *_bn_relu(channels),
        )  # (B, 64, 25, 5)
        layers: list[nn.Module] = []
        for _ in range(blocks):
            layers += [
                nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False),
                *_bn_relu(channels),
                nn.Conv2d(channels, channels, 1, bias=False),
                *_bn_relu(channels),
            ]
        self.blocks = nn.Sequential(*layers)  # (B, 64, 25, 5)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        x = torch.flatten(self.pool(x), 1)  # (B, 64)
        return self.classifier(x)


def ds_cnn(num_classes: int = 12) -> nn.Module:
    """DS-CNN-S for 49 x 10 MFCC features, 12 keywords (Zhang et al. 2017)."""
    model = DSCNN(num_classes)
    model.input_shape = (1, 49, 10)
    model.num_classes = num_classes
    return model
