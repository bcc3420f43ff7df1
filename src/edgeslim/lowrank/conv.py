"""Zhang et al.: factor a layer by reconstructing its responses on calibration data.

Xiangyu Zhang, Jianhua Zou, Xiang Ming, Kaiming He, Jian Sun. "Efficient and Accurate
Approximations of Nonlinear Convolutional Networks", CVPR 2015.
https://arxiv.org/abs/1411.4229 (and the journal version, "Accelerating Very Deep
Convolutional Networks for Classification and Detection", TPAMI 2016, arXiv:1505.06798)

A conv layer with d filters computes at every output position a response ``y = W x + b``
in R^d (``x``: the c*k*k input patch). The responses of real data lie near a
low-dimensional subspace, so (paper, sec. 3.1, the linear case)::

    y ~ P_r P_r^T (y - m) + m        P_r: top-r eigenvectors of the response covariance,
                                     m: the mean response

minimises the mean squared reconstruction error ``E |y - y'|^2`` over all rank-r maps. It is
one k x k conv with r filters followed by a 1 x 1 conv::

    first  = P_r^T W                 (c -> r, k x k, no bias)
    second = P_r,  bias m + P_r P_r^T (b - m)      (r -> d, 1 x 1)

The covariance comes from one pass over calibration inputs
(:func:`edgeslim.core.hooks.run_calibration`); every spatial position of every image is a
sample. A Linear layer is the 1 x 1 case (every token is a sample). Plain weight SVD
(:mod:`.svd`, ``solver: svd``) has the same structure but ignores the data; at equal rank
response reconstruction loses less. The paper's nonlinear (ReLU-aware, GSVD) and
asymmetric refinements are not implemented: this is its closed-form linear solution.
The spatially separable k x 1 + 1 x k option (``separable: true``) is solved from the
weights (Jaderberg et al. 2014).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from edgeslim.core.errors import ConfigError
from edgeslim.core.hooks import run_calibration
from edgeslim.core.linear import is_linear
from edgeslim.lowrank.layers import Factorization, Shape, check_all_ran, weight_matrix
from edgeslim.lowrank.ranks import RankTarget


class ConvDecompose(RankTarget):
    """Factor Conv2d layers (Zhang et al. 2015): k x k to ``rank`` channels, then 1 x 1.

    Give one of ``rank``, ``energy`` or ``macs``. ``solver: response`` (default) reconstructs
    each layer's responses on ``calib`` inputs; ``solver: svd`` truncates the weights (no
    data). ``separable: true`` splits k x k convs into k x 1 then 1 x k instead (weights
    only, so with ``solver: svd``). ``linear: true`` factorises Linear layers too, under the
    same rank rule or MAC budget. Depthwise and grouped convs are left alone.
    """

    solver: Literal["response", "svd"] = Field("response", description="responses or weights")
    separable: bool = Field(False, description="k x 1 then 1 x k instead of k x k then 1 x 1")
    linear: bool = Field(False, description="also factorise Linear layers")

    @model_validator(mode="after")
    def _separable_from_weights(self) -> ConvDecompose:
        if self.separable and self.solver != "svd":
            raise ValueError(
                "separable: true is solved from the weights (Jaderberg et al. 2014): set "
                "solver: svd"
            )
        return self


def response_statistics(
    model: nn.Module, layers: dict[str, nn.Module], calib: Any
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``(mean (d,), covariance (d, d))`` of each layer's responses, in float64."""
    sums: dict[str, torch.Tensor] = {}
    outer: dict[str, torch.Tensor] = {}
    count: dict[str, int] = {}

    def see(name: str, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        y = output.detach().double()
        if isinstance(module, nn.Conv2d):
            y = y.movedim(1, -1)  # (B, H, W, d)
        y = y.reshape(-1, y.shape[-1])  # (positions, d)
        if name not in sums:
            sums[name], outer[name], count[name] = y.sum(0), y.T @ y, len(y)
        else:
            sums[name] += y.sum(0)
            outer[name] += y.T @ y
            count[name] += len(y)

    run_calibration(model, calib, layers, see)
    check_all_ran(layers, sums, model)
    stats = {}
    for name in layers:
        mean = sums[name] / count[name]
        stats[name] = (mean, outer[name] / count[name] - torch.outer(mean, mean))
    return stats


def response_factors(
    model: nn.Module, layers: dict[str, nn.Module], calib: Any
) -> dict[str, Factorization]:
    """Zhang et al.'s factorisation of each layer from its responses on ``calib``."""
    if calib is None:
        raise ConfigError(
            "the response solver reconstructs layer outputs: pass calib=INPUTS (e.g. "
            "data.calib(256)), or use solver='svd'"
        )
    factors = {}
    for name, (mean, cov) in response_statistics(model, layers, calib).items():
        layer = layers[name]
        eigvals, vectors = torch.linalg.eigh(cov)  # ascending
        p = vectors.flip(1)  # (d, d), principal directions first
        first = p.T @ weight_matrix(layer)  # (d, fan_in)
        shape: Shape = "linear" if is_linear(layer) else "conv"
        w = layer.weight
        factors[name] = Factorization(
            layer, shape, first.to(w), p.to(w), eigvals.flip(0).clamp(min=0), mean=mean.to(w)
        )
    return factors
