"""Factorised layers: the thin pair that replaces a Linear or Conv2d, and the surgery.

A rank-``r`` factorisation replaces one layer by two (a :class:`Factored`):

- ``linear``    Linear(in, out)        -> Linear(in, r, no bias), Linear(r, out)
                (transformers' Conv1D, GPT-2's linear layer, too: it computes the same)
- ``conv``      Conv2d(c, d, kh x kw)  -> Conv2d(c, r, kh x kw, same stride/padding, no bias),
                                          Conv2d(r, d, 1x1)          (Zhang et al. 2015)
- ``separable`` Conv2d(c, d, kh x kw)  -> Conv2d(c, r, kh x 1), Conv2d(r, d, 1 x kw)
                                          (Jaderberg et al. 2014, scheme 2)

A :class:`Factorization` holds a layer's weight as components ordered best first (from a
weight SVD, :mod:`.svd`, or from the layer's responses, :mod:`.conv`); ``build(r)`` keeps
the first ``r`` and returns the thin pair, ``macs(r)`` what it costs. A factorisation at
full rank reproduces the layer exactly (up to float rounding).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from edgeslim.core.errors import ConfigError
from edgeslim.core.hooks import run_calibration
from edgeslim.core.linear import is_linear, weight_in
from edgeslim.core.linear import weight_matrix as linear_matrix

Shape = Literal["linear", "conv", "separable"]


class Factored(nn.Sequential):
    """A layer replaced by two thinner ones: ``[0]`` maps to ``rank`` channels, ``[1]`` back."""

    @property
    def rank(self) -> int:
        first = self[0]
        return first.out_features if isinstance(first, nn.Linear) else first.out_channels


@dataclass
class Geometry:
    """Where a layer runs, per sample: output positions, and the separable middle's positions.

    ``out_positions`` is H_out x W_out for a conv (tokens for a Linear; 1 for (B, F) inputs);
    ``mid_positions`` is H_out x W_in (the k x 1 conv keeps the width).
    """

    out_positions: int
    mid_positions: int


def thin_pair(layer: nn.Module, rank: int, shape: Shape, bias: bool) -> Factored:
    """An uninitialised rank-``rank`` pair with ``layer``'s geometry (see the module docstring)."""
    kw = {"device": layer.weight.device, "dtype": layer.weight.dtype}
    if shape == "linear":
        fan_in = weight_in(layer)
        return Factored(
            nn.Linear(fan_in, rank, bias=False, **kw),
            nn.Linear(rank, layer.weight.numel() // fan_in, bias=bias, **kw),
        )
    c, d = layer.in_channels, layer.out_channels
    common = {"padding_mode": layer.padding_mode, **kw}
    if shape == "conv":
        return Factored(
            nn.Conv2d(
                c,
                rank,
                layer.kernel_size,
                layer.stride,
                layer.padding,
                layer.dilation,
                bias=False,
                **common,
            ),
            nn.Conv2d(rank, d, 1, bias=bias, **kw),
        )
    (kh, kw_), (sh, sw), (dh, dw) = layer.kernel_size, layer.stride, layer.dilation
    pad = layer.padding
    vpad, hpad = (pad, pad) if isinstance(pad, str) else ((pad[0], 0), (0, pad[1]))
    return Factored(
        nn.Conv2d(c, rank, (kh, 1), (sh, 1), vpad, (dh, 1), bias=False, **common),
        nn.Conv2d(rank, d, (1, kw_), (1, sw), hpad, (1, dw), bias=bias, **common),
    )


@dataclass
class Factorization:
    """``layer`` as components ordered best first; see the module docstring.

    ``first`` (R, fan_in) and ``second`` (out, R) -- (out, R, kw) for ``separable`` -- are
    the component weights of the two thin layers; ``spectrum`` (R,) the energy of each
    component (descending). The second layer's bias is ``layer.bias``; for response
    reconstruction it is ``mean + P_r P_r^T (bias - mean)`` with ``P = second``
    orthonormal and ``mean`` the layer's mean response.
    """

    layer: nn.Module
    shape: Shape
    first: torch.Tensor
    second: torch.Tensor
    spectrum: torch.Tensor
    mean: torch.Tensor | None = None
    geometry: Geometry = field(default_factory=lambda: Geometry(1, 1))

    @property
    def max_rank(self) -> int:
        return self.first.shape[0]

    def energy(self, rank: int) -> float:
        """Fraction of the spectrum's energy the first ``rank`` components keep."""
        total = float(self.spectrum.sum())
        return float(self.spectrum[:rank].sum()) / total if total > 0 else 1.0

    def rank_for_energy(self, energy: float) -> int:
        """The smallest rank keeping at least ``energy`` of the spectrum."""
        total = float(self.spectrum.sum())
        if total <= 0:
            return 1
        kept = torch.cumsum(self.spectrum, 0) / total
        return min(int((kept < energy - 1e-12).sum()) + 1, self.max_rank)

    def dense_macs(self) -> int:
        """MACs per sample of the original layer."""
        return self.geometry.out_positions * self.layer.weight.numel()  # groups == 1

    def macs(self, rank: int) -> int:
        """MACs per sample of the rank-``rank`` pair."""
        g, out = self.geometry, self.second.shape[0]
        if self.shape == "separable":
            kh, kw = self.layer.kernel_size
            return rank * (
                g.mid_positions * self.layer.in_channels * kh + g.out_positions * out * kw
            )
        return rank * g.out_positions * (self.first.shape[1] + out)

    def rank_for_macs(self, fraction: float) -> int:
        """The largest rank (>= 1) whose pair costs at most ``fraction`` of the dense MACs."""
        per_rank = self.macs(1)
        return max(1, min(self.max_rank, int(fraction * self.dense_macs() // per_rank)))

    @torch.no_grad()
    def build(self, rank: int) -> Factored:
        """The thin pair keeping the first ``rank`` components, with weights set."""
        if not 1 <= rank <= self.max_rank:
            raise ValueError(f"rank must be in 1..{self.max_rank}, got {rank}")
        layer = self.layer
        bias = layer.bias.detach() if layer.bias is not None else None
        if self.mean is not None:  # response reconstruction: re-add the mean response
            p = self.second[:, :rank]  # (out, r), orthonormal columns
            b = bias if bias is not None else torch.zeros_like(self.mean)
            bias = self.mean + p @ (p.T @ (b - self.mean))
        pair = thin_pair(layer, rank, self.shape, bias is not None)
        first, second = pair[0], pair[1]
        first.weight.copy_(self.first[:rank].reshape(first.weight.shape))
        if self.shape == "separable":  # (out, R, kw) -> (out, r, 1, kw)
            second.weight.copy_(self.second[:, :rank].unsqueeze(2))
        else:
            second.weight.copy_(self.second[:, :rank].reshape(second.weight.shape))
        if bias is not None:
            second.bias.copy_(bias)
        return pair


def weight_matrix(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as a matrix (out, fan_in), in float64 (a Conv1D's transposed)."""
    if is_linear(layer):
        return linear_matrix(layer).double()
    w = layer.weight.detach().double()
    return w.reshape(w.shape[0], -1)


def geometries(
    model: nn.Module, layers: dict[str, nn.Module], probe: torch.Tensor
) -> dict[str, Geometry]:
    """Output and separable-middle positions of each layer, from one forward pass on ``probe``."""
    found: dict[str, Geometry] = {}

    def see(name: str, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if isinstance(module, nn.Conv2d):  # output (1, d, H_out, W_out), input (1, c, H, W)
            h_out, w_out = output.shape[-2:]
            found[name] = Geometry(h_out * w_out, h_out * inputs[0].shape[-1])
        else:  # (1, ..., out): every leading position is a token
            positions = output.numel() // output.shape[-1]
            found[name] = Geometry(positions, positions)

    one = probe[:1] if isinstance(probe, torch.Tensor) else probe  # a dict: keyword inputs
    run_calibration(model, [one], layers, see)
    check_all_ran(layers, found, model)
    return found


def check_all_ran(layers: dict[str, nn.Module], seen: dict, model: nn.Module) -> None:
    """A layer that never ran as a module (e.g. in a loaded ``.pt2`` graph) cannot be factorised."""
    missing = [name for name in layers if name not in seen]
    if missing:
        raise ConfigError(
            f"layer {missing[0]!r} of {type(model).__name__} never ran as a module on the "
            f"calibration input; a model loaded from a .pt2 graph cannot be factorised -- "
            f"factorise the original nn.Module (or exclude the layer)"
        )


def replace_(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at ``name`` inside ``model`` (in place)."""
    model.set_submodule(name, module)


def restore_(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Rebuild, in place, the factorised layers that ``state`` holds but ``model`` lacks.

    A layer ``name`` of ``model`` that is a Linear/Conv2d while ``state`` has
    ``name.0.weight`` and ``name.1.weight`` instead of ``name.weight`` becomes a
    :class:`Factored` of the saved rank and shape (weights uninitialised: load ``state``).
    """
    for name, module in list(model.named_modules()):
        first = state.get(f"{name}.0.weight")
        if (
            not name
            or not (is_linear(module) or isinstance(module, nn.Conv2d))
            or f"{name}.weight" in state
            or first is None
            or f"{name}.1.weight" not in state
        ):
            continue
        shape: Shape = "linear"
        if isinstance(module, nn.Conv2d):
            same = tuple(first.shape[2:]) == tuple(module.kernel_size)
            shape = "conv" if same else "separable"
        pair = thin_pair(module, first.shape[0], shape, f"{name}.1.bias" in state)
        replace_(model, name, pair)
