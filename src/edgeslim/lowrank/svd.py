"""Truncated SVD of weights: a Linear layer W (out x in) becomes two thin layers U_r . V_r.

Emily Denton, Wojciech Zaremba, Joan Bruna, Yann LeCun, Rob Fergus. "Exploiting Linear
Structure Within Convolutional Networks for Efficient Evaluation", NIPS 2014.
https://arxiv.org/abs/1404.0736 (low-rank approximation of weights by SVD)

Max Jaderberg, Andrea Vedaldi, Andrew Zisserman. "Speeding up Convolutional Neural Networks
with Low Rank Expansions", BMVC 2014. https://arxiv.org/abs/1405.3866 (the k x 1 then 1 x k
"scheme 2" structure; :func:`weight_factors` with ``separable=True``)

With W = U S V^T, the rank-r layers are ``first = sqrt(S_r) V_r^T`` (in -> r, no bias) and
``second = U_r sqrt(S_r)`` (r -> out, with W's bias). By Eckart-Young this is the closest
rank-r matrix to W in Frobenius norm -- closest in *weights*, blind to which input
directions the data actually uses (response reconstruction, :mod:`.conv`, accounts for
that). The same SVD of a conv's weight reshaped to (d, c*kh*kw) gives the data-free baseline
for Zhang et al.'s k x k -> 1 x 1 structure.

The energy of component i is S_i^2; a rank ``r`` Linear pair costs r * (in + out) MACs per
token against in * out, so it pays below r = in * out / (in + out).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from edgeslim.core.linear import is_linear
from edgeslim.lowrank.layers import Factorization, Shape, weight_matrix
from edgeslim.lowrank.ranks import RankTarget


class SVD(RankTarget):
    """Factor Linear layers in two (give one of ``rank``, ``energy``, ``macs``).

    ``solver: svd`` (default) truncates the weight SVD and needs no data; ``solver:
    response`` keeps the principal directions of each layer's outputs on calibration inputs
    (Zhang et al. 2015, as for convs in :class:`ConvDecompose`). A ``macs`` budget and the
    response solver need ``calib`` inputs.
    """

    solver: Literal["svd", "response"] = Field("svd", description="weights or responses")


def svd_components(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(left (m, R), right (R, n), S^2 (R,))`` with ``left @ right == matrix`` at full rank."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)  # (m, R), (R,), (R, n)
    root = s.sqrt()
    return u * root, root[:, None] * vh, s * s


def weight_factors(layer: nn.Module, separable: bool = False) -> Factorization:
    """The weight-SVD factorisation of a Linear (or transformers Conv1D) or Conv2d layer
    (components best first)."""
    if is_linear(layer):
        shape: Shape = "linear"
    else:
        shape = "separable" if separable else "conv"
    w = weight_matrix(layer)  # (out, fan_in)
    if shape != "separable":
        left, right, energy = svd_components(w)  # (out, R), (R, fan_in)
        return Factorization(layer, shape, right.to(layer.weight), left.to(layer.weight), energy)
    d, c = layer.out_channels, layer.in_channels
    kh, kw = layer.kernel_size
    # W[d, c, i, j] -> M[(c, i), (d, j)]: a rank-1 term of M is a k x 1 filter times a 1 x k one
    m = w.reshape(d, c, kh, kw).permute(1, 2, 0, 3).reshape(c * kh, d * kw)
    left, right, energy = svd_components(m)  # (c*kh, R), (R, d*kw)
    rank = left.shape[1]
    vertical = left.T  # (R, c*kh)
    horizontal = right.reshape(rank, d, kw).permute(1, 0, 2)  # (d, R, kw)
    return Factorization(
        layer, shape, vertical.to(layer.weight), horizontal.to(layer.weight), energy
    )
