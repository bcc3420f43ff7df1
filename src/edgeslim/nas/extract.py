"""A sub-network cut out of the supernet as an ordinary module, and its BatchNorm
statistics re-estimated (Once-for-All, Cai et al. 2020, https://arxiv.org/abs/1908.09791).

:func:`extract` copies the active slices of the supernet's weights into plain ``Conv2d`` /
``BatchNorm2d`` / ``ReLU6`` / ``Linear`` layers -- the zoo's own inverted-residual block
(:class:`edgeslim.core.models.zoo.InvertedResidual`) -- so that every edgeslim verb and
exporter accepts the result (a fused stage's blocks: :class:`FusedInvertedResidual`, a
``k x k`` conv + BatchNorm + ReLU6 and a 1x1 conv + BatchNorm). :func:`recalibrate_bn`
replaces the supernet's running statistics, which mix many sub-networks, by the
sub-network's own.
"""

from __future__ import annotations

import torch
from torch import nn

from edgeslim.core.models.zoo import InvertedResidual, conv_bn
from edgeslim.nas.supernet import DynBN, DynConv, SubnetConfig, Supernet, SupernetSpec, scaled

__all__ = ["FusedInvertedResidual", "Subnet", "extract", "recalibrate_bn"]


class FusedInvertedResidual(nn.Module):
    """k x k conv to ``cin x expand`` channels -> 1x1 linear projection (Fused-MBConv), with
    a residual when shapes match; plain ``Conv2d`` / ``BatchNorm2d`` / ``ReLU6`` layers."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int, kernel: int = 3) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_residual = stride == 1 and cin == cout
        self.block = nn.Sequential(
            conv_bn(cin, hidden, kernel, stride), conv_bn(hidden, cout, 1, act=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return x + y if self.use_residual else y


class Subnet(nn.Module):
    """A sub-network cut out of a :class:`Supernet`: plain layers only."""

    def __init__(self, spec: SupernetSpec, cfg: SubnetConfig) -> None:
        super().__init__()
        stem = scaled(spec.stem, cfg.width)
        self.stem = conv_bn(spec.in_channels, stem, 3, spec.stem_stride)
        blocks: list[nn.Module] = []
        cin = stem
        for s, (c, _, stride) in enumerate(spec.stages):
            cout = scaled(c, cfg.width)
            for i in range(cfg.depths[s]):
                st = stride if i == 0 else 1
                kind = FusedInvertedResidual if spec.fused(s) else InvertedResidual
                blocks.append(kind(cin, cout, st, cfg.expands[s][i], kernel=cfg.kernels[s][i]))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        head = scaled(spec.head, cfg.width)
        self.head = conv_bn(cin, head, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(head, spec.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.blocks(self.stem(x)))
        x = torch.flatten(self.pool(x), 1)
        return self.classifier(x)


def _copy_conv_bn(seq: nn.Sequential, conv: DynConv, bn: DynBN, cin: int, cout: int, k: int):
    target = seq[0]
    with torch.no_grad():
        target.weight.copy_(conv.active(cin, cout, k))
        dst = seq[1]
        dst.weight.copy_(bn.weight[:cout])
        dst.bias.copy_(bn.bias[:cout])
        dst.running_mean.copy_(bn.running_mean[:cout])
        dst.running_var.copy_(bn.running_var[:cout])
        dst.num_batches_tracked.copy_(bn.num_batches_tracked)


def extract(supernet: Supernet, cfg: SubnetConfig) -> Subnet:
    """Sub-network ``cfg`` of ``supernet`` as an ordinary module (weights and BatchNorm
    statistics copied out; ``input_shape`` = (C, r, r) and ``num_classes`` set). In eval mode
    its outputs on ``x`` at resolution r equal ``supernet(x, cfg)``."""
    spec = supernet.spec
    spec.check(cfg)
    sub = Subnet(spec, cfg)
    stem = scaled(spec.stem, cfg.width)
    _copy_conv_bn(sub.stem, supernet.stem, supernet.stem_bn, spec.in_channels, stem, 3)
    cin, j = stem, 0
    for s, (c, _, _) in enumerate(spec.stages):
        cout = scaled(c, cfg.width)
        for i in range(cfg.depths[s]):
            src, dst = supernet.stages[s][i], sub.blocks[j].block
            hidden, k = cin * cfg.expands[s][i], cfg.kernels[s][i]
            if spec.fused(s):
                _copy_conv_bn(dst[0], src.conv, src.bn1, cin, hidden, k)
                _copy_conv_bn(dst[1], src.project, src.bn2, hidden, cout, 1)
                cin, j = cout, j + 1
                continue
            _copy_conv_bn(dst[0], src.expand, src.bn1, cin, hidden, 1)
            _copy_conv_bn(dst[1], src.dw, src.bn2, 1, hidden, k)
            _copy_conv_bn(dst[2], src.project, src.bn3, hidden, cout, 1)
            cin, j = cout, j + 1
    head = scaled(spec.head, cfg.width)
    _copy_conv_bn(sub.head, supernet.head, supernet.head_bn, cin, head, 1)
    with torch.no_grad():
        sub.classifier.weight.copy_(supernet.classifier.weight[:, :head])
        sub.classifier.bias.copy_(supernet.classifier.bias)
    sub.input_shape = (spec.in_channels, cfg.resolution, cfg.resolution)
    sub.num_classes = spec.num_classes
    sub.nas_config = cfg.to_dict()
    return sub.train(supernet.training)


@torch.no_grad()
def recalibrate_bn(model: nn.Module, x: torch.Tensor, batch_size: int = 100) -> nn.Module:
    """Reset every BatchNorm's statistics and re-estimate them on ``x`` (already at the
    model's resolution): the cumulative mean over the batches, as OFA does per sub-network
    (the supernet's running statistics mix many sub-networks). Returns ``model`` in eval mode."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    model.train()
    try:
        for i in range(0, len(x), batch_size):
            model(x[i : i + batch_size])
    finally:
        for m, mom in zip(bns, saved, strict=True):
            m.momentum = mom
    return model.eval()
