"""Mixed precision: per-layer weight bit widths chosen under a size budget from sensitivity.

Following HAWQ's framing (Dong et al. 2019, https://arxiv.org/abs/1905.03696) with the
cheap sensitivity measure of Krishnamoorthi 2018 / Cai et al. 2020 (ZeroQ,
https://arxiv.org/abs/2001.00281): quantize *one* layer's weights to ``b`` bits, leave
everything else float, and measure how far the output moves (KL divergence of the softmax
for classifiers, relative squared error otherwise) on calibration data. Then choose bits
per layer so the weights fit ``budget`` bytes with the least total sensitivity:

- scoring: :func:`layer_sensitivity` -> ``{layer: {bits: sensitivity}}``;
- choosing: :func:`choose_bits`, greedy from the widest setting, each step narrowing the
  layer with the smallest sensitivity increase per byte saved, until the budget holds, then
  widening where the leftover budget buys the most;
- applying: :func:`~.ptq.int8_ptq_` with ``layer_bits`` (8-bit activations, per-channel
  MSE-clipped weight scales, which matter at 2 and 4 bits).

The chosen bits go to ``quant_info["layer_bits"]`` (and into the run report's per-layer bits
plot); weights are stored packed at their bit width by the ``quantize`` stage's artifact.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from ..calibration import iter_batches
from ..errors import ConfigError
from .modules import WeightQuant, quant_layers, set_mode
from .ptq import FilterFn, Int8PTQ, int8_ptq_, prepare


class MixedPrecision(BaseModel):
    """Per-layer weight bits from ``bits`` under a budget (``budget_bytes`` or ``avg_bits``).

    ``avg_bits`` = 4 gives the weights the size they would have at a uniform 4 bits.
    """

    model_config = ConfigDict(extra="forbid")

    bits: list[int] = Field(default_factory=lambda: [2, 4, 8])
    budget_bytes: int | None = Field(None, ge=1)
    avg_bits: float | None = Field(None, gt=0, le=8)
    calibration: str = "mse"
    weight_calibration: str = "mse"
    skip_first: bool = False
    skip_last: bool = False
    exclude: list[str] = Field(default_factory=list)
    calib_size: int = Field(256, ge=1)

    @model_validator(mode="after")
    def _one_budget(self) -> MixedPrecision:
        if (self.budget_bytes is None) == (self.avg_bits is None):
            raise ValueError("give exactly one of 'budget_bytes' or 'avg_bits'")
        if not self.bits or any(b not in (2, 3, 4, 5, 6, 7, 8) for b in self.bits):
            raise ValueError(f"bits must be a non-empty list of widths in 2..8, got {self.bits}")
        return self


def _distance(ref: torch.Tensor, out: torch.Tensor) -> float:
    """KL(softmax(ref) || softmax(out)) for (B, classes) logits, else relative squared error."""
    if ref.dim() == 2:
        return float(
            F.kl_div(
                F.log_softmax(out, 1), F.log_softmax(ref, 1), log_target=True, reduction="batchmean"
            )
        )
    return float(((out - ref) ** 2).sum() / (ref**2).sum().clamp(min=1e-12))


def layer_sensitivity(
    qmodel: nn.Module, calib: Any, bits: list[int], weight_calibration: str = "mse"
) -> dict[str, dict[int, float]]:
    """``{layer: {b: output distance}}`` with only that layer's weights at ``b`` bits.

    ``qmodel`` is a prepared (not yet calibrated) quantized model; it is left in float mode.
    """
    batches = list(iter_batches(calib))
    set_mode(qmodel, "float")
    with torch.no_grad():
        refs = [qmodel(b) for b in batches]
    result: dict[str, dict[int, float]] = {}
    for name, layer in quant_layers(qmodel).items():
        saved = layer.weight_quant
        result[name] = {}
        for b in bits:
            layer.weight_quant = WeightQuant(b, weight_calibration)
            layer.refresh_weight_scale()
            layer.mode = "fake"
            layer.input_quant.mode = "float"  # weights only
            with torch.no_grad():
                d = sum(_distance(r, qmodel(x)) for r, x in zip(refs, batches, strict=True))
            result[name][b] = d / len(batches)
            layer.mode = "float"
        layer.weight_quant = saved
        layer.refresh_weight_scale()
    return result


def choose_bits(
    sensitivity: dict[str, dict[int, float]], numel: dict[str, int], budget_bits: float
) -> dict[str, int]:
    """Greedy bit allocation under ``budget_bits`` (total weight bits).

    1. Narrow: from the widest setting everywhere, repeatedly apply the one change (any
       layer, to any narrower width) with the smallest sensitivity increase per bit saved,
       until the weights fit.
    2. Widen: spend what is left of the budget, repeatedly applying the change (any layer,
       any wider width that still fits) with the largest sensitivity decrease per bit spent.

    Raises :class:`ConfigError` when even the narrowest setting exceeds the budget.
    """
    bits = {n: max(opts) for n, opts in sensitivity.items()}
    narrowest = sum(numel[n] * min(opts) for n, opts in sensitivity.items())
    if narrowest > budget_bits:
        raise ConfigError(
            f"impossible budget: {budget_bits / 8:,.0f} bytes of weights, but even the narrowest "
            f"bit widths need {narrowest / 8:,.0f} bytes"
        )

    def total() -> int:
        return sum(numel[n] * b for n, b in bits.items())

    while total() > budget_bits:
        best, best_cost = None, float("inf")
        for n, opts in sensitivity.items():
            for b in (b for b in opts if b < bits[n]):
                cost = (opts[b] - opts[bits[n]]) / (numel[n] * (bits[n] - b))
                if cost < best_cost:
                    best, best_cost = (n, b), cost
        bits[best[0]] = best[1]
    while True:
        best, best_gain = None, 0.0
        spare = budget_bits - total()
        for n, opts in sensitivity.items():
            for b in (b for b in opts if b > bits[n] and numel[n] * (b - bits[n]) <= spare):
                gain = (opts[bits[n]] - opts[b]) / (numel[n] * (b - bits[n]))
                if gain > best_gain:
                    best, best_gain = (n, b), gain
        if best is None:
            return bits
        bits[best[0]] = best[1]


def mixed_precision_(
    model: nn.Module,
    cfg: MixedPrecision,
    *,
    calib: Any = None,
    filter_fn: FilterFn | None = None,
    **_: Any,
) -> nn.Module:
    """Measure sensitivity, choose per-layer bits under the budget, quantize; return the model.

    ``quant_info`` gains ``layer_bits``, ``sensitivity``, ``weight_bytes`` and ``budget_bytes``.
    """
    if calib is None:
        raise ConfigError("MixedPrecision needs calibration data: calib=data.calib(256)")
    base = dict(
        calibration=cfg.calibration,
        weight_calibration=cfg.weight_calibration,
        skip_first=cfg.skip_first,
        skip_last=cfg.skip_last,
        exclude=cfg.exclude,
    )
    probe, _ = prepare(copy.deepcopy(model), Int8PTQ(**base), filter_fn)
    sens = layer_sensitivity(probe, calib, sorted(set(cfg.bits)), cfg.weight_calibration)
    numel = {n: layer.weight.numel() for n, layer in quant_layers(probe).items()}
    budget_bits = (
        cfg.budget_bytes * 8 if cfg.budget_bytes is not None else cfg.avg_bits * sum(numel.values())
    )
    bits = choose_bits(sens, numel, budget_bits)
    qmodel = int8_ptq_(model, Int8PTQ(**base, layer_bits=bits), calib=calib, filter_fn=filter_fn)
    qmodel.quant_info.update(
        layer_bits=bits,
        sensitivity={n: {str(b): v for b, v in s.items()} for n, s in sens.items()},
        weight_bytes=sum(numel[n] * b for n, b in bits.items()) / 8,
        budget_bytes=budget_bits / 8,
    )
    return qmodel
