"""Statistics of a linear layer's inputs, accumulated over the calibration tokens.

One accumulator per layer and algorithm: :class:`InputNorms` (||X_j||^2, Wanda),
:class:`Hessian` (H = 2/n X^T X, SparseGPT and GPTQ, with :func:`damped_inverse_cholesky`
derived from it) and :class:`InputAbsMax` (max|X_j|, SmoothQuant). Each has ``add(x)`` for a
batch of inputs ``(..., in)`` and ``nbytes(in)`` for the memory estimate.

Note: the accumulators are allocated on the CPU (float64 sums for InputNorms and Hessian)
whatever device the model runs on; making them device-agnostic is left for later, since it
must not change a single number.
"""

from __future__ import annotations

from typing import Protocol

import torch

from edgeslim.core.errors import ConfigError


class Stats(Protocol):
    """What the engine feeds: each batch of a layer's inputs."""

    def add(self, x: torch.Tensor) -> None: ...


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.detach().reshape(-1, x.shape[-1]).float()  # (tokens, in)


class InputNorms:
    """Sum of squares of each input feature over all tokens: ||X_j||^2 (Wanda)."""

    def __init__(self, in_features: int):
        self.sq = torch.zeros(in_features, dtype=torch.float64)  # (in,) on the CPU
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        rows = _rows(x)  # (tokens, in)
        self.sq += rows.pow(2).sum(0).double()
        self.tokens += rows.shape[0]

    @staticmethod
    def nbytes(in_features: int) -> int:
        return 8 * in_features


class Hessian:
    """H = 2/n X^T X over all n calibration tokens (SparseGPT, GPTQ), summed in float64."""

    def __init__(self, in_features: int):
        self.xtx = torch.zeros(in_features, in_features, dtype=torch.float64)  # (in, in) CPU
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        rows = _rows(x)  # (tokens, in)
        self.xtx += (rows.t() @ rows).double()  # float32 product, float64 running sum
        self.tokens += rows.shape[0]

    @property
    def h(self) -> torch.Tensor:
        return (2.0 / max(1, self.tokens)) * self.xtx  # (in, in)

    @staticmethod
    def nbytes(in_features: int) -> int:
        return 8 * in_features * in_features


class InputAbsMax:
    """Largest |x_j| of each input feature over all tokens (SmoothQuant, static act scales)."""

    def __init__(self, in_features: int):
        self.absmax = torch.zeros(in_features)  # (in,) on the CPU

    def add(self, x: torch.Tensor) -> None:
        self.absmax = torch.maximum(self.absmax, _rows(x).abs().amax(0))

    @staticmethod
    def nbytes(in_features: int) -> int:
        return 4 * in_features


def damped_inverse_cholesky(h: torch.Tensor, w: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp I)^-1, as in the SparseGPT/GPTQ reference code.

    ``h`` (in, in) float64; ``w`` (out, in) is changed in place: inputs that were always zero
    ("dead", H_jj = 0) get H_jj = 1 and their weights 0. ``damp = percdamp * mean(diag H)``.
    """
    h = h.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    damp = percdamp * torch.mean(torch.diag(h))
    h += damp * torch.eye(h.shape[0], dtype=h.dtype)
    try:
        lower = torch.linalg.cholesky(h)
    except RuntimeError as exc:
        raise ConfigError(
            f"the calibration Hessian is not positive definite even with percdamp={percdamp}: "
            "use more calibration data or a larger percdamp"
        ) from exc
    hinv = torch.cholesky_inverse(lower)
    return torch.linalg.cholesky(hinv, upper=True)
