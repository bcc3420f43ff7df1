"""Harder tasks generated from the bundled data, shared by the benchmarks.

**Shifted, cluttered MNIST** (:func:`cluttered_mnist`): the bundled 5,000-image subset,
each digit translated by up to 4 pixels (zero fill), six 7x7 patches cut from *other*
digits pasted at random places (clutter with digit-like strokes), Gaussian noise (sigma
0.15), clamped to [0, 1]; every test digit appears twice with different clutter (2,000 test
images), seeded. Dense nets reach 85-90% instead of 98-99%, so a one-point difference is
about 1.5 standard errors of the test estimate.
"""

from __future__ import annotations

import torch

import edgeslim as es
from edgeslim.core.data.datasets import DataSplits, Split


def _clutter(x: torch.Tensor, pool: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    n = len(x)
    out = torch.zeros_like(x)
    shifts = torch.randint(-4, 5, (n, 2), generator=g)
    for i in range(n):
        dy, dx = int(shifts[i, 0]), int(shifts[i, 1])
        out[i] = torch.roll(x[i], (dy, dx), (1, 2))
        if dy > 0:
            out[i, :, :dy] = 0
        elif dy < 0:
            out[i, :, dy:] = 0
        if dx > 0:
            out[i, :, :, :dx] = 0
        elif dx < 0:
            out[i, :, :, dx:] = 0
    src = torch.randint(0, len(pool), (n, 6), generator=g)
    pos = torch.randint(0, 21, (n, 6, 4), generator=g)
    for i in range(n):
        for k in range(6):
            sy, sx, ty, tx = (int(v) for v in pos[i, k])
            patch = pool[int(src[i, k]), :, sy : sy + 7, sx : sx + 7]
            out[i, :, ty : ty + 7, tx : tx + 7] = torch.maximum(
                out[i, :, ty : ty + 7, tx : tx + 7], patch
            )
    out += 0.15 * torch.randn(out.shape, generator=g)
    return out.clamp(0, 1)


def cluttered_mnist(seed: int = 0) -> DataSplits:
    """Shifted, cluttered MNIST from the bundled subset (see the module docstring)."""
    base = es.load_data("mnist")
    g = torch.Generator().manual_seed(seed)
    pool = base.train.x
    train = Split(_clutter(base.train.x, pool, g), base.train.y)
    val = Split(_clutter(base.val.x, pool, g), base.val.y)
    tx = torch.cat([_clutter(base.test.x, pool, g), _clutter(base.test.x, pool, g)])
    test = Split(tx, torch.cat([base.test.y, base.test.y]))
    return DataSplits("cluttered-mnist", train, val, test, base.num_classes)
