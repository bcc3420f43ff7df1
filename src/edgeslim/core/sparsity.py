"""N:M layout of a weight tensor: groups of M along the input dimension, and which pattern
(1:4, 2:4, 4:8) a weight's zeros follow. Used by N:M pruning (``prune.nm``) and by the
profiler, which says that dense CPU runtimes get no speedup from such zeros.
"""

from __future__ import annotations

import torch

PATTERNS = ((1, 4), (2, 4), (4, 8))  # the patterns nm_pattern recognises, strictest first


def _groups(weight: torch.Tensor, m: int) -> torch.Tensor:
    """View of ``weight`` as (rows, groups, m) with groups along the input dimension."""
    w = weight if weight.dim() == 2 else weight.movedim(1, -1)  # conv: (out, *k, in/g)
    return w.reshape(-1, w.shape[-1] // m, m)


def _ungroup(groups: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_groups`."""
    if like.dim() == 2:
        return groups.reshape(like.shape)
    moved = like.movedim(1, -1)
    return groups.reshape(moved.shape).movedim(-1, 1)


def nm_supported(weight: torch.Tensor, m: int) -> bool:
    """True when the input dimension of ``weight`` splits into whole groups of ``m``."""
    return weight.dim() >= 2 and weight.shape[1] % m == 0


def nm_pattern(weight: torch.Tensor) -> tuple[int, int] | None:
    """The strictest pattern of :data:`PATTERNS` that ``weight`` satisfies, if it is sparse.

    ``None`` for a dense tensor or one whose zeros follow no N:M pattern.
    """
    w = weight.detach()
    if w.dim() < 2 or int(torch.count_nonzero(w)) == w.numel():
        return None
    for n, m in PATTERNS:
        if nm_supported(w, m) and int((_groups(w, m) != 0).sum(-1).max()) <= n:
            return n, m
    return None


__all__ = ["PATTERNS", "_groups", "_ungroup", "nm_pattern", "nm_supported"]
