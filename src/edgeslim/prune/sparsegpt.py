"""SparseGPT: one-shot pruning with an OBS weight update, column by column.

Elias Frantar, Dan Alistarh. "SparseGPT: Massive Language Models Can Be Accurately Pruned in
One-Shot", ICML 2023. https://arxiv.org/abs/2301.00774

For a linear layer with weights W (out, in) and calibration inputs X (tokens, in), SparseGPT
minimises the layer's output error ||W X^T - W' X^T||^2 under a sparsity mask. With the
Hessian H = 2/n X^T X it walks the input columns left to right; when column i is fixed (its
pruned entries set to 0), the error it leaves is spread over the columns still to come with
the Optimal Brain Surgeon update, using the upper Cholesky factor U of the damped inverse
Hessian (H + damp I)^-1::

    err   = (w_i - q_i) / U_ii
    W[:, i:] -= err (outer) U[i, i:]

Updates inside a block of ``blocksize`` columns are applied at once to the rest of the matrix
("lazy batch" updates). The mask is chosen per block of columns from w^2 / U_ii^2 (adaptive
mask selection: the lowest ``sparsity`` share of the block is removed); for N:M each group of
M columns keeps the N entries with the largest w^2 / U_jj^2 of each row.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from edgeslim.core.errors import ConfigError
from edgeslim.core.linear import set_weight_matrix_, weight_matrix
from edgeslim.oneshot.engine import ONE_SHOT_TAKES, one_shot_
from edgeslim.oneshot.registry import OneShotAlgorithm, register
from edgeslim.oneshot.stats import Hessian, damped_inverse_cholesky
from edgeslim.prune.registry import REGISTRY
from edgeslim.prune.wanda import OneShotPruneConfig, apply_keep_


class SparseGPT(OneShotPruneConfig):
    """SparseGPT (Frantar & Alistarh 2023): prune and reconstruct each layer from H = 2X^T X."""

    blocksize: int = Field(128, ge=1, description="columns per lazy batch update")
    percdamp: float = Field(0.01, gt=0, description="damping, as a share of mean(diag H)")


@torch.no_grad()
def sparsegpt_prune_(
    w: torch.Tensor,
    h: torch.Tensor,
    *,
    sparsity: float | None = None,
    n: int | None = None,
    m: int | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Prune ``w`` (out, in) in place, reconstructing from ``h`` (in, in); return the keep-mask.

    Give ``sparsity``, or ``n`` and ``m``, or a fixed keep-``mask`` (out, in) to only
    reconstruct. Runs on ``w``'s device (``h`` and ``mask`` are moved there); the column loop
    never reads a value back to the host, so on a GPU its kernels queue without waiting.
    """
    out_f, in_f = w.shape
    if h.shape != (in_f, in_f):
        raise ConfigError(f"Hessian shape {tuple(h.shape)} does not fit weight {(out_f, in_f)}")
    if n is not None and m is not None and in_f % m:
        raise ConfigError(f"N:M {n}:{m} needs the input size ({in_f}) to be divisible by {m}")
    device = w.device
    work = w.float().clone()
    u = damped_inverse_cholesky(h.to(device), work, percdamp).float()  # (in, in) upper
    if mask is not None:
        mask = mask.to(device)
    pruned = torch.zeros(out_f, in_f, dtype=torch.bool, device=device)  # True = removed
    for i1 in range(0, in_f, blocksize):
        i2 = min(i1 + blocksize, in_f)
        # the block's columns held as contiguous rows (b, out): every step updates whole rows,
        # the same arithmetic element by element as on (out, b) columns, and much faster
        w1t = work[:, i1:i2].t().contiguous()  # (b, out)
        u1 = u[i1:i2, i1:i2]  # (b, b)
        diag1 = torch.diag(u1)  # (b,)
        err1t = torch.zeros_like(w1t)
        if mask is not None:
            pruned1 = ~mask[:, i1:i2].bool()
        elif n is None:
            score = (w1t.pow(2) / diag1.pow(2).unsqueeze(1)).t()  # (out, b)
            k = int(score.numel() * (sparsity or 0.0))
            pruned1 = torch.zeros(score.shape, dtype=torch.bool, device=device)
            if k > 0:
                lowest = torch.argsort(score.reshape(-1), stable=True)[:k]
                pruned1.view(-1)[lowest] = True
        else:
            pruned1 = torch.zeros(out_f, i2 - i1, dtype=torch.bool, device=device)
        for i in range(i2 - i1):
            row = w1t[i]  # (out,): column i1 + i of W
            d = u1[i, i]
            if mask is None and n is not None and m is not None and i % m == 0:
                score = w1t[i : i + m].t().pow(2) / diag1[i : i + m].pow(2).unsqueeze(0)
                worst = torch.topk(score, m - n, dim=1, largest=False).indices  # (out, m-n)
                pruned1.scatter_(1, i + worst, True)
            q = row.masked_fill(pruned1[:, i], 0)
            err = (row - q) / d  # (out,)
            w1t[i:] -= u1[i, i:].unsqueeze(1) @ err.unsqueeze(0)
            w1t[i] = q
            err1t[i] = err
        work[:, i1:i2] = w1t.t()
        work[:, i2:] -= err1t.t().contiguous() @ u[i1:i2, i2:]
        pruned[:, i1:i2] = pruned1
    work.masked_fill_(pruned, 0)
    w.copy_(work.to(w.dtype))
    return ~pruned


class SparseGPTAlgorithm(OneShotAlgorithm):
    """Collect H = 2/n X^T X per layer; prune and reconstruct each layer."""

    stats_type = Hessian
    cfg: SparseGPT

    def compress_layer(self, name: str, module: nn.Module, stats: Hessian) -> float:
        cfg = self.cfg
        w = weight_matrix(module)  # (out, in)
        keep = sparsegpt_prune_(
            w,
            stats.h,
            sparsity=cfg.sparsity,
            n=cfg.n,
            m=cfg.m,
            blocksize=cfg.blocksize,
            percdamp=cfg.percdamp,
        )
        set_weight_matrix_(module, w)
        return apply_keep_(module, keep)


register(SparseGPT, SparseGPTAlgorithm)

REGISTRY.register("sparsegpt", SparseGPT, one_shot_, takes=ONE_SHOT_TAKES)
