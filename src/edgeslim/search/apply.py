"""A candidate -> a compressed model, by calling the existing verbs in a fixed order.

1. channels: :class:`~edgeslim.prune.ChannelPrune` with ``layer_ratio`` = 1 - keep per
   coupled group (the dependency graph keeps the model consistent);
2. low rank: :class:`~edgeslim.lowrank.SVD` with a rank per Linear layer;
3. sparsity: :class:`~edgeslim.prune.MagnitudePrune` (``layer_sparsity``) and
   :class:`~edgeslim.prune.NMPrune` per pattern (masks: kept through fine-tuning);
4. weight bits: :class:`~edgeslim.quant.Int8PTQ` (graph mode where the model traces, as the
   C backend lowers it) with ``layer_bits`` -- after fine-tuning, on calibration inputs
   (:func:`quantize_candidate`); ``precision:model = "int8"``: the same, every layer 8-bit.
   Scales by MSE for weights and activations on :data:`CALIB_INPUTS` inputs (what a user's
   careful PTQ does); a model built only to be timed (``for_latency=True``) is quantized
   cheaply: its graph, not its scales, decides its latency.

Steps 1-3 are :func:`apply_structure_`; a layer factored in step 2 is not sparsified (its
two factors replace it).
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
from torch import nn

from edgeslim.core.errors import ConfigError

__all__ = ["CALIB_INPUTS", "apply_structure_", "build", "quantize_candidate", "split"]

CALIB_INPUTS = 256
"""Calibration inputs the search quantizes its candidates on (fewer when the data has fewer)."""

LATENCY_CALIB_INPUTS = 8
"""Inputs a model built only for timing is calibrated on (min-max scales)."""


def split(candidate: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{kind: {name: value}}`` of a candidate's knobs (keep, rank, sparsity, bits,
    precision)."""
    out: dict[str, dict[str, Any]] = {
        "keep": {},
        "rank": {},
        "sparsity": {},
        "bits": {},
        "precision": {},
    }
    for knob, value in candidate.items():
        kind, _, name = knob.partition(":")
        if kind not in out or not name:
            raise ConfigError(
                f"candidate knob {knob!r}: expected keep:|rank:|sparsity:|bits:|precision:NAME"
            )
        out[kind][name] = value
    return out


def apply_structure_(model: nn.Module, candidate: dict[str, Any], example: Any) -> dict[str, Any]:
    """Channels, low rank and sparsity of ``candidate`` applied to ``model`` in place."""
    from edgeslim.lowrank import SVD, lowrank_
    from edgeslim.prune import ChannelPrune, MagnitudePrune, NMPrune, prune_

    parts = split(candidate)
    log: dict[str, Any] = {}
    ratios = {g: round(1 - k, 6) for g, k in parts["keep"].items() if k < 1}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if ratios:
            cfg = ChannelPrune(layer_ratio=ratios, max_ratio=0.99)
            log["channel"] = prune_(model, cfg, example=example)["removed"]
        ranks = {}
        for name, frac in parts["rank"].items():
            if frac >= 1:
                continue
            layer = model.get_submodule(name)
            full = min(layer.in_features, layer.out_features)
            ranks[name] = max(1, round(full * frac))
        if ranks:
            keep = set(ranks)
            log["lowrank"] = lowrank_(
                model, SVD(rank=ranks), calib=example, filter_fn=lambda _m, n: n in keep
            )
        factored = set(log.get("lowrank", {}))
        floats = {
            n: float(s)
            for n, s in parts["sparsity"].items()
            if isinstance(s, float | int) and s > 0 and n not in factored
        }
        if floats:
            prune_(model, MagnitudePrune(layer_sparsity=floats), filter_fn=_only(floats))
        patterns: dict[str, list[str]] = {}
        for n, s in parts["sparsity"].items():
            if isinstance(s, str) and n not in factored:
                patterns.setdefault(s, []).append(n)
        for pattern, names in sorted(patterns.items()):
            n_, m_ = (int(v) for v in pattern.split(":"))
            prune_(model, NMPrune(n=n_, m=m_), filter_fn=_only(names))
    log["sparsity"] = {**floats, **{n: p for p, ns in patterns.items() for n in ns}}
    return log


def _only(names: Any):
    chosen = set(names)
    return lambda _m, n: n in chosen


def quantize_candidate(
    model: nn.Module,
    candidate: dict[str, Any],
    calib: torch.Tensor,
    *,
    for_latency: bool = False,
) -> nn.Module:
    """A quantized copy of ``model`` with the candidate's weight bits (8-bit activations,
    graph mode where the model traces); ``model`` itself when the candidate has no bits.

    Scales by MSE (weights and activations) on ``calib``; with ``for_latency`` (a model
    that is only timed or costed) min-max on the first :data:`LATENCY_CALIB_INPUTS`."""
    from edgeslim.prune import remove_masks_
    from edgeslim.quant import Int8PTQ, quantize

    parts = split(candidate)
    bits = parts["bits"]
    int8 = "int8" in parts["precision"].values()
    if not bits and not int8:
        return model
    table: dict[str, int] = {}
    modules = dict(model.named_modules())
    for name, b in bits.items():
        if isinstance(modules.get(name), nn.Conv2d | nn.Linear):
            table[name] = int(b)
        else:  # factored by low rank: its two factors
            table[f"{name}.*"] = int(b)
    remove_masks_(model)  # zeros stay zeros; the quantizer reads plain weights
    # graph mode where the model traces (what the int8 graph of the C backend lowers)
    if for_latency:
        cfg = Int8PTQ(graph="auto", layer_bits=table)
        calib = calib[:LATENCY_CALIB_INPUTS]
    else:
        cfg = Int8PTQ(graph="auto", layer_bits=table, calibration="mse", weight_calibration="mse")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return quantize(model, cfg, calib=calib)


def build(
    model: nn.Module,
    candidate: dict[str, Any],
    example: Any,
    calib: torch.Tensor | None = None,
    *,
    for_latency: bool = False,
) -> nn.Module:
    """A compressed copy of ``model`` (``model`` untouched); quantized when ``calib`` is given
    (cheaply with ``for_latency``: see :func:`quantize_candidate`)."""
    out = copy.deepcopy(model).eval()
    apply_structure_(out, candidate, example)
    if calib is not None:
        out = quantize_candidate(out, candidate, calib, for_latency=for_latency)
    return out
