"""Quantized layers: conv, linear, embedding, add, average pool (quantizers: :mod:`.quantizers`).

Every module runs in one of four modes (set on the whole model with :func:`set_mode`):

``"observe"``  calibration: record activations in an :class:`~.observers.Observer`, pass
               values through unchanged (weights are left float).
``"fake"``     float32 fake quantization with straight-through gradients: what QAT trains.
``"exact"``    integer arithmetic (int64 / float64 carriers): a layer's int32 accumulator
               and its requantization are those of ``spec``, so outputs equal the integer
               reference bit for bit.
``"export"``   ``quantized_decomposed`` Q/DQ ops that ``torch.onnx.export`` turns into ONNX
               QuantizeLinear / DequantizeLinear (used by :mod:`edgeslim.export.onnx`).

Quantized tensors carry their qparams in buffers with fixed names (``scale``,
``zero_point``; ``weight_scale``; ``out_scale``, ``out_zero_point``), so a state dict holds
everything needed to rebuild the integer model; :func:`edgeslim.quant.ptq.layer_qparams`
turns them into :class:`~.ptq.LayerQParams`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.ao.quantization.fx._decomposed  # registers the quantized_decomposed ops
import torch.nn.functional as F
from torch import nn

from edgeslim.core.linear import weight_in, weight_matrix
from edgeslim.quant import fake, spec
from edgeslim.quant.quantizers import MODES as MODES
from edgeslim.quant.quantizers import ActQuant as ActQuant
from edgeslim.quant.quantizers import Mode as Mode
from edgeslim.quant.quantizers import QuantModule as QuantModule
from edgeslim.quant.quantizers import WeightQuant as WeightQuant
from edgeslim.quant.quantizers import make_learnable_ as make_learnable_
from edgeslim.quant.quantizers import qd_ops


class _QuantLayer(QuantModule):
    """What quantized conv and linear layers share (mixed into nn.Conv2d / nn.Linear).

    Buffers: ``weight_scale`` (C_out,) float32; ``out_scale`` / ``out_zero_point`` (1,) when
    the output is requantized (``has_output``), else the layer outputs float (dequantized
    accumulator), as a transformer's linear layers do. Child ``input_quant`` quantizes the
    input; ``act`` is the fused activation (None, "relu", "relu6").
    """

    weight: nn.Parameter
    bias: nn.Parameter | None

    def _init_from(self, layer: nn.Module, wq: WeightQuant, input_quant: ActQuant) -> None:
        """Copy the float ``layer``'s weight and bias, then set up the quantizers."""
        with torch.no_grad():
            self.weight.copy_(layer.weight)
            if layer.bias is not None:
                self.bias.copy_(layer.bias)
        self._init_quant(wq, input_quant)

    def _init_quant(self, wq: WeightQuant, input_quant: ActQuant) -> None:
        self.weight_quant = wq
        self.input_quant = input_quant
        self.act: str | None = None
        self.has_output = False
        self.lsq = False
        self.scale_locked = False  # weight_scale set by an algorithm (fixed point): keep it
        self.link("output_quant", None)  # the ActQuant after this layer (graph mode)
        c = self.weight.shape[0]
        self.register_buffer("weight_scale", torch.ones(c))
        self.register_buffer("out_scale", torch.ones(1))
        self.register_buffer("out_zero_point", torch.zeros(1, dtype=torch.int64))
        # frozen integer form (see freeze): what exact mode, export and layer_qparams read
        self.register_buffer("weight_int8", torch.zeros(self.weight.shape, dtype=torch.int8))
        self.register_buffer("bias_int32", torch.zeros(c, dtype=torch.int32))
        self.register_buffer("multiplier", torch.zeros(c, dtype=torch.int64))
        self.register_buffer("shift", torch.zeros(c, dtype=torch.int64))
        self.register_buffer("act_limits", torch.tensor([-128, 127], dtype=torch.int64))
        self.register_buffer("weight_bits", torch.tensor([wq.bits], dtype=torch.int64))
        self.register_load_state_dict_post_hook(_QuantLayer._sync_bits)
        self.refresh_weight_scale()

    @staticmethod
    def _sync_bits(module: _QuantLayer, _incompatible: object) -> None:
        """After loading a state dict, take the weight bit width it records."""
        bits = int(module.weight_bits)
        if bits != module.weight_quant.bits:
            module.weight_quant = WeightQuant(bits, module.weight_quant.method)

    # ---- weights

    def refresh_weight_scale(self) -> None:
        """Recompute ``weight_scale`` from the current float weights (not for LSQ or locked)."""
        if self.lsq or self.scale_locked:
            return
        with torch.no_grad():
            scales = self.weight_quant.scales(self.weight)
            self.weight_scale.copy_(torch.as_tensor(scales, dtype=torch.float32))

    def enable_lsq(self) -> None:
        """Make ``weight_scale`` a learnable parameter (LSQ)."""
        if not self.lsq:
            make_learnable_(self, "weight_scale")
            self.lsq = True

    def weight_int(self) -> torch.Tensor:
        """The integer weights (int64, values in [qmin, qmax])."""
        zp = torch.zeros_like(self.weight_scale, dtype=torch.int64)
        wq = self.weight_quant
        return fake.quantize(
            self.weight.detach(), self.weight_scale.detach(), zp, wq.qmin, wq.qmax, 0
        )

    def _fake_weight(self) -> torch.Tensor:
        wq = self.weight_quant
        zp = torch.zeros_like(self.weight_scale)
        if self.lsq:
            return fake.lsq_quant(self.weight, self.weight_scale, zp, wq.qmin, wq.qmax, axis=0)
        if self.training and wq.method == "minmax" and not self.scale_locked:
            # QAT: the scale follows the weights as they train (max |w_c| / qmax)
            with torch.no_grad():
                amax = self.weight.detach().abs().reshape(self.weight.shape[0], -1).amax(1)
                self.weight_scale.copy_(torch.where(amax > 0, amax / wq.qmax, 1.0))
        return fake.fake_quant(self.weight, self.weight_scale, zp, wq.qmin, wq.qmax, axis=0)

    # ---- requantization and the frozen integer form

    def out_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The output's ``(scale, zero_point)``: the linked output quantizer's, else buffers."""
        if self.output_quant is not None:
            return self.output_quant._params()
        return self.out_scale, self.out_zero_point

    def freeze(self) -> None:
        """Fill the integer buffers from the float weights and the current qparams.

        ``weight_int8`` (C_out, ...) int8, ``bias_int32`` (C_out,) int32 with scale
        ``s_in * s_w[c]``, per-channel ``multiplier`` / ``shift`` of ``s_in * s_w[c] / s_out``
        and ``act_limits`` = (act_min, act_max) of the fused activation. Called whenever
        qparams may have changed (:func:`set_mode` to exact or export, :func:`finalize`).
        """
        with torch.no_grad():
            self.weight_int8.copy_(self.weight_int().to(torch.int8))
            if self.input_quant.dynamic:
                return  # input qparams are only known per batch: requantization at run time
            s_in = float(self.input_quant.qparams().scale[0])
            sw = self.weight_scale.detach().cpu().double().numpy()
            if self.bias is not None:
                b = spec.quantize_bias(self.bias.detach().cpu().double().numpy(), s_in, sw)
                self.bias_int32.copy_(torch.from_numpy(b).to(torch.int32))
            if not self.has_output:
                return
            s_out_t, zp_out_t = self.out_qparams()
            self.out_scale.copy_(s_out_t.detach())
            self.out_zero_point.copy_(zp_out_t.detach())
            s_out, zp_out = float(s_out_t), int(zp_out_t)
            pairs = [spec.quantize_multiplier(s_in * float(c) / s_out) for c in sw]
            self.multiplier.copy_(torch.tensor([m for m, _ in pairs], dtype=torch.int64))
            self.shift.copy_(torch.tensor([sh for _, sh in pairs], dtype=torch.int64))
            lo, hi = spec.activation_range(self.act, s_out, zp_out)
            qmin, qmax = spec.int_range(self.input_quant.bits, symmetric=False)
            self.act_limits.copy_(torch.tensor([max(lo, qmin), min(hi, qmax)]))

    def _layer_op(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def _channel_view(self, t: torch.Tensor, ndim: int) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mode = self.mode
        if mode in ("float", "observe"):
            x = self.input_quant(x)
            return self._layer_op(x, self.weight, self.bias)
        if mode == "exact":
            return self._exact(x)
        if mode == "export":
            return self._export(x)
        x = self.input_quant(x)
        return self._layer_op(x, self._fake_weight(), self.bias)

    def _exact(self, x: torch.Tensor) -> torch.Tensor:
        """Integer inference from the frozen buffers (tensor ops only, so it exports).

        ``acc = sum(w_q * (x_q - zp_in)) + bias_q`` exactly (float32 carries integers below
        2^24, float64 below 2^53; the narrower one is used when the bound allows); then
        ``clamp(MBQM(acc, m, shift) + zp_out, act_min, act_max)`` when the output is
        quantized, else ``acc * s_in * s_w[c]`` in float.
        """
        aq = self.input_quant
        s_in, zp_in = aq._dynamic_params(x) if aq.dynamic else aq._params()
        xq = fake.quantize(x, s_in, zp_in, aq.qmin, aq.qmax)  # int64
        # float32 holds every integer below 2^24 exactly: use it when no sum can get there
        k = self.weight[0].numel()  # products per output value
        bound = self.weight_quant.qmax * (aq.qmax - aq.qmin) * k
        dtype = torch.float32 if bound < 2**24 else torch.float64
        acc = self._layer_op((xq - zp_in).to(dtype), self.weight_int8.to(dtype), None)
        acc = acc.to(torch.float64)
        if self.bias is not None:
            if aq.dynamic:  # bias scale depends on this batch's input scale
                b = fake.round_half_away(
                    self.bias.detach().double() / (s_in.double() * self.weight_scale.double())
                )
            else:
                b = self.bias_int32.to(torch.float64)
            acc = acc + self._channel_view(b, acc.dim())
        acc = acc.round().to(torch.int64)
        if not self.has_output:  # float output: dequantize the accumulator
            scale = self.weight_scale.detach().double() * s_in.double()
            return (acc.to(torch.float64) * self._channel_view(scale, acc.dim())).to(torch.float32)
        m = self._channel_view(self.multiplier, acc.dim())
        sh = self._channel_view(self.shift, acc.dim())
        q = fake.multiply_by_quantized_multiplier(acc, m, sh) + self.out_zero_point
        q = torch.maximum(torch.minimum(q, self.act_limits[1]), self.act_limits[0])
        return fake.dequantize(q, self.out_scale, self.out_zero_point)

    def _export(self, x: torch.Tensor) -> torch.Tensor:
        """Q/DQ ops that ONNX export turns into QuantizeLinear / DequantizeLinear."""
        qd = qd_ops()
        x = self.input_quant(x)  # the input quantizer is in export mode too: Q -> DQ
        w = qd.dequantize_per_channel(
            self.weight_int8,
            self.weight_scale.detach(),
            torch.zeros_like(self.weight_scale, dtype=torch.int64),
            0,
            self.weight_quant.qmin,
            self.weight_quant.qmax,
            torch.int8,
        )
        return self._layer_op(x, w, None if self.bias is None else self.bias.detach())


class _QuantConv(_QuantLayer):
    """What the quantized convolutions share: built from the float conv's own arguments, one
    weight scale per output channel (dim 1 of the activations)."""

    _conv = staticmethod(F.conv2d)  # the functional form of the layer

    @classmethod
    def from_float(cls, conv: nn.Module, wq: WeightQuant, input_quant: ActQuant) -> _QuantConv:
        new = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
            conv.bias is not None,
            conv.padding_mode,
        )
        new._init_from(conv, wq, input_quant)
        return new

    def _layer_op(self, x, w, b):
        return self._conv(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    def _channel_view(self, t, ndim):
        return t.reshape(1, -1, *([1] * (ndim - 2)))


class QuantConv2d(_QuantConv, nn.Conv2d):
    """An ``nn.Conv2d`` whose input, weights (per output channel) and output are quantized."""

    _conv = staticmethod(F.conv2d)


class QuantConv1d(_QuantConv, nn.Conv1d):
    """An ``nn.Conv1d`` whose input, weights (per output channel) and output are quantized."""

    _conv = staticmethod(F.conv1d)


class QuantLinear(_QuantLayer, nn.Linear):
    """An ``nn.Linear`` whose input, weights (per output row) and output are quantized."""

    @classmethod
    def from_float(cls, lin: nn.Module, wq: WeightQuant, input_quant: ActQuant) -> QuantLinear:
        """The quantized twin of ``lin``: an ``nn.Linear`` or transformers' ``Conv1D``
        (GPT-2's linear layer, its weight stored ``(in, out)``; the twin holds ``(out, in)``)."""
        fan_in = weight_in(lin)
        new = cls(fan_in, lin.weight.numel() // fan_in, lin.bias is not None)
        if isinstance(lin, nn.Linear):
            new._init_from(lin, wq, input_quant)
            return new
        with torch.no_grad():
            new.weight.copy_(weight_matrix(lin))
            if lin.bias is not None:
                new.bias.copy_(lin.bias)
        new._init_quant(wq, input_quant)
        return new

    def _layer_op(self, x, w, b):
        return F.linear(x, w, b)

    def _channel_view(self, t, ndim):
        return t.reshape(*([1] * (ndim - 1)), -1)


class QuantEmbedding(QuantModule):
    """An embedding table stored as int8 rows with one symmetric scale per row (weight-only).

    Buffers ``weight_int8`` (N, D) int8 and ``weight_scale`` (N,) float32; the lookup
    gathers int8 rows and their scales and multiplies (in ONNX: Gather, Gather, Cast, Mul),
    so the table is never dequantized as a whole.
    """

    def __init__(self, emb: nn.Embedding) -> None:
        super().__init__()
        self.padding_idx = emb.padding_idx
        w = emb.weight.detach()
        amax = w.abs().amax(1)
        scale = torch.where(amax > 0, amax / spec.WEIGHT_MAX, torch.ones_like(amax))
        q = fake.round_half_away(w / scale[:, None]).clamp(spec.WEIGHT_MIN, spec.WEIGHT_MAX)
        self.register_buffer("weight_int8", q.to(torch.int8))
        self.register_buffer("weight_scale", scale.float())

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized table (N, D) float32 (what transformers code may read)."""
        return self.weight_int8.float() * self.weight_scale[:, None]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.weight_int8[ids].to(torch.float32)  # (..., D)
        return rows * self.weight_scale[ids].unsqueeze(-1)


class QuantAdd(QuantModule):
    """Elementwise add of two quantized tensors; exact mode is ``spec.add_int8``.

    ``sources`` are the :class:`ActQuant` of the two operands and ``output_quant`` the one
    right after the add (linked, not owned). Buffer ``add_params`` (7,) int64 holds
    ``spec.AddParams`` in field order once frozen.
    """

    def __init__(self) -> None:
        super().__init__()
        self.link("sources", None)
        self.link("output_quant", None)
        self.register_buffer("add_params", torch.zeros(7, dtype=torch.int64))

    def freeze(self) -> None:
        if self.sources is None or self.output_quant is None:
            return
        (s1, _), (s2, _) = (q.export_qparams() for q in self.sources)
        so, _ = self.output_quant.export_qparams()
        p = spec.add_params(s1, s2, so)
        values = p.values()
        with torch.no_grad():
            self.add_params.copy_(torch.tensor(values, dtype=torch.int64))

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.mode != "exact" or self.sources is None or self.output_quant is None:
            return a + b
        q1, q2 = self.sources
        s1, z1 = q1._params()
        s2, z2 = q2._params()
        so, zo = self.output_quant._params()
        p = self.add_params
        mbqm = fake.multiply_by_quantized_multiplier
        x1 = (fake.quantize(a, s1, z1, q1.qmin, q1.qmax) - z1) << p[0]
        x2 = (fake.quantize(b, s2, z2, q2.qmin, q2.qmax) - z2) << p[0]
        total = mbqm(x1, p[1], p[2]) + mbqm(x2, p[3], p[4])
        out = mbqm(total, p[5], p[6]) + zo
        q = out.clamp(self.output_quant.qmin, self.output_quant.qmax)
        return fake.dequantize(q, so, zo)


class QuantAvgPool(QuantModule):
    """Average pooling to 1x1 that keeps its input's qparams (as TFLite does).

    ``source`` (linked) is the quantizer of the input. Exact mode sums the integer inputs and
    divides with ``spec.rounded_average``'s rounding; fake mode averages in float and rounds
    back onto the input's grid.
    """

    def __init__(self, pool: nn.Module) -> None:
        super().__init__()
        self.pool = pool
        self.link("source", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "export":  # AveragePool, which ORT fuses into QLinearAveragePool
            return F.avg_pool2d(x, kernel_size=tuple(x.shape[-2:]))
        if self.source is None or self.mode in ("float", "observe"):
            return self.pool(x)
        s, z = self.source._params()
        qmin, qmax = self.source.qmin, self.source.qmax
        if self.mode == "exact":
            q = fake.quantize(x, s, z, qmin, qmax)  # (B, C, H, W)
            total = q.sum(dim=(-2, -1), keepdim=True)  # (B, C, 1, 1)
            count = x.shape[-1] * x.shape[-2]
            half = count // 2
            num = torch.where(total > 0, total + half, total - half)
            avg = torch.div(num, count, rounding_mode="trunc")
            return fake.dequantize(avg.clamp(qmin, qmax), s, z)
        return fake.fake_quant(self.pool(x), s, z, qmin, qmax)


def set_mode(model: nn.Module, mode: Mode) -> None:
    """Put every quantized module of ``model`` in ``mode`` (see the module docstring)."""
    if mode not in MODES:
        raise ValueError(f"unknown quantization mode {mode!r}; expected one of {MODES}")
    for m in model.modules():
        if isinstance(m, QuantModule):
            m.mode = mode
            if mode in ("exact", "export"):
                m.freeze()


@contextmanager
def fake_quant_training(model: nn.Module) -> Iterator[nn.Module]:
    """Train ``model`` through fake quantization, then put every quantized module back in
    the mode it had (a pipeline stage's fine-tuning of a quantized model)."""
    modes = {m: m.mode for m in model.modules() if isinstance(m, QuantModule)}
    set_mode(model, "fake")
    try:
        yield model
    finally:
        for mode in dict.fromkeys(modes.values()):
            for m, was in modes.items():
                if was == mode:
                    m.mode = mode
                    if mode in ("exact", "export"):
                        m.freeze()


def quant_layers(model: nn.Module) -> dict[str, _QuantLayer]:
    """The quantized conv / linear layers of ``model`` by qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, _QuantLayer)}


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, QuantModule) for m in model.modules())
