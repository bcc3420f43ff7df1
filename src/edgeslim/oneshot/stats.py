"""Statistics of a linear layer's inputs, accumulated over the calibration tokens.

One accumulator per layer and algorithm: :class:`InputNorms` (||X_j||^2, Wanda),
:class:`Hessian` (H = 2/n X^T X, SparseGPT and GPTQ, with :func:`damped_inverse_cholesky`
derived from it) and :class:`InputAbsMax` (max|X_j|, SmoothQuant). Each has ``add(x)`` for a
batch of inputs ``(..., in)`` and ``nbytes(in)`` for the memory estimate.

The accumulators live on the device of the layer they watch (``device=``, the engine passes
the layer weight's): a model on a GPU is calibrated on the GPU. Dtypes: the (in, in) Hessian
sums in float32 (as the SparseGPT/GPTQ reference code does; float64 there would double the
largest buffer of the engine); the (in,) sums of squares in float64, which costs nothing on a
vector; the Cholesky factorisation of :func:`damped_inverse_cholesky` in float64, one layer
at a time, where the algorithm needs it. Devices without float64 (Apple's MPS) use float32
throughout (:func:`wide_dtype`).
"""

from __future__ import annotations

from typing import Protocol

import torch

from edgeslim.core.errors import ConfigError

Device = torch.device | str | None


def wide_dtype(device: Device) -> torch.dtype:
    """float64, or float32 on a device that has no float64 (Apple's MPS)."""
    return torch.float32 if torch.device(device or "cpu").type == "mps" else torch.float64


class Stats(Protocol):
    """What the engine feeds: each batch of a layer's inputs."""

    def add(self, x: torch.Tensor) -> None: ...


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.detach().reshape(-1, x.shape[-1]).float()  # (tokens, in)


class InputNorms:
    """Sum of squares of each input feature over all tokens: ||X_j||^2 (Wanda)."""

    def __init__(self, in_features: int, device: Device = None):
        self.sq = torch.zeros(in_features, dtype=wide_dtype(device), device=device)  # (in,)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        rows = _rows(x)  # (tokens, in)
        self.sq += rows.pow(2).sum(0).to(self.sq.dtype)
        self.tokens += rows.shape[0]

    @staticmethod
    def nbytes(in_features: int) -> int:
        return 8 * in_features


class Hessian:
    """H = 2/n X^T X over all n calibration tokens (SparseGPT, GPTQ), summed in ``dtype``
    (float32 by default; layer-wise OBD/OBS on small layers ask for float64)."""

    def __init__(self, in_features: int, device: Device = None, dtype: torch.dtype = torch.float32):
        self.xtx = torch.zeros(in_features, in_features, dtype=dtype, device=device)  # (in, in)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        rows = _rows(x)  # (tokens, in)
        self.xtx += (rows.t() @ rows).to(self.xtx.dtype)  # float32 product
        self.tokens += rows.shape[0]

    @property
    def h(self) -> torch.Tensor:
        return (2.0 / max(1, self.tokens)) * self.xtx  # (in, in)

    @staticmethod
    def nbytes(in_features: int) -> int:
        return 4 * in_features * in_features


class InputAbsMax:
    """Largest |x_j| of each input feature over all tokens (SmoothQuant, static act scales)."""

    def __init__(self, in_features: int, device: Device = None):
        self.absmax = torch.zeros(in_features, device=device)  # (in,) float32

    def add(self, x: torch.Tensor) -> None:
        self.absmax = torch.maximum(self.absmax, _rows(x).abs().amax(0))

    @staticmethod
    def nbytes(in_features: int) -> int:
        return 4 * in_features


def damped_inverse_cholesky(h: torch.Tensor, w: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp I)^-1, as in the SparseGPT/GPTQ reference code.

    ``h`` (in, in) is factorised in float64 (:func:`wide_dtype`) on its own device; ``w``
    (out, in) is changed in place: inputs that were always zero ("dead", H_jj = 0) get
    H_jj = 1 and their weights 0. ``damp = percdamp * mean(diag H)``. No step reads a value
    back to the host, so on a GPU nothing waits until the factorisation itself.
    """
    h = h.to(wide_dtype(h.device), copy=True)
    dead = torch.diag(h) == 0
    h.diagonal().masked_fill_(dead, 1)
    w.masked_fill_(dead.unsqueeze(0), 0)
    damp = percdamp * torch.mean(torch.diag(h))
    h.diagonal().add_(damp)
    try:
        lower = torch.linalg.cholesky(h)
    except RuntimeError as exc:
        raise ConfigError(
            f"the calibration Hessian is not positive definite even with percdamp={percdamp}: "
            "use more calibration data or a larger percdamp"
        ) from exc
    hinv = torch.cholesky_inverse(lower)
    return torch.linalg.cholesky(hinv, upper=True)
