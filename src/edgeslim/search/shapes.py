"""A candidate's fused layer shapes without building it: what makes screening cheap.

Building a candidate (structural pruning through the dependency graph, then quantization)
takes around a second; the latency predictor only needs the shapes of its units
(:func:`edgeslim.search.cost.layer_units`). :class:`ShapeModel` learns once, per model, how
each channel group's width reaches each unit -- by building the model with one group
narrowed at a time and seeing which units' input or output width changed -- and then writes
any channel candidate's units from the dense ones by arithmetic (a Linear after a flatten
scales its input with the group's width; a depthwise conv's groups follow its input).

It covers the ``keep`` and ``precision`` knobs; a candidate that changes anything else (low
rank, sparsity, per-layer bits) returns ``None`` and the caller builds it. The search uses it
to screen many proposals per generation; every recorded trial's cost is still predicted
from the built model (:func:`edgeslim.search.engine.search`), and a test checks the two agree.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import torch
from torch import nn

from edgeslim.search.cost import Unit, layer_units
from edgeslim.search.space import PRECISION_KNOB, BoundSpace

_NEUTRAL = {"rank": 1.0, "sparsity": 0.0}


class ShapeModel:
    """The units of any channel / precision candidate of ``model`` by arithmetic."""

    def __init__(
        self,
        model: nn.Module,
        space: BoundSpace,
        example: torch.Tensor,
        int8_dense: nn.Module | None = None,
    ) -> None:
        from edgeslim.search.apply import build

        self.space = space
        self.groups = {k: v["channels"] for k, v in space.info.items() if k.startswith("keep:")}
        self.dense = layer_units(model, example)
        self.int8 = layer_units(int8_dense, example) if int8_dense is not None else None
        if self.int8 is not None and [n for n, _ in self.int8] != [n for n, _ in self.dense]:
            self.int8 = None  # the quantized graph names its layers differently: build instead
        self.out_of: dict[str, str] = {}
        self.in_of: dict[str, str] = {}
        base = {name: u for name, u in self.dense}
        for knob in self.groups:
            menu = [float(v) for v in space.knobs[knob] if float(v) < 1]
            if not menu:
                continue
            probe = {**space.dense(), knob: min(menu)}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                units = layer_units(build(model, probe, example), example)
            for name, unit in units:
                ref = base.get(name)
                if ref is None:
                    continue
                if unit.out != ref.out:
                    self.out_of[name] = knob
                if _in_width(unit) != _in_width(ref):
                    self.in_of[name] = knob

    def units(self, candidate: dict[str, Any]) -> list[Unit] | None:
        """The candidate's units, or None when it changes more than channels and precision."""
        for knob, value in candidate.items():
            kind = knob.split(":", 1)[0]
            if kind in _NEUTRAL and value != _NEUTRAL[kind]:
                return None
            if kind == "bits":
                return None
        int8 = candidate.get(PRECISION_KNOB) == "int8"
        template = self.int8 if int8 else self.dense
        if template is None:
            return None
        out = []
        for name, unit in template:
            new_out, new_in = unit.out, _in_width(unit)
            if name in self.out_of:
                new_out = _width(self.groups[self.out_of[name]], candidate[self.out_of[name]])
            if name in self.in_of:
                knob = self.in_of[name]
                channels = self.groups[knob]
                kept = _width(channels, candidate[knob])
                new_in = _in_width(unit) // channels * kept
            out.append(_reshaped(unit, new_in, new_out))
        return out


def _width(channels: int, keep: Any) -> int:
    return max(1, round(channels * float(keep)))


def _in_width(unit: Unit) -> int:
    return unit.in_shape[0] if unit.op == "conv" else unit.in_shape[-1]


def _reshaped(unit: Unit, new_in: int, new_out: int) -> Unit:
    if unit.op == "conv":
        groups = unit.groups
        if groups > 1 and groups == unit.in_shape[0]:  # depthwise: groups follow the input
            groups = new_in
        shape = (new_in, *unit.in_shape[1:])
        return dataclasses.replace(unit, in_shape=shape, out=new_out, groups=groups)
    return dataclasses.replace(unit, in_shape=(*unit.in_shape[:-1], new_in), out=new_out)
