"""Helpers shared by the LLM benchmarks: the magnitude baseline on transformer blocks."""

from __future__ import annotations

import torch

from edgeslim.core.linear import is_linear, weight_matrix
from edgeslim.oneshot.blocks import find_blocks
from edgeslim.prune.wanda import apply_keep_, nm_mask


def magnitude_blocks_(
    model, sparsity: float | None = None, n: int | None = None, m: int | None = None
) -> dict[str, float]:
    """Magnitude pruning of every linear layer in the transformer blocks.

    ``sparsity``: the lowest |w| of each layer (one threshold per layer, as the magnitude
    baselines of the Wanda and SparseGPT papers); ``n``/``m``: keep the n largest |w| of every
    m consecutive inputs of a row.
    """
    prefix, blocks = find_blocks(model)
    log = {}
    for i, block in enumerate(blocks):
        for name, module in block.named_modules():
            if not is_linear(module):
                continue
            w = weight_matrix(module).abs()
            if n is not None and m is not None:
                keep = nm_mask(w, n, m)
            else:
                k = round((sparsity or 0.0) * w.numel())
                keep = torch.ones(w.numel(), dtype=torch.bool)
                keep[torch.argsort(w.reshape(-1), stable=True)[:k]] = False
                keep = keep.reshape(w.shape)
            log[f"{prefix}.{i}.{name}"] = apply_keep_(module, keep)
    return log
