"""Quantizers: the activation quantizer (:class:`ActQuant`) and the weight quantizer.

:class:`QuantModule` is the base of every quantized module: it runs in one of the modes of
:mod:`.modules` (``observe``, ``fake``, ``exact``, ``export``, ``float``) and keeps its
qparams in buffers with fixed names (``scale``, ``zero_point``). An :class:`ActQuant` observes
a tensor during calibration and then quantizes it; in graph mode it may share the qparams of
an upstream one (``source``). :class:`WeightQuant` chooses per-channel weight scales.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.ao.quantization.fx._decomposed  # registers the quantized_decomposed ops
from torch import nn

from edgeslim.quant import fake, spec
from edgeslim.quant.observers import Method, Observer, weight_mse_scale

Mode = Literal["observe", "fake", "exact", "export", "float"]
MODES: tuple[str, ...] = ("observe", "fake", "exact", "export", "float")


def qd_ops():
    """``torch.ops.quantized_decomposed`` (registered on import of torch.ao's module)."""
    return torch.ops.quantized_decomposed


def make_learnable_(module: nn.Module, name: str) -> None:
    """Turn ``module``'s buffer ``name`` into an ``nn.Parameter`` holding the same value."""
    value = getattr(module, name).detach().clone()
    delattr(module, name)
    setattr(module, name, nn.Parameter(value))


class QuantModule(nn.Module):
    """Base class: a mode flag shared by every quantized module."""

    mode: str = "fake"

    def link(self, name: str, value: object) -> None:
        """Point attribute ``name`` at another module without making it a child.

        A quantizer shared by two modules (a layer's input and the previous layer's output)
        lives once in the module tree and is referenced from the other place.
        """
        object.__setattr__(self, name, value)

    def freeze(self) -> None:
        """Compute the integer buffers that exact mode and export read (no-op by default)."""


class ActQuant(QuantModule):
    """Quantization of one activation tensor: asymmetric, per tensor, ``bits`` wide.

    Buffers ``scale`` (float32, (1,)) and ``zero_point`` (int64, (1,)). With ``lsq=True``
    ``scale`` is a learnable parameter instead (LSQ). ``dynamic=True`` chooses min-max qparams
    from each batch at run time instead of from calibration.
    """

    def __init__(
        self,
        bits: int = 8,
        method: Method = "minmax",
        percentile: float = 99.99,
        dynamic: bool = False,
    ) -> None:
        super().__init__()
        self.bits = bits
        self.qmin, self.qmax = spec.int_range(bits, symmetric=False)
        self.method = method
        self.percentile = percentile
        self.dynamic = dynamic
        self.register_buffer("scale", torch.ones(1))
        self.register_buffer("zero_point", torch.zeros(1, dtype=torch.int64))
        self.observer: Observer | None = None
        self.link("source", None)  # another ActQuant whose qparams this one shares
        self.direct = False  # the input *is* the source's output: export emits no Q/DQ
        self.lsq = False

    def extra_repr(self) -> str:
        how = "dynamic" if self.dynamic else self.method
        return f"bits={self.bits}, {how}, scale={float(self.scale):.4g}, zp={int(self.zero_point)}"

    @property
    def root(self) -> ActQuant:
        """The quantizer that owns these qparams (following ``source`` links)."""
        q = self
        while q.source is not None:
            q = q.source
        return q

    def qparams(self) -> spec.QParams:
        """The tensor's qparams (those of :attr:`source` when it shares another's)."""
        src = self.root
        return spec.QParams(
            src.scale.detach().cpu().double().numpy().copy(),
            src.zero_point.detach().cpu().numpy().copy(),
            self.qmin,
            self.qmax,
        )

    def set_qparams(self, qp: spec.QParams) -> None:
        with torch.no_grad():
            self.scale.copy_(torch.as_tensor(qp.scale, dtype=torch.float32))
            self.zero_point.copy_(torch.as_tensor(qp.zero_point, dtype=torch.int64))

    def calibrate(self) -> None:
        """Set ``scale`` / ``zero_point`` from the observer; drop the observer."""
        if self.observer is not None and self.observer.seen:
            self.set_qparams(self.observer.qparams(self.bits))
        self.observer = None

    def enable_lsq(self) -> None:
        """Make ``scale`` a learnable parameter (LSQ); its value is kept."""
        if not self.lsq:
            make_learnable_(self, "scale")
            self.lsq = True

    def _params(self) -> tuple[torch.Tensor, torch.Tensor]:
        src = self.root
        return src.scale, src.zero_point

    def export_qparams(self) -> tuple[float, int]:
        """``(scale, zero_point)`` as Python numbers (constants in an exported graph)."""
        qp = self.qparams()
        return float(qp.scale[0]), int(qp.zero_point[0])

    def freeze(self) -> None:
        """Cache the qparams as Python numbers: tracing for export cannot read buffers."""
        self._frozen = None if self.dynamic else self.export_qparams()

    def _dynamic_params(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Min-max qparams of ``x`` (the batch), as ``spec.activation_qparams`` computes them."""
        rmin = torch.clamp(x.detach().min(), max=0.0).double()
        rmax = torch.clamp(x.detach().max(), min=0.0).double()
        scale = (rmax - rmin) / (self.qmax - self.qmin)
        # all zeros, or values float32 cannot scale (denormals): scale 1, as in spec
        tiny = torch.finfo(torch.float32).tiny
        scale = torch.where(scale >= tiny, scale, torch.ones_like(scale))
        zp_min = self.qmin - rmin / scale
        zp_max = self.qmax - rmax / scale
        err_min = abs(self.qmin) + torch.abs(rmin / scale)
        err_max = abs(self.qmax) + torch.abs(rmax / scale)
        zp = torch.where(err_min < err_max, zp_min, zp_max)
        zp = fake.round_half_away(zp).clamp(self.qmin, self.qmax).to(torch.int64)
        return scale.reshape(1), zp.reshape(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mode = self.mode
        if mode == "float" or (mode == "observe" and self.observer is None):
            return x
        if mode == "observe":
            self.observer.update(x)
            return x
        scale, zp = self._dynamic_params(x) if self.dynamic else self._params()
        if mode == "export":
            if self.direct:
                return x  # already Q -> DQ'd by the upstream quantizer
            if self.dynamic:
                raise NotImplementedError("dynamic activation quantization has no QDQ export")
            qd = qd_ops()
            s, z = self._frozen
            if self.bits < 8:  # ONNX saturates to int8: clip to the narrower range first
                x = torch.clamp(x, (self.qmin - z) * s, (self.qmax - z) * s)
            q = qd.quantize_per_tensor(x, s, z, self.qmin, self.qmax, torch.int8)
            return qd.dequantize_per_tensor(q, s, z, self.qmin, self.qmax, torch.int8)
        if mode == "exact":
            q = fake.quantize(x, scale, zp, self.qmin, self.qmax)
            return fake.dequantize(q, scale, zp)
        if self.lsq and self.source is None:
            return fake.lsq_quant(x, scale, zp, self.qmin, self.qmax)
        return fake.fake_quant(x, scale, zp, self.qmin, self.qmax)


class WeightQuant(nn.Module):
    """Symmetric per-output-channel weight quantization settings of a layer (no state).

    ``method`` ``"minmax"``: ``scale = max|w_c| / qmax``; ``"mse"``: the per-channel scale
    with the least squared error (worth it below 8 bits).
    """

    def __init__(self, bits: int = 8, method: Literal["minmax", "mse"] = "minmax") -> None:
        super().__init__()
        self.bits = bits
        self.method = method
        self.qmin, self.qmax = spec.int_range(bits, symmetric=True)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, {self.method}"

    def scales(self, w: torch.Tensor) -> np.ndarray:
        if self.method == "mse":
            return weight_mse_scale(w, self.bits)
        w = w.detach().cpu().double().numpy()
        return spec.weight_qparams(w, axis=0, bits=self.bits).scale
