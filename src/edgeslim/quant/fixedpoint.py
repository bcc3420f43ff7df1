"""Dynamic fixed point: power-of-two scales, fractional lengths chosen layer by layer.

Qiu et al. 2016, "Going Deeper with Embedded FPGA Platform for Convolutional Neural
Network" (FPGA '16, https://doi.org/10.1145/2847263.2847265), section 5: a number is
``q * 2^-fl`` with ``q`` a signed ``bits``-bit integer and ``fl`` the *fractional length*.
Dynamic precision gives every layer its own ``fl`` for weights and for activations:

1. weights first: per layer, ``fl`` minimising the squared error ``||W - Q_fl(W)||^2``;
2. then activations, greedily in execution order: with the weights and all earlier
   activations already quantized, the ``fl`` of each activation tensor minimising the
   squared error against the *float* model's value of that tensor.

``per_layer=False`` is the static baseline the paper compares with: one global ``fl`` for
all weights and one for all activations (each minimising the total squared error).

Zero points are 0 (symmetric, as fixed point is); scales are ``2^-fl``, so requantization
multipliers are exact powers of two. Built on the PTQ graph (:mod:`.ptq`): the result is
the same kind of quantized model (exact integer simulation, ``layer_qparams``, ONNX QDQ).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import ConfigDict, Field
from torch import nn

from edgeslim.core.device import model_device
from edgeslim.core.errors import ConfigError
from edgeslim.core.hooks import forward_hooks, iter_batches
from edgeslim.core.options import Options
from edgeslim.core.registry import Context
from edgeslim.quant import fake
from edgeslim.quant.modules import ActQuant, QuantAvgPool, quant_layers, set_mode
from edgeslim.quant.ptq import Int8PTQ, prepare
from edgeslim.quant.registry import REGISTRY

FL_RANGE = range(-8, 25)  # candidate fractional lengths


class DynamicFixedPoint(Options):
    """Power-of-two quantization with per-layer (or one global) fractional lengths."""

    model_config = ConfigDict(extra="forbid")

    bits: int = Field(8, ge=2, le=8, description="width of weights and activations")
    per_layer: bool = Field(True, description="False: one global fl for weights, one for acts")
    skip_first: bool = False
    skip_last: bool = False
    exclude: list[str] = Field(default_factory=list)
    calib_size: int = Field(256, ge=1)

    builds_graph: ClassVar[bool] = True  # quantized as a torch.fx graph: use quantize()

    def calib_count(self) -> int:
        return self.calib_size


def _fixed_error(x: torch.Tensor, fl: int, qmin: int, qmax: int, ref: torch.Tensor) -> float:
    """``sum (Q_fl(x) - ref)^2`` with ``Q_fl(x) = clamp(round(x 2^fl)) 2^-fl``."""
    scale = 2.0 ** (-fl)
    q = torch.clamp(fake.round_half_away(x / scale), qmin, qmax) * scale
    return float(((q - ref) ** 2).sum())


def best_fl(
    xs: list[torch.Tensor], qmin: int, qmax: int, refs: list[torch.Tensor] | None = None
) -> int:
    """The fractional length minimising the summed squared error over ``xs`` (vs ``refs``)."""
    refs = refs if refs is not None else xs
    errors = {
        fl: sum(_fixed_error(x, fl, qmin, qmax, r) for x, r in zip(xs, refs, strict=True))
        for fl in FL_RANGE
    }
    return min(errors, key=lambda fl: (errors[fl], -fl))


def _capture(model: nn.Module, quants: list[ActQuant], calib: Any) -> dict[ActQuant, torch.Tensor]:
    """The input of each quantizer in ``quants`` over all of ``calib`` (concatenated)."""
    seen: dict[ActQuant, list[torch.Tensor]] = {q: [] for q in quants}
    hooked = {str(k): q for k, q in enumerate(quants)}
    see = lambda _n, m, i, o: seen[m].append(i[0].detach())  # noqa: E731
    # the model's own mode (no eval_mode) and model(batch) for any batch: not run_calibration
    with forward_hooks(hooked, see), torch.no_grad():
        for batch in iter_batches(calib, device=model_device(model)):
            model(batch)
    return {q: torch.cat(v) for q, v in seen.items() if v}


def _execution_order(model: nn.Module, quants: list[ActQuant], example: torch.Tensor):
    order: list[ActQuant] = []
    hooked = {str(k): q for k, q in enumerate(quants)}
    with forward_hooks(hooked, lambda _n, m, i, o: order.append(m)), torch.no_grad():
        model(example)
    return list(dict.fromkeys(order))


def dynamic_fixed_point_(model: nn.Module, cfg: DynamicFixedPoint, ctx: Context) -> nn.Module:
    """Quantize ``model`` to ``cfg.bits``-bit dynamic (or static) fixed point.

    Returns the quantized model in exact mode; ``quant_info`` holds the chosen fractional
    lengths (``weight_fl`` per layer, ``activation_fl`` per quantized tensor).
    """
    calib, filter_fn = ctx.calib, ctx.filter_fn
    if calib is None:
        raise ConfigError("DynamicFixedPoint needs calibration data: calib=data.calib(256)")
    ptq = Int8PTQ.shared_with(cfg, weight_bits=cfg.bits, activation_bits=cfg.bits, graph="fx")
    qmodel, info = prepare(model, ptq, filter_fn)
    layers = quant_layers(qmodel)
    quants = [m for m in qmodel.modules() if isinstance(m, ActQuant) and m.source is None]

    # 1. weights: per layer (or one global) fractional length
    wq = next(iter(layers.values())).weight_quant
    weights = {name: layer.weight.detach() for name, layer in layers.items()}
    if cfg.per_layer:
        weight_fl = {n: best_fl([w], wq.qmin, wq.qmax) for n, w in weights.items()}
    else:
        fl = best_fl(list(weights.values()), wq.qmin, wq.qmax)
        weight_fl = dict.fromkeys(weights, fl)
    for name, layer in layers.items():
        with torch.no_grad():
            layer.weight_scale.fill_(2.0 ** (-weight_fl[name]))
        layer.scale_locked = True

    # 2. activations: against the float model's values, greedily in execution order
    set_mode(qmodel, "float")
    first = next(iter(iter_batches(calib, device=model_device(qmodel))))
    order = _execution_order(qmodel, quants, first)
    refs = _capture(qmodel, order, calib)  # float model, float weights
    qa = order[0]
    for layer in layers.values():
        layer.mode = "fake"  # quantized weights from here on
    if cfg.per_layer:
        for q in order:
            x = _capture(qmodel, [q], calib)[q]  # earlier tensors already quantized
            fl = best_fl([x], qa.qmin, qa.qmax, [refs[q]])
            _set_fixed(q, fl)
            q.mode = "fake"
    else:
        xs = _capture(qmodel, order, calib)
        fl = best_fl([xs[q] for q in order], qa.qmin, qa.qmax, [refs[q] for q in order])
        for q in order:
            _set_fixed(q, fl)
    activation_fl = {
        name: round(-torch.log2(m.scale).item())
        for name, m in qmodel.named_modules()
        if isinstance(m, ActQuant) and m.source is None
    }
    for m in qmodel.modules():
        if isinstance(m, QuantAvgPool):
            m.mode = "fake"
    set_mode(qmodel, "exact")
    info.update(
        bits=cfg.bits,
        per_layer=cfg.per_layer,
        weight_fl=weight_fl,
        activation_fl=activation_fl,
        layer_bits=dict.fromkeys(layers, cfg.bits),
    )
    qmodel.quant_info = info
    return qmodel


def _set_fixed(q: ActQuant, fl: int) -> None:
    with torch.no_grad():
        q.scale.fill_(2.0 ** (-fl))
        q.zero_point.zero_()


REGISTRY.register(
    "dynamic_fixed_point", DynamicFixedPoint, dynamic_fixed_point_, takes=("calib", "filter_fn")
)
