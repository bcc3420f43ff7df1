"""The weight-only quantized layer format: integer codes, scales and zero points per group.

A quantized linear layer (GPTQ, RTN, SmoothQuant's weights) keeps its dequantized weights, so
it runs as an ordinary float model, plus the buffers that describe its integers:
``weight_qscale`` (out, groups) float16, ``weight_qzero`` (out, groups) uint8,
``weight_qgidx`` (in,) int32 (the group of each input) and ``weight_qbits`` (a scalar), with
``W = scale[:, g_idx] * (code - zero[:, g_idx])`` exactly. :mod:`edgeslim.models.hf` writes
the codes packed ``bits`` to the byte from these buffers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..oneshot.linear import set_weight_matrix_, weight_matrix

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
    _set_buffer(module, "weight_qbits", torch.tensor(qw.bits, dtype=torch.uint8))


def quantized_codes(module: nn.Module) -> torch.Tensor:
    """The integer codes (out, in) uint8 of a quantized layer, recovered from its weight."""
    w = weight_matrix(module)
    g_idx = module.weight_qgidx.long()
    s = module.weight_qscale.float()[:, g_idx]
    z = module.weight_qzero.float()[:, g_idx]
    return (torch.round(w / s) + z).clamp(0, 2 ** int(module.weight_qbits) - 1).to(torch.uint8)
