"""Where the int8 qparams of every tensor come from: a :class:`QParamSource`.

- a model quantized by :func:`edgeslim.quantize_` (PTQ or QAT, graph mode) carries them:
  :class:`QuantizedModelQParams` reads its quantizers (``ActQuant``: scale / zero point of
  every tensor); its layers' frozen integer weights and biases are read by
  :func:`.fuse.fuse`, so the graph computes exactly what the quantized model simulates;
- a float model is calibrated (:class:`CalibratedQParams`): :func:`calibrate_ranges` runs
  calibration inputs through it (:func:`edgeslim.core.hooks.run_calibration`) with a
  min-max :class:`~edgeslim.quant.observers.Observer` on every tensor, which then gets
  TFLite's min-max qparams (:func:`edgeslim.quant.spec.activation_qparams`); weights get
  max |w| / 127, per output channel -- except a layer whose weights are k-means shared
  (:mod:`edgeslim.share.kmeans`): one scale for the whole tensor (repeated per channel), so
  its ``<= 2**bits`` shared values stay ``<= 2**bits`` distinct int8 codes, which the C
  backend stores as a value table and packed indices.
"""

from __future__ import annotations

import copy
import operator
from typing import Any, Protocol

import numpy as np
import torch
from torch import fx, nn

from edgeslim.core.errors import LoweringError
from edgeslim.core.fxpatterns import activation, called_module
from edgeslim.core.hooks import run_calibration
from edgeslim.core.models.storage import CODES_SUFFIX
from edgeslim.export.int8 import trace_seq
from edgeslim.export.int8.trace import FloatOp, shape_of
from edgeslim.quant import spec
from edgeslim.quant.modules import ActQuant
from edgeslim.quant.observers import Observer


class QParamSource(Protocol):
    """Where the int8 qparams of each tensor come from."""

    def activation(self, value: str) -> spec.QParams:
        """Per-tensor qparams of the fx value ``value`` (an op's output or the input)."""

    def weight(self, op: FloatOp, weight: np.ndarray, axis: int | None) -> spec.QParams:
        """Symmetric qparams of ``op``'s (folded, float) weight; per channel along ``axis``."""


class CalibratedQParams:
    """Interim qparam source: min-max ranges of every tensor over calibration inputs.

    Activations get :func:`~edgeslim.quant.spec.activation_qparams` of their observed range,
    weights :func:`~edgeslim.quant.spec.weight_qparams` (max |w| / 127).
    """

    def __init__(self, ranges: dict[str, tuple[float, float]]) -> None:
        self.ranges = ranges

    def activation(self, value: str) -> spec.QParams:
        lo, hi = self.ranges[value]
        return spec.activation_qparams(lo, hi)

    def weight(self, op: FloatOp, weight: np.ndarray, axis: int | None) -> spec.QParams:
        if axis is not None and is_shared(op.module):
            one = spec.weight_qparams(weight, axis=None)
            n = weight.shape[axis]
            return spec.QParams(
                np.repeat(one.scale, n), np.zeros(n, np.int64), one.qmin, one.qmax, axis
            )
        return spec.weight_qparams(weight, axis=axis)


def is_shared(module: nn.Module | None) -> bool:
    """Are ``module``'s weights k-means shared (codes + centroids, :mod:`edgeslim.share`)?"""
    return module is not None and getattr(module, "weight" + CODES_SUFFIX, None) is not None


class QuantizedModelQParams:
    """Qparams of a model quantized by :func:`edgeslim.quantize_` (graph mode).

    Every tensor's qparams are those of the ``ActQuant`` that quantizes it: the quantizer
    node after a layer (and its fused activation) or an add; the graph input's are the
    input quantizer of the first layer that reads it. Weights come from the layers' frozen
    integer buffers (read by :func:`.fuse.fuse`), so :meth:`weight` is not used.
    """

    def __init__(self, gm: fx.GraphModule) -> None:
        modules = dict(gm.named_modules())
        self.qparams: dict[str, spec.QParams] = {}
        for node in gm.graph.nodes:
            module = called_module(node, modules)
            if isinstance(module, ActQuant):
                self.qparams[node.name] = module.qparams()
                src = node.args[0]  # the layer / activation / add it quantizes
                while isinstance(src, fx.Node) and src.name not in self.qparams:
                    self.qparams[src.name] = module.qparams()
                    fused = src.op == "call_module" and activation(src, modules, hardtanh=True)
                    # through a fused activation module, or a layout op (permute, reshape)
                    fused = fused or trace_seq.moves_only(src)
                    src = src.args[0] if fused else None
            elif node.op == "placeholder":
                layer = _first_layer(node, modules)
                if layer is not None:
                    self.qparams[node.name] = layer.input_quant.qparams()
            elif _is_cat(node) and node.name not in self.qparams:
                self._cat(node)

    def _cat(self, node: fx.Node) -> None:
        """A cat no quantizer follows: the qparams of the union of its inputs' ranges.

        Every input is exactly representable on them (no clipping), which is what the
        quantized model computes (a cat of int8 values, left as they are).
        """
        parts = [self._through_views(x) for x in node.args[0] if isinstance(x, fx.Node)]
        if not parts or any(p is None for p in parts):
            return  # activation() names the tensor
        first = parts[0]
        if all(
            np.array_equal(p.scale, first.scale) and np.array_equal(p.zero_point, first.zero_point)
            for p in parts
        ):
            self.qparams[node.name] = first
            return
        lo = min(float(p.scale[0]) * (p.qmin - int(p.zero_point[0])) for p in parts)
        hi = max(float(p.scale[0]) * (p.qmax - int(p.zero_point[0])) for p in parts)
        self.qparams[node.name] = spec.activation_qparams(lo, hi)

    def _through_views(self, node: fx.Node) -> spec.QParams | None:
        """``node``'s qparams, found through ops that only select or move values of a
        quantized tensor (chunk / split and their items, reshape, transpose: ShuffleNet's
        channel split of the last unit's shuffled output); each gets its source's."""
        walked, src = [], node
        while src.name not in self.qparams and _selects_or_moves(src):
            walked.append(src)
            src = src.args[0]
            if not isinstance(src, fx.Node):
                return None
        found = self.qparams.get(src.name)
        if found is not None:
            for n in walked:
                self.qparams[n.name] = found
        return found

    def activation(self, value: str) -> spec.QParams:
        if value not in self.qparams:
            raise LoweringError(
                f"{value}: no quantizer gives this tensor int8 qparams (a layer left in float, "
                "or an op the quantizer does not cover)"
            )
        return self.qparams[value]

    def weight(self, op: FloatOp, weight: np.ndarray, axis: int | None) -> spec.QParams:
        raise LoweringError(f"{op.name}: a float layer inside a quantized model")


def _selects_or_moves(node: fx.Node) -> bool:
    """Does ``node`` only pick or move its first input's values (chunk, split, an item of
    their result, or a layout op)?"""
    if node.op == "call_function" and node.target is operator.getitem:
        return True
    if node.op == "call_method" and node.target in ("chunk", "split"):
        return True
    if node.op == "call_function" and node.target in (torch.chunk, torch.split):
        return True
    return trace_seq.moves_only(node)


def _is_cat(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in (torch.cat, torch.concat)


def _first_layer(node: fx.Node, modules: dict[str, nn.Module]) -> nn.Module | None:
    """The first quantized layer reading ``node``, through qparam-preserving ops."""
    for user in node.users:
        module = called_module(user, modules)
        if module is not None and hasattr(module, "input_quant"):
            return module
        found = _first_layer(user, modules)
        if found is not None:
            return found
    return None


class _Probe(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def calibrate_ranges(
    gm: fx.GraphModule, calib: torch.Tensor | tuple[torch.Tensor, ...], batch_size: int = 64
) -> dict[str, tuple[float, float]]:
    """``(min, max)`` of every tensor value of ``gm`` over the calibration inputs ``calib``
    (a batch, or a tuple of batches for a model with several inputs)."""
    probed = copy.deepcopy(gm)
    graph = probed.graph
    probes: dict[str, nn.Module] = {}
    for node in list(graph.nodes):
        if node.op == "output" or shape_of(node) is None:
            continue
        name = f"_probe_{node.name}"
        probed.add_submodule(name, _Probe())
        with graph.inserting_after(node):
            probe = graph.call_module(name, (node,))
        node.replace_all_uses_with(probe)
        probe.args = (node,)
        probes[node.name] = probed.get_submodule(name)
    probed.recompile()
    observers = {name: Observer("minmax") for name in probes}

    def see(name: str, module: nn.Module, inputs: tuple, output: Any) -> None:
        observers[name].update(inputs[0])

    if isinstance(calib, (tuple, list)):  # several inputs: batches of tuples, model(*batch)
        xs = tuple(calib)
        calib = [tuple(x[i : i + batch_size] for x in xs) for i in range(0, len(xs[0]), batch_size)]
    run_calibration(probed, calib, probes, see, batch_size=batch_size)
    return {name: obs.range() for name, obs in observers.items() if obs.seen}
