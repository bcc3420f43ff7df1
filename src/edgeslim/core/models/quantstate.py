"""Quantization state kept in a model's buffers, and how to restore it after loading.

**Weight-only codes** (integer codes, scales and zero points per group):

A quantized linear layer (GPTQ, RTN, SmoothQuant's weights) keeps its dequantized weights, so
it runs as an ordinary float model, plus the buffers that describe its integers:
``weight_qscale`` (out, groups) float16, ``weight_qzero`` (out, groups) uint8,
``weight_qgidx`` (in,) int32 (the group of each input) and ``weight_qbits`` (a scalar), with
``W = scale[:, g_idx] * (code - zero[:, g_idx])`` exactly. :mod:`edgeslim.core.models.hf` writes
the codes packed ``bits`` to the byte from these buffers.

**Static input rounding** (SmoothQuant W8A8): ``input_qscale`` and ``input_qbits`` buffers plus
a forward pre-hook that rounds the layer's input to that grid; :func:`restore_act_quant_`
re-attaches the hook to a freshly loaded model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from edgeslim.core.linear import set_weight_matrix_, weight_matrix

QUANT_BUFFERS = ("weight_qscale", "weight_qzero", "weight_qgidx", "weight_qbits")


@dataclass
class QuantizedWeight:
    """A quantized weight: ``weight == scale[:, g_idx] * (codes - zero[:, g_idx])`` exactly."""

    weight: torch.Tensor  # (out, in) dequantized, float32
    codes: torch.Tensor  # (out, in) uint8
    scale: torch.Tensor  # (out, groups) float16
    zero: torch.Tensor  # (out, groups) uint8
    g_idx: torch.Tensor  # (in,) int32: the group of each input
    bits: int


def _set_buffer(module: nn.Module, name: str, value: torch.Tensor) -> None:
    if name in module._buffers:
        module._buffers[name] = value
    else:
        module.register_buffer(name, value)


def attach_quantized_(module: nn.Module, qw: QuantizedWeight) -> None:
    """Give ``module`` the dequantized weight and the buffers that describe its integers."""
    set_weight_matrix_(module, qw.weight)
    _set_buffer(module, "weight_qscale", qw.scale)
    _set_buffer(module, "weight_qzero", qw.zero)
    _set_buffer(module, "weight_qgidx", qw.g_idx)
    device = module.weight.device
    _set_buffer(module, "weight_qbits", torch.tensor(qw.bits, dtype=torch.uint8, device=device))


def quantized_codes(module: nn.Module) -> torch.Tensor:
    """The integer codes (out, in) uint8 of a quantized layer, recovered from its weight."""
    w = weight_matrix(module)
    g_idx = module.weight_qgidx.long()
    s = module.weight_qscale.float()[:, g_idx]
    z = module.weight_qzero.float()[:, g_idx]
    return (torch.round(w / s) + z).clamp(0, 2 ** int(module.weight_qbits) - 1).to(torch.uint8)


# ----------------------------------------------------------------- static input rounding


def fake_quant_symmetric(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """``scale * clamp(round(x / scale), -(2^(b-1) - 1), 2^(b-1) - 1)``."""
    qmax = 2 ** (bits - 1) - 1
    return scale * torch.clamp(torch.round(x / scale), -qmax, qmax)


def _act_quant_hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    x = args[0]
    q = fake_quant_symmetric(x, module.input_qscale.to(x.dtype), int(module.input_qbits))
    return (q, *args[1:])


def attach_act_quant_(module: nn.Module, scale: float, bits: int) -> None:
    """Make ``module`` round its input to a static symmetric ``bits``-bit grid of ``scale``."""
    device = module.weight.device
    for name, value in (
        ("input_qscale", torch.tensor(float(scale), device=device)),
        ("input_qbits", torch.tensor(bits, dtype=torch.uint8, device=device)),
    ):
        if name in module._buffers:
            module._buffers[name] = value
        else:
            module.register_buffer(name, value)
    restore_act_quant_(module)


def restore_act_quant_(module: nn.Module) -> None:
    """(Re)attach the input-rounding hook of a module that has ``input_qscale`` (idempotent)."""
    if getattr(module, "input_qscale", None) is None or getattr(module, "_es_act_hook", None):
        return
    module._es_act_hook = module.register_forward_pre_hook(_act_quant_hook)
