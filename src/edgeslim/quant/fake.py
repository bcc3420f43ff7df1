"""Fake quantization in PyTorch, with the rounding and requantization of :mod:`.spec`.

Two ways to simulate a quantized tensor or layer:

- **fake** (``x -> dequantize(quantize(x))`` in float32, gradients by the straight-through
  estimator): what QAT trains through. Rounding is half away from zero, as in ``spec``.
- **exact** (integer arithmetic carried in int64 / float64 tensors): a quantized layer
  computes its int32 accumulator exactly and requantizes it with the fixed-point multiplier
  and double rounding of :func:`edgeslim.quant.spec.multiply_by_quantized_multiplier`, so its
  output equals the integer reference (TFLite / the C backend) bit for bit.

The torch versions of ``srdhm`` / ``rounding_divide_by_pot`` / ``multiply_by_quantized_multiplier``
here are tested for equality against the numpy ones in ``spec`` (tests/test_quant_fake.py).

LSQ: Esser et al. 2019, "Learned Step Size Quantization", https://arxiv.org/abs/1902.08153
(:func:`lsq_quant`: the step size gets the LSQ gradient, scaled by ``1/sqrt(numel * qmax)``).
"""

from __future__ import annotations

import math

import torch

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


# ---------------------------------------------------------------------------- rounding


def round_half_away(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest, ties away from zero (C ``round``), same dtype as ``x``."""
    return torch.sign(x) * torch.floor(torch.abs(x) + 0.5)


class _RoundSTE(torch.autograd.Function):
    """Half-away rounding whose gradient is the identity (straight-through estimator)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return round_half_away(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """:func:`round_half_away` forward, identity backward."""
    return _RoundSTE.apply(x)


def _shape_for(values: torch.Tensor, ndim: int, axis: int | None) -> torch.Tensor:
    """Reshape per-channel ``values`` (C,) to broadcast along ``axis`` of an ``ndim`` tensor."""
    if axis is None or values.numel() == 1:
        return values.reshape(())
    shape = [1] * ndim
    shape[axis] = -1
    return values.reshape(shape)


# ---------------------------------------------------------------------------- quantize


def quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: int,
    qmax: int,
    axis: int | None = None,
) -> torch.Tensor:
    """``clamp(round_half_away(x / scale) + zero_point, qmin, qmax)`` as int64."""
    s = _shape_for(scale.to(torch.float64), x.dim(), axis)
    zp = _shape_for(zero_point.to(torch.int64), x.dim(), axis)
    q = round_half_away(x.to(torch.float64) / s).to(torch.int64) + zp
    return q.clamp(qmin, qmax)


def dequantize(
    q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int | None = None
) -> torch.Tensor:
    """``(q - zero_point) * scale`` as float32."""
    s = _shape_for(scale.to(torch.float64), q.dim(), axis)
    zp = _shape_for(zero_point.to(torch.int64), q.dim(), axis)
    return ((q.to(torch.int64) - zp).to(torch.float64) * s).to(torch.float32)


def fake_quant(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: int,
    qmax: int,
    axis: int | None = None,
) -> torch.Tensor:
    """``dequantize(quantize(x))`` in float32 with a straight-through gradient.

    Values inside the range pass the gradient unchanged; clamped values get zero gradient
    (the usual "clipped STE"). ``scale`` and ``zero_point`` are not trained here.
    """
    s = _shape_for(scale.to(x.dtype), x.dim(), axis).detach()
    zp = _shape_for(zero_point.to(x.dtype), x.dim(), axis).detach()
    q = torch.clamp(round_ste(x / s) + zp, qmin, qmax)
    return (q - zp) * s


class _GradScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.factor, None


def lsq_quant(
    x: torch.Tensor,
    step: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: int,
    qmax: int,
    axis: int | None = None,
) -> torch.Tensor:
    """LSQ fake quantization: like :func:`fake_quant`, but ``step`` (the scale) learns.

    Forward: ``(clamp(round(x / s) + zp) - zp) * s``. Backward w.r.t. ``s`` is LSQ's
    ``-x/s + round(x/s)`` inside the range and ``qmin - zp`` / ``qmax - zp`` outside, times
    ``g = 1 / sqrt(numel_per_step * qmax)`` (Esser et al. 2019, eq. 3-5).
    """
    per = x.numel() / max(1, step.numel())
    g = 1.0 / math.sqrt(per * max(qmax, 1))
    step = torch.clamp(step, min=1e-8)  # a step size must stay positive
    s = _shape_for(_GradScale.apply(step, g), x.dim(), axis)
    zp = _shape_for(zero_point.to(x.dtype), x.dim(), axis).detach()
    q = torch.clamp(round_ste(x / s) + zp, qmin, qmax)
    return (q - zp) * s


# ---------------------------------------------------------------------------- integer ops


def srdhm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """SaturatingRoundingDoublingHighMul on int64 tensors (see ``spec.srdhm``)."""
    a = a.to(torch.int64)
    b = torch.as_tensor(b, dtype=torch.int64)
    overflow = (a == INT32_MIN) & (b == INT32_MIN)
    ab = a * b
    nudge = torch.where(ab >= 0, 1 << 30, 1 - (1 << 30))
    nudged = ab + nudge
    mag = torch.abs(nudged) >> 31
    result = torch.where(nudged < 0, -mag, mag)
    return torch.where(overflow, torch.full_like(result, INT32_MAX), result)


def rounding_divide_by_pot(x: torch.Tensor, exponent: torch.Tensor) -> torch.Tensor:
    """RoundingDivideByPOT on int64 tensors (see ``spec.rounding_divide_by_pot``)."""
    x = x.to(torch.int64)
    e = torch.as_tensor(exponent, dtype=torch.int64)
    mask = (torch.ones_like(e) << e) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (x < 0).to(torch.int64)
    return (x >> e) + (remainder > threshold).to(torch.int64)


def multiply_by_quantized_multiplier(
    x: torch.Tensor, m: torch.Tensor, shift: torch.Tensor
) -> torch.Tensor:
    """``x * m * 2^(shift - 31)`` with TFLite's double rounding, on int64 tensors."""
    shift = torch.as_tensor(shift, dtype=torch.int64)
    left = torch.clamp(shift, min=0)
    right = torch.clamp(-shift, min=0)
    return rounding_divide_by_pot(srdhm(x.to(torch.int64) << left, m), right)
