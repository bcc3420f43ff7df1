"""Wanda: pruning by weights and activations, one shot, no weight update.

Mingjie Sun, Zhuang Liu, Anna Bair, J. Zico Kolter. "A Simple and Effective Pruning Approach
for Large Language Models", ICLR 2024. https://arxiv.org/abs/2306.11695

The importance of weight W_ij (output i, input j) is its magnitude times the norm of the input
feature it multiplies over the calibration tokens::

    S_ij = |W_ij| * ||X_j||_2

and weights are compared *within each output row*: every row loses the same fraction of its
lowest-scoring weights (or, for N:M, each group of M consecutive inputs of a row keeps its N
best). No weights are updated. Statistics are gathered block by block by
:mod:`edgeslim.oneshot.engine`; scoring and mask choice are the pure functions below.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import ConfigDict, Field, model_validator
from torch import nn

from edgeslim.core.errors import ConfigError
from edgeslim.core.linear import to_param_layout, weight_matrix
from edgeslim.core.masks import get_mask, set_mask_
from edgeslim.core.options import Options
from edgeslim.oneshot.engine import ONE_SHOT_TAKES, one_shot_
from edgeslim.oneshot.registry import OneShotAlgorithm, register
from edgeslim.oneshot.stats import InputNorms
from edgeslim.prune.registry import REGISTRY


class OneShotPruneConfig(Options):
    """Target of a one-shot pruner: ``sparsity`` per layer, or N:M (``n`` of every ``m``)."""

    model_config = ConfigDict(extra="forbid")
    needs_calib: ClassVar[bool] = True  # the pipeline passes calibration data

    sparsity: float | None = Field(None, ge=0, lt=1, description="fraction of each row removed")
    n: int | None = Field(None, ge=1, description="N:M: keep n weights ...")
    m: int | None = Field(None, ge=2, description="... of every m consecutive inputs")
    exclude: list[str] = Field(default_factory=list, description="glob patterns left dense")
    batch_size: int = Field(8, ge=1, description="calibration batch size")

    @model_validator(mode="after")
    def _one_target(self) -> OneShotPruneConfig:
        nm = (self.n, self.m)
        if (self.n is None) != (self.m is None):
            raise ValueError("give both 'n' and 'm' for N:M sparsity")
        if self.n is not None and self.sparsity is not None:
            raise ValueError("give either 'sparsity' or 'n' and 'm', not both")
        if self.n is None and self.sparsity is None:
            raise ValueError("give 'sparsity' (e.g. 0.5) or 'n' and 'm' (e.g. 2 and 4)")
        if self.n is not None and self.m is not None and self.n >= self.m:
            raise ValueError(f"N:M needs n < m, got {nm[0]}:{nm[1]}")
        return self

    @property
    def target(self) -> str:
        return f"{self.n}:{self.m}" if self.n is not None else f"{self.sparsity:.0%}"

    @property
    def label(self) -> str:
        return f"{type(self).__name__.lower()} {self.target}"


class Wanda(OneShotPruneConfig):
    """Wanda (Sun et al. 2023): remove the weights with the lowest |W| * ||X||, per row."""


# --------------------------------------------------------------------------------------
# scoring and masks (pure functions on tensors)
# --------------------------------------------------------------------------------------


def wanda_scores(w: torch.Tensor, sq_norms: torch.Tensor) -> torch.Tensor:
    """S = |W| * ||X_j||_2: ``w`` (out, in), ``sq_norms`` (in,) sums of squares -> (out, in)
    float32, on ``w``'s device (a half-precision weight is scored in float32: a sum of squares
    overflows float16)."""
    norms = sq_norms.to(device=w.device, dtype=torch.float32).sqrt()
    return w.float().abs() * norms.unsqueeze(0)


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask removing the ``round(sparsity * in)`` lowest scores of every row."""
    out_f, in_f = scores.shape
    k = round(sparsity * in_f)
    keep = torch.ones(out_f, in_f, dtype=torch.bool, device=scores.device)
    if k > 0:
        lowest = torch.argsort(scores, dim=1, stable=True)[:, :k]  # (out, k)
        keep.scatter_(1, lowest, False)
    return keep


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask with the ``n`` best scores of every ``m`` consecutive inputs of a row.

    ``scores`` (out, in) with ``in`` divisible by ``m``. (Kept small and local; the N:M
    helpers of the structured-pruning package can replace it.)
    """
    out_f, in_f = scores.shape
    if in_f % m:
        raise ConfigError(f"N:M {n}:{m} needs the input size ({in_f}) to be divisible by {m}")
    groups = scores.reshape(out_f, in_f // m, m)  # (out, groups, m)
    best = torch.topk(groups, n, dim=2).indices  # (out, groups, n)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, best, True)
    return keep.reshape(out_f, in_f)


def is_nm(keep: torch.Tensor, n: int, m: int) -> bool:
    """Whether every group of ``m`` consecutive entries of each row keeps at most ``n``."""
    out_f, in_f = keep.shape
    return bool((keep.reshape(out_f, in_f // m, m).sum(2) <= n).all())


def wanda_mask(w: torch.Tensor, sq_norms: torch.Tensor, cfg: OneShotPruneConfig) -> torch.Tensor:
    """Wanda's keep-mask of one layer: ``w`` (out, in), ``sq_norms`` (in,)."""
    scores = wanda_scores(w, sq_norms)
    if cfg.n is not None and cfg.m is not None:
        return nm_mask(scores, cfg.n, cfg.m)
    return row_mask(scores, cfg.sparsity or 0.0)


def apply_keep_(module: nn.Module, keep: torch.Tensor) -> float:
    """Attach ``keep`` (out, in) as the layer's mask (masks only grow); return its sparsity."""
    keep = to_param_layout(module, keep)
    old = get_mask(module, "weight")
    if old is not None:
        keep = keep & old
    set_mask_(module, "weight", keep)
    return 1 - float(keep.float().mean())


# --------------------------------------------------------------------------------------
# the algorithm, as the layer-by-layer engine sees it
# --------------------------------------------------------------------------------------


class WandaAlgorithm(OneShotAlgorithm):
    """Collect ||X_j||^2 per layer; prune each layer from them."""

    stats_type = InputNorms
    cfg: OneShotPruneConfig

    def compress_layer(self, name: str, module: nn.Module, stats: InputNorms) -> float:
        keep = wanda_mask(weight_matrix(module), stats.sq, self.cfg)
        return apply_keep_(module, keep)


register(Wanda, WandaAlgorithm)

REGISTRY.register("wanda", Wanda, one_shot_, takes=ONE_SHOT_TAKES)
