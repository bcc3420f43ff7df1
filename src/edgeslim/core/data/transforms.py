"""Input transforms applied to a whole dataset before training (recipe ``data: transform``).

``haar``: one level of the 2-D Haar wavelet transform. Each 2x2 block ``[[a, b], [c, d]]`` of
every channel becomes four half-resolution sub-images::

    LL = (a + b + c + d) / 2      low frequencies: a half-size image
    LH = (a + b - c - d) / 2      horizontal edges (top minus bottom)
    HL = (a - b + c - d) / 2      vertical edges (left minus right)
    HH = (a - b - c + d) / 2      diagonal detail

so an image (C, H, W) becomes (4C, H/2, W/2): the same numbers of values, nothing lost (the
transform is orthonormal and :func:`haar_merge` inverts it), but a network sees a quarter of
the positions and its convolutions cost about 4x fewer MACs (zoo ``haarnet`` is LeNet-5's
layout for 4x14x14 inputs). Odd heights or widths are zero-padded by one row or column.

The same transform is the module :class:`HaarSplit` (a stride-2 depthwise convolution with
fixed weights) for putting in front of a deployed model that receives raw images.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from edgeslim.core.data.datasets import DataSplits
from edgeslim.core.errors import DataError, ShapeError

# the four 2x2 Haar filters, orthonormal: (4, 1, 2, 2) in the order LL, LH, HL, HH
HAAR_FILTERS = 0.5 * torch.tensor(
    [
        [[1.0, 1.0], [1.0, 1.0]],
        [[1.0, 1.0], [-1.0, -1.0]],
        [[1.0, -1.0], [1.0, -1.0]],
        [[1.0, -1.0], [-1.0, 1.0]],
    ]
).unsqueeze(1)


def haar_split(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 4C, ceil(H/2), ceil(W/2)): per channel LL, LH, HL, HH."""
    if x.dim() != 4:
        raise ShapeError(f"haar_split needs images (B, C, H, W), got shape {tuple(x.shape)}")
    c = x.shape[1]
    x = F.pad(x, (0, x.shape[3] % 2, 0, x.shape[2] % 2))  # even H and W
    weight = HAAR_FILTERS.to(x).repeat(c, 1, 1, 1)  # (4C, 1, 2, 2)
    return F.conv2d(x, weight, stride=2, groups=c)  # (B, 4C, H/2, W/2)


def haar_merge(bands: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`haar_split` (for even sizes): (B, 4C, h, w) -> (B, C, 2h, 2w)."""
    if bands.dim() != 4 or bands.shape[1] % 4:
        raise ShapeError(
            f"haar_merge needs sub-bands (B, 4C, h, w), got shape {tuple(bands.shape)}"
        )
    c = bands.shape[1] // 4
    weight = HAAR_FILTERS.to(bands).repeat(c, 1, 1, 1)  # (4C, 1, 2, 2)
    return F.conv_transpose2d(bands, weight, stride=2, groups=c)  # (B, C, 2h, 2w)


class HaarSplit(nn.Module):
    """:func:`haar_split` as a module, to run in front of a network trained on sub-bands."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return haar_split(x)


TRANSFORMS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"haar": haar_split}


def apply_transform(data: DataSplits, name: str | None) -> DataSplits:
    """``data`` with transform ``name`` applied to the inputs of every split (None: as is)."""
    if name is None:
        return data
    if name not in TRANSFORMS:
        raise DataError(f"unknown input transform {name!r}; known: {sorted(TRANSFORMS)}")
    fn = TRANSFORMS[name]
    # in memory: the whole tensor at once; streamed splits: each item as it is read
    train, val, test = (s.map_inputs(fn) for s in (data.train, data.val, data.test))
    return dataclasses.replace(data, name=f"{data.name}+{name}", train=train, val=val, test=test)
