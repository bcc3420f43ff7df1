"""Mixed precision: per-layer weight bit widths chosen under a size budget from sensitivity.

Following HAWQ's framing (Dong et al. 2019, https://arxiv.org/abs/1905.03696; the budgeted
bit allocation as an exact integer program as in HAWQ-V3, Yao et al. 2021,
https://arxiv.org/abs/2011.10680) with the cheap, measured sensitivity of
Krishnamoorthi 2018 / Cai et al. 2020 (ZeroQ, https://arxiv.org/abs/2001.00281): quantize
*one* layer's weights to ``b`` bits, leave everything else float, and measure how far the
output moves (KL divergence of the softmax for classifiers, relative squared error
otherwise) on calibration data. Then choose bits per layer so the weights fit ``budget``
bits with the least total sensitivity:

- scoring: :func:`layer_sensitivity` -> ``{layer: {bits: sensitivity}}``;
- choosing: :func:`choose_bits`, the exact minimum of the summed sensitivities under the
  budget (a multiple-choice knapsack solved by dynamic programming over the Pareto front
  of (weight bits, sensitivity) of the layers chosen so far), solved for every sub-menu of
  the widths (:func:`candidate_bits`; each uniform width that fits is one); the candidate
  with the smallest *joint* output distance on the calibration data wins. Summed
  one-layer sensitivities underestimate how narrowed layers compound (a confident
  classifier's softmax hides each small error alone), so the prediction is checked by
  measurement, and the result is never worse than uniform on the calibration data;
- applying: :func:`~.ptq.int8_ptq_` with ``layer_bits`` (8-bit activations, per-channel
  MSE-clipped weight scales, which matter at 2 and 4 bits).

The default menu is {2, 3, 4, 5, 6, 8}: with only {2, 4, 8} a budget between two widths
is wasted (LeNet-5 at an average of 4 bits: fc1, 93% of the weights, can only go to 2
bits, and the allocation used 61% of the budget).

The chosen bits go to ``quant_info["layer_bits"]`` (and into the run report's per-layer bits
plot); weights are stored packed at their bit width by the ``quantize`` stage's artifact.
"""

from __future__ import annotations

import copy
import itertools
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import ConfigDict, Field, model_validator
from torch import nn

from edgeslim.core.device import model_device
from edgeslim.core.errors import ConfigError
from edgeslim.core.hooks import iter_batches
from edgeslim.core.options import Options
from edgeslim.core.registry import Context
from edgeslim.quant.modules import WeightQuant, quant_layers, set_mode
from edgeslim.quant.ptq import Int8PTQ, int8_ptq_, prepare
from edgeslim.quant.registry import REGISTRY


class MixedPrecision(Options):
    """Per-layer weight bits from ``bits`` under a budget (``budget_bytes`` or ``avg_bits``).

    ``avg_bits`` = 4 gives the weights the size they would have at a uniform 4 bits.
    Activations are quantized to 8 bits (``calibration``) in the returned model.
    """

    model_config = ConfigDict(extra="forbid")

    bits: list[int] = Field(default_factory=lambda: [2, 3, 4, 5, 6, 8])
    budget_bytes: int | None = Field(None, ge=1)
    avg_bits: float | None = Field(None, gt=0, le=8)
    calibration: str = "mse"
    weight_calibration: str = "mse"
    skip_first: bool = False
    skip_last: bool = False
    exclude: list[str] = Field(default_factory=list)
    calib_size: int = Field(256, ge=1)
    graph: Literal["auto", "fx", "module"] = "auto"

    def calib_count(self) -> int:
        return self.calib_size

    def in_place(self) -> bool:
        return self.graph == "module"  # "auto" / "fx" build a torch.fx graph module

    metric: Literal["kl", "mse"] | None = Field(
        None,
        description="sensitivity: KL of the softmax ('kl') or relative squared error ('mse'); "
        "None: KL for (batch, classes) outputs, else mse (use 'mse' for embeddings)",
    )

    @model_validator(mode="after")
    def _one_budget(self) -> MixedPrecision:
        if (self.budget_bytes is None) == (self.avg_bits is None):
            raise ValueError("give exactly one of 'budget_bytes' or 'avg_bits'")
        if not self.bits or any(b not in (2, 3, 4, 5, 6, 7, 8) for b in self.bits):
            raise ValueError(f"bits must be a non-empty list of widths in 2..8, got {self.bits}")
        return self


def _distance(ref: torch.Tensor, out: torch.Tensor, metric: str | None = None) -> float:
    """KL(softmax(ref) || softmax(out)) over the last axis, or relative squared error.

    ``metric`` None: KL for (B, classes) outputs, relative squared error otherwise.
    """
    if metric == "kl" or (metric is None and ref.dim() == 2):
        return float(
            F.kl_div(
                F.log_softmax(out, -1).reshape(-1, out.shape[-1]),
                F.log_softmax(ref, -1).reshape(-1, ref.shape[-1]),
                log_target=True,
                reduction="batchmean",
            )
        )
    return float(((out - ref) ** 2).sum() / (ref**2).sum().clamp(min=1e-12))


def _outputs(model: nn.Module, batch: Any) -> torch.Tensor:
    out = model(*batch) if isinstance(batch, (tuple, list)) else model(batch)
    return out if isinstance(out, torch.Tensor) else out[0]


class _WeightProbe:
    """A prepared quantized model that runs calibration batches with chosen layers' weights
    fake-quantized (activations float), against the float model's outputs.

    Per-channel weight scales are computed once per (layer, bits) and cached.
    """

    def __init__(self, qmodel: nn.Module, calib: Any, weight_calibration: str, metric: str | None):
        self.qmodel, self.method, self.metric = qmodel, weight_calibration, metric
        self.layers = quant_layers(qmodel)
        self.batches = list(iter_batches(calib, device=model_device(qmodel)))
        self._scales: dict[tuple[str, int], torch.Tensor] = {}
        set_mode(qmodel, "float")
        with torch.no_grad():
            self.refs = [_outputs(qmodel, b) for b in self.batches]

    def _use(self, name: str, bits: int) -> None:
        layer = self.layers[name]
        layer.weight_quant = WeightQuant(bits, self.method)
        if (name, bits) not in self._scales:
            layer.refresh_weight_scale()
            self._scales[name, bits] = layer.weight_scale.detach().clone()
        with torch.no_grad():
            layer.weight_scale.copy_(self._scales[name, bits])
        layer.mode = "fake"
        layer.input_quant.mode = "float"  # weights only

    def distance(self, bits: dict[str, int]) -> float:
        """Mean output distance with the layers in ``bits`` at those widths, others float."""
        set_mode(self.qmodel, "float")
        for name, b in bits.items():
            self._use(name, b)
        with torch.no_grad():
            d = sum(
                _distance(r, _outputs(self.qmodel, x), self.metric)
                for r, x in zip(self.refs, self.batches, strict=True)
            )
        set_mode(self.qmodel, "float")
        return d / len(self.batches)


def layer_sensitivity(
    qmodel: nn.Module,
    calib: Any,
    bits: list[int],
    weight_calibration: str = "mse",
    metric: str | None = None,
) -> dict[str, dict[int, float]]:
    """``{layer: {b: output distance}}`` with only that layer's weights at ``b`` bits.

    ``qmodel`` is a prepared (not yet calibrated) quantized model; it is left in float mode.
    ``calib`` is a tensor or an iterable of batches (a batch may be a tuple of inputs).
    """
    probe = _WeightProbe(qmodel, calib, weight_calibration, metric)
    return {name: {b: probe.distance({name: b}) for b in bits} for name in probe.layers}


def choose_bits(
    sensitivity: dict[str, dict[int, float]], numel: dict[str, int], budget_bits: float
) -> dict[str, int]:
    """The bits per layer with the least total sensitivity whose weights fit ``budget_bits``.

    Exact: minimises ``sum_l sensitivity[l][b_l]`` subject to ``sum_l numel[l] * b_l <=
    budget_bits`` (a multiple-choice knapsack), by dynamic programming over the layers,
    keeping only the Pareto-optimal (total bits, total sensitivity) partial choices that can
    still be completed within the budget. Assumes sensitivities add up across layers (as
    HAWQ does). Ties go to the choice with more bits.

    Raises :class:`ConfigError` when even the narrowest setting exceeds the budget.
    """
    names = list(sensitivity)
    narrowest = sum(numel[n] * min(sensitivity[n]) for n in names)
    if narrowest > budget_bits:
        raise ConfigError(
            f"impossible budget: {budget_bits / 8:,.0f} bytes of weights, but even the narrowest "
            f"bit widths need {narrowest / 8:,.0f} bytes"
        )
    # the least bits the layers after each position need (to prune partial choices)
    rest = np.cumsum([0] + [numel[n] * min(sensitivity[n]) for n in reversed(names)])[::-1][1:]
    totals = np.zeros(1, dtype=np.int64)  # Pareto front: total bits (ascending) ...
    sens = np.zeros(1)  # ... and total sensitivity (descending)
    trail: list[tuple[np.ndarray, np.ndarray]] = []  # per layer: (parent index, width)
    for n, need in zip(names, rest, strict=True):
        widths = np.array(sorted(sensitivity[n]), dtype=np.int64)
        values = np.array([sensitivity[n][int(b)] for b in widths])
        cand_totals = (totals[:, None] + numel[n] * widths[None, :]).ravel()
        cand_sens = (sens[:, None] + values[None, :]).ravel()
        parent = np.repeat(np.arange(len(totals)), len(widths))
        width = np.tile(widths, len(totals))
        ok = cand_totals + need <= budget_bits
        cand_totals, cand_sens, parent, width = (
            a[ok] for a in (cand_totals, cand_sens, parent, width)
        )
        # Pareto: ascending bits, ties broken by sensitivity; keep strict improvements
        order = np.lexsort((cand_sens, cand_totals))
        s_sorted = cand_sens[order]
        best_before = np.minimum.accumulate(np.concatenate([[np.inf], s_sorted[:-1]]))
        keep = order[s_sorted < best_before]
        totals, sens = cand_totals[keep], cand_sens[keep]
        trail.append((parent[keep], width[keep]))
    # least sensitivity; among equal ones the most bits (the front is sorted by bits)
    i = int(np.flatnonzero(sens == sens.min())[-1])
    bits: dict[str, int] = {}
    for n, (parent, width) in zip(reversed(names), reversed(trail), strict=True):
        bits[n] = int(width[i])
        i = int(parent[i])
    return {n: bits[n] for n in names}


def candidate_bits(
    sensitivity: dict[str, dict[int, float]], numel: dict[str, int], budget_bits: float
) -> list[dict[str, int]]:
    """:func:`choose_bits` for every sub-menu of the widths (each uniform width that fits is
    one), without duplicates: the allocations worth measuring jointly."""
    menu = sorted({b for s in sensitivity.values() for b in s})
    found: list[dict[str, int]] = []
    for k in range(1, len(menu) + 1):
        for sub in itertools.combinations(menu, k):
            restricted = {n: {b: s[b] for b in sub if b in s} for n, s in sensitivity.items()}
            if any(not s for s in restricted.values()):
                continue
            try:
                bits = choose_bits(restricted, numel, budget_bits)
            except ConfigError:
                continue
            if bits not in found:
                found.append(bits)
    return found


def mixed_precision_(model: nn.Module, cfg: MixedPrecision, ctx: Context) -> nn.Module:
    """Measure sensitivity, choose per-layer bits under the budget, quantize; return the model.

    The knapsack's additive model of the sensitivities underestimates how narrowed layers
    compound (a confident classifier's softmax hides small errors one at a time), so it is
    solved for every sub-menu of ``bits`` (uniform widths included) and the allocation whose
    *joint* output distance on the calibration data is smallest is kept.

    ``quant_info`` gains ``layer_bits``, ``sensitivity``, ``weight_bytes``, ``budget_bytes``
    and ``selection`` (candidates measured, the chosen one's distance, each uniform width's).
    """
    calib, filter_fn = ctx.calib, ctx.filter_fn
    if calib is None:
        raise ConfigError("MixedPrecision needs calibration data: calib=data.calib(256)")
    qprobe, _ = prepare(copy.deepcopy(model), Int8PTQ.shared_with(cfg), filter_fn)
    numel = {n: layer.weight.numel() for n, layer in quant_layers(qprobe).items()}
    budget_bits = (
        cfg.budget_bytes * 8 if cfg.budget_bytes is not None else cfg.avg_bits * sum(numel.values())
    )
    menu = sorted(set(cfg.bits))
    choose_bits({n: {menu[0]: 0.0} for n in numel}, numel, budget_bits)  # impossible? fail now
    probe = _WeightProbe(qprobe, calib, cfg.weight_calibration, cfg.metric)
    sens = {name: {b: probe.distance({name: b}) for b in menu} for name in probe.layers}
    measured = [(probe.distance(c), c) for c in candidate_bits(sens, numel, budget_bits)]
    distance, bits = min(measured, key=lambda t: t[0])
    qmodel = int8_ptq_(model, Int8PTQ.shared_with(cfg, layer_bits=bits), ctx)
    uniform = {str(c[next(iter(c))]): d for d, c in measured if len(set(c.values())) == 1}
    qmodel.quant_info.update(
        layer_bits=bits,
        sensitivity={n: {str(b): v for b, v in s.items()} for n, s in sens.items()},
        weight_bytes=sum(numel[n] * b for n, b in bits.items()) / 8,
        budget_bytes=budget_bits / 8,
        selection={"candidates": len(measured), "distance": distance, "uniform": uniform},
    )
    return qmodel


REGISTRY.register("mixed_precision", MixedPrecision, mixed_precision_, takes=("calib", "filter_fn"))
