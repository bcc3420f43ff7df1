"""Observers: choose an activation tensor's quantization range from calibration data.

Four calibration methods, all ending in :func:`edgeslim.quant.spec.activation_qparams`
(asymmetric, per tensor, zero exactly representable):

- ``minmax``: the smallest and largest value seen (Jacob et al. 2018).
- ``percentile``: the ``percentile``-th and ``(100 - percentile)``-th percentiles, which
  ignore rare outliers (as NVIDIA's pytorch-quantization and TensorRT offer).
- ``mse``: the range ``[a * min, a * max]`` whose quantization error (mean squared, over the
  recorded values) is smallest, ``a`` searched on a grid in (0, 1].
- ``kl``: TensorRT's entropy calibration (Migacz 2017, "8-bit Inference with TensorRT"):
  the clipping threshold whose quantized histogram is closest to the float one in KL
  divergence; on |x| (symmetric) for signed tensors, on x for non-negative ones; values
  that occur exactly and often (ReLU's zeros, a constant background) are left out of the
  histogram and never clipped (see :func:`kl_threshold`).

An observer keeps the exact min and max plus a bounded, seeded reservoir of the values it
saw (``max_samples``), so memory stays fixed however much calibration data runs through
it; percentile, MSE and KL are computed on that sample. Weights are not observed here:
their qparams come straight from the tensor (``spec.weight_qparams``, symmetric per channel)
or from :func:`weight_mse_scale` (MSE-optimal clipping per channel, for low bit widths).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from edgeslim.quant import spec

Method = Literal["minmax", "percentile", "mse", "kl"]
METHODS: tuple[str, ...] = ("minmax", "percentile", "mse", "kl")


class Observer:
    """Records what a tensor holds during calibration; :meth:`qparams` turns it into a range.

    ``method`` is one of :data:`METHODS`; ``percentile`` applies to ``"percentile"``.
    """

    def __init__(
        self,
        method: Method = "minmax",
        *,
        percentile: float = 99.99,
        max_samples: int = 1 << 18,
        seed: int = 0,
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"unknown calibration method {method!r}; expected one of {METHODS}")
        self.method = method
        self.percentile = percentile
        self.max_samples = max_samples
        self.min = float("inf")
        self.max = float("-inf")
        self.count = 0
        self._sample: list[torch.Tensor] = []
        self._kept = 0
        self._gen = torch.Generator().manual_seed(seed)

    def update(self, x: torch.Tensor) -> None:
        """Record the values of ``x`` (any shape)."""
        flat = x.detach().reshape(-1).to(torch.float32)
        if flat.numel() == 0:
            return
        self.min = min(self.min, float(flat.min()))
        self.max = max(self.max, float(flat.max()))
        self.count += flat.numel()
        if self.method == "minmax":
            return
        # keep at most max_samples values: a uniform random subset of each batch, sized so
        # that every batch contributes in proportion to its size
        budget = self.max_samples // 4
        if flat.numel() > budget:  # indices from the CPU generator (the same on every device)
            idx = torch.randint(0, flat.numel(), (budget,), generator=self._gen)
            flat = flat[idx.to(flat.device)]
        self._sample.append(flat.to("cpu", copy=True))  # the sample is kept on the CPU
        self._kept += flat.numel()
        if self._kept > self.max_samples:
            merged = torch.cat(self._sample)
            idx = torch.randperm(merged.numel(), generator=self._gen)[: self.max_samples // 2]
            self._sample, self._kept = [merged[idx]], self.max_samples // 2

    @property
    def seen(self) -> bool:
        return self.count > 0

    def range(self, bits: int = 8) -> tuple[float, float]:
        """The ``(rmin, rmax)`` the method chooses (before widening to contain 0)."""
        if not self.seen:
            raise ValueError("observer saw no data: run calibration batches first")
        if self.method == "minmax" or self.min == self.max:
            return self.min, self.max
        values = torch.cat(self._sample).numpy().astype(np.float64)
        if self.method == "percentile":
            lo = float(np.percentile(values, 100.0 - self.percentile))
            hi = float(np.percentile(values, self.percentile))
            return lo, hi
        if self.method == "mse":
            return mse_range(values, self.min, self.max, bits)
        return kl_range(values, self.min, self.max, bits)

    def qparams(self, bits: int = 8) -> spec.QParams:
        """Asymmetric per-tensor qparams of the chosen range."""
        rmin, rmax = self.range(bits)
        return spec.activation_qparams(rmin, rmax, bits)


# ---------------------------------------------------------------------------- range search


def quant_error(values: np.ndarray | torch.Tensor, qp: spec.QParams) -> float:
    """Mean squared error of quantizing ``values`` with ``qp`` and back (float64)."""
    v = torch.as_tensor(values, dtype=torch.float64)
    scale, zp = float(qp.scale[0]), float(qp.zero_point[0])
    q = torch.clamp(
        torch.sign(v / scale) * torch.floor(torch.abs(v / scale) + 0.5) + zp, qp.qmin, qp.qmax
    )
    return float(torch.mean(((q - zp) * scale - v) ** 2))


def mse_range(
    values: np.ndarray, vmin: float, vmax: float, bits: int = 8, steps: int = 100
) -> tuple[float, float]:
    """``(a * vmin, a * vmax)`` with ``a`` in ``{1/steps, ..., 1}`` minimising the MSE."""
    v = torch.as_tensor(values, dtype=torch.float64)
    best, best_err = (vmin, vmax), float("inf")
    for i in range(steps, 0, -1):
        a = i / steps
        qp = spec.activation_qparams(a * vmin, a * vmax, bits)
        err = quant_error(v, qp)
        if err < best_err:
            best, best_err = (a * vmin, a * vmax), err
    return best


def _smooth(counts: np.ndarray, eps: float = 1e-4) -> np.ndarray:
    """MXNet / TVM's ``_smooth_distribution`` of a histogram, returned normalised.

    Empty bins get ``eps`` (in counts), taken evenly from the nonempty ones, so KL(P || Q)
    stays finite where Q is empty and P is not (the clipped mass in P's last bin).
    """
    zeros = counts == 0
    nonzero = counts[~zeros]
    eps1 = eps * zeros.sum() / nonzero.size
    if eps1 >= nonzero.min():  # only when a few tiny bins hold everything: lend less
        eps, eps1 = eps * nonzero.min() / (2 * eps1), nonzero.min() / 2
    p = np.where(zeros, eps, counts - eps1)
    return p / p.sum()


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    mask = p > 0
    return float(np.sum(p[mask] * np.log(p[mask] / q[mask])))


def atoms(values: np.ndarray, min_mass: float = 1e-3) -> np.ndarray:
    """Values that occur *exactly*, each as at least ``min_mass`` of ``values``.

    After a ReLU half of a tensor is often exactly 0; a constant image background through a
    1-channel stem gives one repeated value per channel; a ReLU6 saturates at exactly 6.
    """
    uniq, counts = np.unique(values, return_counts=True)
    return uniq[counts >= max(2, min_mass * values.size)]


def kl_threshold(
    magnitudes: np.ndarray, levels: int, bins: int = 2048, atom_mass: float = 1e-3
) -> float:
    """TensorRT's entropy calibration threshold for non-negative ``magnitudes``.

    Migacz 2017 (as MXNet / TVM ``_get_optimal_threshold`` and NVIDIA's
    pytorch-quantization implement it): histogram ``magnitudes`` in ``bins`` bins over
    [0, max]; for each candidate threshold ``i`` bins (``levels`` up to ``bins``), ``P`` =
    the first ``i`` bins with the mass beyond added to the last; ``Q`` = those bins merged
    into ``levels`` groups and spread back uniformly over each group's nonzero bins; both
    smoothed (:func:`_smooth`); the threshold is the largest ``i`` with the smallest
    KL(P || Q).

    *Atoms* (:func:`atoms`: exact values carrying >= ``atom_mass`` of the data) are left out
    of the histogram and the threshold never falls below the largest one. This generalises
    TensorRT / pytorch-quantization's ``hist[0] = hist[1]`` for ReLU's zeros: an atom loses
    at most half a step at any threshold that covers it, but KL's "spread the group's mass
    over its bins" model prices it as if it were smeared, so with atoms in the histogram
    the smallest candidate (no merging) always wins. Measured on the MobileNetV2-style net:
    post-ReLU6 tensors are ~50% exact zeros (threshold 0.75 of 6 without the rule, 5.2..6
    with it) and the stem's output is 84% atoms (8 background values).
    """
    top = float(magnitudes.max()) if magnitudes.size else 0.0
    if top <= 0:
        return 0.0
    spikes = atoms(magnitudes, atom_mass)
    floor = float(spikes.max()) if spikes.size else 0.0
    rest = magnitudes[~np.isin(magnitudes, spikes)] if spikes.size else magnitudes
    if rest.size < levels or float(rest.max()) <= floor:
        return max(floor, float(rest.max()) if rest.size else 0.0)
    hist, edges = np.histogram(rest, bins=bins, range=(0.0, top))
    hist = hist.astype(np.float64)
    best_i, best_kl = bins, float("inf")
    for i in range(levels, bins + 1, max(1, (bins - levels) // 256)):
        p = hist[:i].copy()
        p[-1] += hist[i:].sum()
        q = np.zeros(i)
        for chunk in np.array_split(np.arange(i), levels):
            nonzero = hist[chunk] > 0
            if nonzero.any():
                q[chunk[nonzero]] = hist[chunk].sum() / nonzero.sum()
        if p.sum() == 0 or q.sum() == 0:
            continue
        kl = _kl(_smooth(p), _smooth(q))
        if kl <= best_kl:  # ties go to the larger threshold
            best_i, best_kl = i, kl
    return max(floor, float(edges[best_i]))


def kl_range(values: np.ndarray, vmin: float, vmax: float, bits: int = 8) -> tuple[float, float]:
    """Range from :func:`kl_threshold`: one-sided for non-negative tensors (all ``2^bits``
    levels), symmetric on ``|x|`` else (``2^(bits-1)`` levels per side)."""
    if vmin >= 0:
        t = kl_threshold(values, levels=1 << bits)
        return vmin, t
    t = kl_threshold(np.abs(values), levels=1 << (bits - 1))
    return max(vmin, -t), min(vmax, t)


def weight_mse_scale(w: torch.Tensor, bits: int, axis: int = 0, steps: int = 50) -> np.ndarray:
    """Per-channel symmetric scales minimising each channel's squared quantization error.

    Searches ``scale = a * max|w_c| / qmax`` for ``a`` in ``{0.2, ..., 1}`` per channel.
    At 8 bits this barely differs from max scaling; at 4 and 2 bits clipping pays.
    """
    wn = np.moveaxis(w.detach().cpu().double().numpy(), axis, 0).reshape(w.shape[axis], -1)
    _, qmax = spec.int_range(bits, symmetric=True)
    amax = np.abs(wn).max(axis=1)
    amax = np.where(amax > 0, amax, 1.0)
    best_scale = amax / qmax
    best_err = np.full(len(amax), np.inf)
    for i in range(steps, int(0.2 * steps) - 1, -1):
        scale = (i / steps) * amax / qmax  # (C,)
        q = np.clip(spec.round_half_away(wn / scale[:, None]), -qmax, qmax)
        err = ((q * scale[:, None] - wn) ** 2).sum(axis=1)
        better = err < best_err
        best_scale = np.where(better, scale, best_scale)
        best_err = np.where(better, err, best_err)
    return best_scale
