"""A candidate -> a compressed model, by calling the existing verbs in a fixed order.

1. channels: :class:`~edgeslim.prune.ChannelPrune` with ``layer_ratio`` = 1 - keep per
   coupled group (the dependency graph keeps the model consistent);
2. low rank: :class:`~edgeslim.lowrank.SVD` with a rank per Linear layer;
3. sparsity: :class:`~edgeslim.prune.MagnitudePrune` (``layer_sparsity``) and
   :class:`~edgeslim.prune.NMPrune` per pattern (masks: kept through fine-tuning);
4. weight bits: :class:`~edgeslim.quant.Int8PTQ` (graph mode where the model traces, as the
   C backend lowers it) with ``layer_bits`` -- after fine-tuning, on calibration inputs
   (:func:`quantize_candidate`); ``precision:model = "int8"``: the same, every layer 8-bit.

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

__all__ = ["apply_structure_", "build", "quantize_candidate", "split"]


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
    model: nn.Module, candidate: dict[str, Any], calib: torch.Tensor
) -> nn.Module:
    """A quantized copy of ``model`` with the candidate's weight bits (8-bit activations,
    graph mode where the model traces); ``model`` itself when the candidate has no bits."""
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
    cfg = Int8PTQ(graph="auto", layer_bits=table, weight_calibration="mse")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return quantize(model, cfg, calib=calib)


def build(
    model: nn.Module,
    candidate: dict[str, Any],
    example: Any,
    calib: torch.Tensor | None = None,
) -> nn.Module:
    """A compressed copy of ``model`` (``model`` untouched); quantized when ``calib`` is given."""
    out = copy.deepcopy(model).eval()
    apply_structure_(out, candidate, example)
    if calib is not None:
        out = quantize_candidate(out, candidate, calib)
    return out
