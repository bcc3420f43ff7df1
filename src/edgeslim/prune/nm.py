"""N:M semi-structured sparsity: at most N nonzeros in every M consecutive weights.

Asit Mishra, Jorge Albericio Latorre, Jeff Pool et al. "Accelerating Sparse Deep Neural
Networks", 2021. https://arxiv.org/abs/2104.08378 (2:4 on NVIDIA Ampere sparse tensor cores);
Aojun Zhou et al. "Learning N:M Fine-grained Structured Sparse Neural Networks From Scratch",
ICLR 2021. https://arxiv.org/abs/2102.04010

Groups of M run along the *input* dimension, the one a dot product reduces over: for a Linear
weight (out, in) the groups are ``w[o, i:i+M]``; for a Conv weight (out, in/g, kh, kw) they are
M consecutive input channels at the same kernel position. In each group the N entries of
highest score (|w|, or the OBD saliency) are kept. A layer whose input size is not a multiple
of M (e.g. a 1-channel stem, a depthwise conv) is left dense and named in a warning.

**Speed.** Only hardware with sparse kernels for the pattern (NVIDIA Ampere and later, with
cuSPARSELt/TensorRT) runs N:M faster. Dense CPU runtimes -- PyTorch, ONNX Runtime, TFLite --
multiply the zeros like any other number: same latency, same dense file. :func:`nm_pattern`
lets :func:`edgeslim.profiling` say so next to every N:M model.
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch
from pydantic import ConfigDict, Field, model_validator
from torch import nn

from edgeslim.core.errors import ConfigError
from edgeslim.core.options import Options
from edgeslim.core.registry import Context
from edgeslim.core.sparsity import _groups, _ungroup, nm_supported
from edgeslim.prune.magnitude import apply_new_masks_, prunable_layers, target_layers
from edgeslim.prune.registry import REGISTRY


class NMPrune(Options):
    """Keep the ``n`` highest-scoring weights in every group of ``m`` along the input dim.

    ``score`` is ``magnitude`` (|w|) or ``obd`` (h_kk w^2 / 2 with a Fisher Hessian estimate
    on ``samples`` labelled examples: pass ``data=`` to :func:`prune_`).
    """

    model_config = ConfigDict(extra="forbid")

    n: int = Field(2, ge=1)
    m: int = Field(4, ge=2)
    score: Literal["magnitude", "obd"] = "magnitude"
    exclude: list[str] = Field(default_factory=list)
    samples: int = Field(256, ge=1, description="labelled examples for score='obd'")

    @model_validator(mode="after")
    def _n_below_m(self) -> NMPrune:
        if self.n >= self.m:
            raise ValueError(f"n must be smaller than m, got {self.n}:{self.m}")
        return self

    @property
    def sparsity(self) -> float:
        return 1 - self.n / self.m


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask with the ``n`` highest ``scores`` of every ``m`` along the input dim."""
    groups = _groups(scores, m)  # (rows, groups, m)
    top = groups.topk(n, dim=-1).indices
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top, True)
    return _ungroup(keep, scores)


def nm_prune_(model: nn.Module, cfg: NMPrune, ctx: Context) -> dict[str, float]:
    """Apply ``cfg.n``:``cfg.m`` masks in place; returns each pruned layer's sparsity."""
    filter_fn, data, calib = ctx.filter_fn, ctx.data, ctx.calib
    layers = target_layers(prunable_layers(model, filter_fn), cfg.exclude, None)
    supported = {k: v for k, v in layers.items() if nm_supported(v.weight, cfg.m)}
    if not supported:
        raise ConfigError(
            f"no layer of {type(model).__name__} has an input size divisible by m={cfg.m}"
        )
    skipped = sorted(set(layers) - set(supported))
    if skipped:
        warnings.warn(
            f"N:M {cfg.n}:{cfg.m}: layers left dense (input size not a multiple of {cfg.m}): "
            + ", ".join(skipped),
            stacklevel=2,
        )
    if cfg.score == "obd":
        from edgeslim.prune.obd import calibration_pairs, hessian_diagonal, obd_scores

        x, y = calibration_pairs(calib if calib is not None else data, cfg.samples)
        scores = obd_scores(supported, hessian_diagonal(model, supported, x, y))
    else:
        scores = {k: v.weight.detach().abs() for k, v in supported.items()}
    masks = {k: nm_mask(s, cfg.n, cfg.m) for k, s in scores.items()}
    return apply_new_masks_(supported, masks)


REGISTRY.register("nm", NMPrune, nm_prune_, takes=("filter_fn", "data", "calib"))
