"""Lower a PyTorch model to the integer graph (:class:`.ir.Graph`).

Three steps, each a function:

1. :func:`float_ops` traces the model with ``torch.fx`` (shapes from one example) and
   classifies every node as one of the float ops edgeslim can lower; every node it cannot
   is collected and *all* of them are named in one :class:`LoweringError`, before anything
   is written.
2. :func:`fuse` folds BatchNorm into the conv / linear before it
   (``torch.nn.utils.fusion``), fuses ReLU / ReLU6 into the op that produces their input
   and zero padding (``nn.ZeroPad2d``) into the conv that consumes it.
3. :func:`build_graph` quantizes: qparams of each tensor from a :class:`QParamSource`, int8
   weights per output channel (per tensor for fully connected layers, TFLite's default),
   int32 biases, and converts NCHW to TFLite's NHWC (a flatten that feeds a linear layer
   permutes that layer's weight columns instead of the data).

Where qparams come from is a :class:`QParamSource`:

- a model quantized by :func:`edgeslim.quantize_` (PTQ or QAT, graph mode) carries them:
  :class:`QuantizedModelQParams` reads its quantizers (``ActQuant``: scale / zero point of
  every tensor) and its layers' frozen integer weights and biases, so the graph computes
  exactly what the quantized model simulates;
- a float model is calibrated here (:class:`CalibratedQParams`): calibration inputs run
  through it (:func:`edgeslim.core.hooks.run_calibration`) and every tensor gets TFLite's
  min-max qparams (:func:`edgeslim.quant.spec.activation_qparams`), weights max |w| / 127.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn.utils.fusion import fuse_conv_bn_weights, fuse_linear_bn_weights

from edgeslim.core.errors import LoweringError, ShapeError
from edgeslim.core.hooks import run_calibration
from edgeslim.export.c import ir
from edgeslim.quant import spec
from edgeslim.quant.modules import ActQuant, QuantAdd, QuantAvgPool, QuantModule

SUPPORTED = (
    "Conv2d (groups 1 or depthwise), Linear, BatchNorm after either, ReLU / ReLU6 after "
    "conv / linear / add, add of two tensors, MaxPool2d, AvgPool2d, AdaptiveAvgPool2d(1), "
    "mean over H and W, flatten, cat, softmax, ZeroPad2d before a conv, Identity / Dropout"
)

_LEAVES = (
    nn.Conv2d,
    nn.Linear,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.ReLU,
    nn.ReLU6,
    nn.Hardtanh,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.Flatten,
    nn.Softmax,
    nn.Identity,
    nn.Dropout,
    nn.ZeroPad2d,
    nn.ConstantPad2d,
)


# --------------------------------------------------------------------------------------
# 1. trace and classify
# --------------------------------------------------------------------------------------


@dataclass
class FloatOp:
    """One float op of the traced model.

    ``value`` names the fx node whose output this op produces (after fusion: the last fused
    node, e.g. the ReLU); ``inputs`` are the values it reads. ``shape`` is PyTorch's output
    shape at batch 1 (NCHW or (1, F)).
    """

    kind: str  # conv linear bn act add cat flatten pool gap softmax pad
    name: str
    value: str
    inputs: list[str]
    shape: tuple[int, ...]
    module: nn.Module | None = None
    attrs: dict[str, Any] = field(default_factory=dict)


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (*_LEAVES, QuantModule)) or super().is_leaf_module(m, qualname)


def trace(model: nn.Module, example: torch.Tensor) -> fx.GraphModule:
    """``torch.fx`` trace of ``model`` with every node's output shape (from ``example[:1]``)."""
    name = type(model).__name__
    try:
        graph = _Tracer().trace(model)
    except Exception as exc:  # fx raises many types; all mean "cannot trace"
        raise LoweringError(
            f"cannot trace {name} with torch.fx (data-dependent control flow?): "
            f"{str(exc).strip().splitlines()[0]}"
        ) from exc
    gm = fx.GraphModule(model, graph, name)
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(example[:1])
    except RuntimeError as exc:
        raise ShapeError(
            f"{name} cannot run on input of shape {tuple(example.shape)}: "
            f"{str(exc).strip().splitlines()[0]}"
        ) from exc
    return gm


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _arg(node: fx.Node, index: int, key: str, default: Any) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(key, default)


def float_ops(gm: fx.GraphModule) -> tuple[list[FloatOp], str, str]:
    """Classify the traced graph: ``(ops, input value, output value)``.

    Raises :class:`LoweringError` naming every node that cannot be lowered.
    """
    modules = dict(gm.named_modules())
    alias: dict[str, str] = {}  # identity-like node -> the value it passes on
    ops: list[FloatOp] = []
    problems: list[str] = []
    inputs: list[str] = []
    output = ""

    def value(arg: object) -> str:
        if not isinstance(arg, fx.Node):
            raise TypeError
        return alias.get(arg.name, arg.name)

    for node in gm.graph.nodes:
        if node.op == "placeholder":
            inputs.append(node.name)
            continue
        if node.op == "output":
            out = node.args[0]
            if not isinstance(out, fx.Node):
                problems.append(f"output: the model must return one tensor, got {out!r}")
            else:
                output = value(out)
            continue
        shape = _shape(node)
        if shape is None:  # x.size(0) and other non-tensor values: used only as arguments
            continue
        module = modules.get(node.target) if node.op == "call_module" else None
        where = node.target if node.op == "call_module" else node.name
        try:
            op = _classify(node, module, shape, value)
        except (TypeError, ValueError) as exc:
            detail = str(exc) or "unsupported arguments"
            problems.append(f"{where} ({_describe(node, module)}): {detail}")
            continue
        if op is None:
            problems.append(f"{where} ({_describe(node, module)}): not supported")
        elif op == "alias":
            alias[node.name] = value(node.args[0])
        else:
            op.name = str(where)
            ops.append(op)
    if len(inputs) != 1:
        problems.append(f"the model must take exactly one tensor input, it takes {len(inputs)}")
    if problems:
        raise LoweringError(
            "cannot lower to the int8 graph; unsupported:\n  "
            + "\n  ".join(problems)
            + f"\nsupported: {SUPPORTED}"
        )
    return ops, inputs[0], output


def _describe(node: fx.Node, module: nn.Module | None) -> str:
    if module is not None:
        return type(module).__name__
    target = node.target
    return getattr(target, "__name__", str(target))


_RELU_FUNCS = {torch.relu, F.relu, torch.relu_}
_ADD_FUNCS = {operator.add, operator.iadd, torch.add}


def _classify(
    node: fx.Node, module: nn.Module | None, shape: tuple[int, ...], value: Callable
) -> FloatOp | str | None:
    """A :class:`FloatOp`, ``"alias"`` for pass-through nodes, or None if unsupported."""

    def op(kind: str, inputs: list[str], **attrs: Any) -> FloatOp:
        return FloatOp(kind, "", node.name, inputs, shape, module, attrs)

    first = node.args[0] if node.args else None
    if module is not None:
        x = [value(first)]
        if isinstance(module, (nn.Identity, nn.Dropout)):
            return "alias"
        if isinstance(module, ActQuant):
            return op("quant", x)
        if isinstance(module, QuantAdd):
            return _add(op, node, value)
        if isinstance(module, QuantAvgPool):
            if not isinstance(module.pool, nn.AdaptiveAvgPool2d):
                raise ValueError(f"only global average pooling is supported, got {module.pool}")
            return op("gap", x)
        if isinstance(module, nn.Conv2d):
            _check_conv(module)
            return op("conv", x)
        if isinstance(module, nn.Linear):
            return op("linear", x)
        if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            return op("bn", x)
        if isinstance(module, nn.ReLU):
            return op("act", x, activation="relu")
        if isinstance(module, (nn.ReLU6, nn.Hardtanh)):
            if (module.min_val, module.max_val) != (0.0, 6.0):
                raise ValueError("only Hardtanh(0, 6) (ReLU6) is supported")
            return op("act", x, activation="relu6")
        if isinstance(module, nn.MaxPool2d):
            return _pool(
                op,
                x,
                "max",
                module.kernel_size,
                module.stride,
                module.padding,
                module.dilation,
                module.ceil_mode,
            )
        if isinstance(module, nn.AvgPool2d):
            if module.divisor_override is not None:
                raise ValueError("divisor_override is not supported")
            return _pool(
                op,
                x,
                "avg",
                module.kernel_size,
                module.stride,
                module.padding,
                1,
                module.ceil_mode,
                module.count_include_pad,
            )
        if isinstance(module, nn.AdaptiveAvgPool2d):
            if _pair(module.output_size) != (1, 1):
                raise ValueError("only output size 1 (global average pooling) is supported")
            return op("gap", x)
        if isinstance(module, nn.Flatten):
            if module.start_dim != 1 or module.end_dim != -1:
                raise ValueError("only Flatten(1, -1) is supported")
            return op("flatten", x)
        if isinstance(module, nn.Softmax):
            return op("softmax", x, dim=module.dim)
        if isinstance(module, (nn.ZeroPad2d, nn.ConstantPad2d)):
            if isinstance(module, nn.ConstantPad2d) and module.value != 0:
                raise ValueError("only zero padding is supported")
            return op("pad", x, pad=tuple(module.padding))
        return None
    target = node.target
    if node.op == "call_function":
        if target in _RELU_FUNCS:
            return op("act", [value(first)], activation="relu")
        if target is F.relu6:
            return op("act", [value(first)], activation="relu6")
        if target is F.hardtanh:
            if (_arg(node, 1, "min_val", -1.0), _arg(node, 2, "max_val", 1.0)) != (0.0, 6.0):
                raise ValueError("only hardtanh(0, 6) (ReLU6) is supported")
            return op("act", [value(first)], activation="relu6")
        if target in _ADD_FUNCS:
            return _add(op, node, value)
        if target is torch.flatten:
            return _flatten(op, node, shape, value)
        if target is torch.cat:
            tensors = _arg(node, 0, "tensors", None)
            return op("cat", [value(t) for t in tensors], dim=_arg(node, 1, "dim", 0))
        if target in (F.softmax, torch.softmax):
            return op("softmax", [value(first)], dim=_arg(node, 1, "dim", None))
        if target is F.adaptive_avg_pool2d:
            if _pair(_arg(node, 1, "output_size", None)) != (1, 1):
                raise ValueError("only output size 1 (global average pooling) is supported")
            return op("gap", [value(first)])
        if target in _POOL_FUNCS:
            return _pool_function(op, node, value)
        if target is F.pad:
            if _arg(node, 2, "mode", "constant") != "constant" or _arg(node, 3, "value", 0):
                raise ValueError("only constant zero padding is supported")
            return op("pad", [value(first)], pad=tuple(_arg(node, 1, "pad", ())))
        if target is torch.mean:
            return _mean(op, node, value)
        return None
    if node.op == "call_method":
        if target in ("relu", "relu_"):
            return op("act", [value(first)], activation="relu")
        if target in ("add", "add_"):
            return _add(op, node, value)
        if target == "contiguous":
            return "alias"
        if target in ("view", "reshape", "flatten"):
            return _flatten(op, node, shape, value)
        if target == "mean":
            return _mean(op, node, value)
        return None
    return None


def _pool(op, x, mode, kernel, stride, padding, dilation, ceil_mode, count_include_pad=False):
    if _pair(dilation) != (1, 1) or ceil_mode:
        raise ValueError("dilation and ceil_mode are not supported")
    padding = _pair(padding)
    if mode == "avg" and count_include_pad and padding != (0, 0):
        raise ValueError("average pooling with padding must use count_include_pad=False")
    stride = _pair(stride if stride is not None else kernel)
    return op("pool", x, mode=mode, kernel=_pair(kernel), stride=stride, padding=padding)


# F.max_pool2d / F.avg_pool2d: the mode, then their arguments after the input, in order
_POOL_FUNCS = {
    F.max_pool2d: ("max", ("kernel_size", "stride", "padding", "dilation", "ceil_mode")),
    F.avg_pool2d: (
        "avg",
        ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"),
    ),
}
_POOL_DEFAULTS = {
    "stride": None,
    "padding": 0,
    "dilation": 1,
    "ceil_mode": False,
    "count_include_pad": True,
    "divisor_override": None,
}


def _pool_function(op, node: fx.Node, value: Callable) -> FloatOp:
    mode, names = _POOL_FUNCS[node.target]
    a = {n: _arg(node, i + 1, n, _POOL_DEFAULTS.get(n)) for i, n in enumerate(names)}
    if a.get("divisor_override") is not None:
        raise ValueError("divisor_override is not supported")
    k = a["kernel_size"]
    x = [value(node.args[0])]
    return _pool(
        op,
        x,
        mode,
        k,
        a["stride"] or k,
        a["padding"],
        a.get("dilation", 1),
        a["ceil_mode"],
        a.get("count_include_pad", False),
    )


def _add(op, node: fx.Node, value: Callable) -> FloatOp:
    a, b = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        raise ValueError("only the sum of two tensors is supported (not tensor + constant)")
    if _arg(node, 2, "alpha", 1) != 1 or _shape(a) != _shape(b):
        raise ValueError("only the sum of two tensors of the same shape is supported")
    return op("add", [value(a), value(b)])


def _flatten(op, node: fx.Node, shape: tuple[int, ...], value: Callable) -> FloatOp:
    src = _shape(node.args[0])
    if len(shape) != 2 or src is None or shape[0] != src[0]:
        raise ValueError(f"only flattening to (batch, features) is supported, got {shape}")
    return op("flatten", [value(node.args[0])])


def _mean(op, node: fx.Node, value: Callable) -> FloatOp:
    dims = _arg(node, 1, "dim", None)
    dims = {int(d) % 4 for d in (dims if isinstance(dims, (tuple, list)) else [dims])}
    if dims != {2, 3}:
        raise ValueError("only the mean over H and W of an NCHW tensor is supported")
    keepdim = bool(_arg(node, 2, "keepdim", False))
    return op("gap", [value(node.args[0])], keepdim=keepdim)


# --------------------------------------------------------------------------------------
# 2. fuse: BatchNorm folding, activation fusion, padding into conv
# --------------------------------------------------------------------------------------


def fuse(ops: list[FloatOp]) -> list[FloatOp]:
    """Fold BatchNorm, fuse activations and zero padding; refuse what is left over.

    Conv / linear ops get ``attrs["weight"]`` / ``attrs["bias"]`` (float64 numpy, folded).
    """
    for o in ops:
        if o.kind not in ("conv", "linear"):
            continue
        if o.kind == "conv":
            o.attrs["padding"] = _conv_padding(o.module)
        if hasattr(o.module, "weight_int8"):
            _read_quantized_layer(o)
        else:
            o.attrs["weight"] = o.module.weight.detach().double().numpy().copy()
            bias = o.module.bias
            o.attrs["bias"] = (
                np.zeros(o.module.weight.shape[0])
                if bias is None
                else bias.detach().double().numpy().copy()
            )
    uses = _use_counts(ops)
    producers = {o.value: o for o in ops}
    kept: list[FloatOp] = []
    problems: list[str] = []
    for o in ops:
        src = producers.get(o.inputs[0]) if o.inputs else None
        sole = src is not None and uses[src.value] == 1
        if o.kind == "bn":
            if src is not None and "weight_int" in src.attrs:
                problems.append(f"{o.name}: BatchNorm after a quantized layer (fold it first)")
                continue
            if not (sole and src.kind in ("conv", "linear") and "activation" not in src.attrs):
                problems.append(f"{o.name}: BatchNorm must directly follow a conv or linear")
                continue
            _fold_bn(src, o.module)
            _rename(src, o, producers)
        elif o.kind == "act":
            if not (sole and src.kind in ("conv", "linear", "add")):
                problems.append(f"{o.name}: ReLU/ReLU6 must directly follow a conv, linear or add")
                continue
            if "activation" in src.attrs:
                problems.append(f"{o.name}: two activations in a row")
                continue
            src.attrs["activation"] = o.attrs["activation"]
            _rename(src, o, producers)
        else:
            kept.append(o)
    # zero padding folds into the conv that reads it
    uses = _use_counts(kept)
    pads = {o.value: o for o in kept if o.kind == "pad"}
    for o in kept:
        if o.kind == "conv" and o.inputs[0] in pads and uses[o.inputs[0]] == 1:
            pad = pads.pop(o.inputs[0])
            if len(pad.attrs["pad"]) != 4:
                problems.append(f"{pad.name}: padding must give (left, right, top, bottom)")
                continue
            left, right, top, bottom = pad.attrs["pad"]
            t, lft, b, r = o.attrs["padding"]
            o.attrs["padding"] = (t + top, lft + left, b + bottom, r + right)
            o.inputs = list(pad.inputs)
    problems += [f"{p.name}: zero padding must be read only by a conv" for p in pads.values()]
    if problems:
        raise LoweringError("cannot lower to the int8 graph:\n  " + "\n  ".join(problems))
    return [o for o in kept if o.kind != "pad"]


def _read_quantized_layer(o: FloatOp) -> None:
    """The frozen integer form of a quantized conv / linear (``edgeslim.quant`` modules)."""
    layer = o.module
    if layer.input_quant.dynamic or not layer.has_output or layer.input_quant.bits != 8:
        raise LoweringError(
            f"{o.name}: quantized layer without a static int8 output (dynamic or float "
            "output, or activations not 8-bit); quantize with Int8PTQ in graph mode"
        )
    layer.freeze()
    o.attrs["weight_int"] = layer.weight_int8.numpy().astype(np.int64)
    o.attrs["weight_scale"] = layer.weight_scale.detach().double().numpy().copy()
    c = layer.weight_int8.shape[0]
    bias = layer.bias_int32.numpy().astype(np.int64) if layer.bias is not None else np.zeros(c)
    o.attrs["bias_int"] = bias.astype(np.int64)
    o.attrs["bias"] = np.zeros(c)  # unused: the integer bias is taken as it is


def _use_counts(ops: list[FloatOp]) -> dict[str, int]:
    uses: dict[str, int] = {}
    for o in ops:
        for name in o.inputs:
            uses[name] = uses.get(name, 0) + 1
    return uses


def _rename(src: FloatOp, fused: FloatOp, producers: dict[str, FloatOp]) -> None:
    """``src`` now produces what ``fused`` produced (its value, shape)."""
    del producers[src.value]
    src.value = fused.value
    src.shape = fused.shape
    producers[src.value] = src


def _check_conv(conv: nn.Conv2d) -> None:
    """Raise ValueError for conv settings the int8 graph does not support."""
    if conv.padding_mode != "zeros":
        raise ValueError(f"padding_mode {conv.padding_mode!r} is not supported")
    if _pair(conv.dilation) != (1, 1):
        raise ValueError("dilation is not supported")
    cin, groups = conv.in_channels, conv.groups
    if groups != 1 and not (groups == cin and conv.out_channels % cin == 0):
        raise ValueError(f"grouped conv with groups={groups} is not supported (1 or depthwise)")


def _conv_padding(conv: nn.Conv2d) -> tuple[int, int, int, int]:
    """``(top, left, bottom, right)`` of a conv."""
    if conv.padding == "valid":
        return (0, 0, 0, 0)
    if conv.padding == "same":  # PyTorch: the extra row/column (even kernels) goes at the end
        kh, kw = _pair(conv.kernel_size)
        return ((kh - 1) // 2, (kw - 1) // 2, kh // 2, kw // 2)
    ph, pw = _pair(conv.padding)
    return (ph, pw, ph, pw)


def _fold_bn(o: FloatOp, bn: nn.Module) -> None:
    w = torch.from_numpy(o.attrs["weight"])
    b = torch.from_numpy(o.attrs["bias"])
    stats = (bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
    stats = tuple(s.double() if isinstance(s, torch.Tensor) else s for s in stats)
    with torch.no_grad():
        if o.kind == "conv":
            fw, fb = fuse_conv_bn_weights(w, b, *stats)
        else:
            fw, fb = fuse_linear_bn_weights(w, b, *stats)
    o.attrs["weight"] = fw.detach().numpy().copy()
    o.attrs["bias"] = fb.detach().numpy().copy()


# --------------------------------------------------------------------------------------
# 3. quantize and build the integer graph
# --------------------------------------------------------------------------------------


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
        return spec.weight_qparams(weight, axis=axis)


class QuantizedModelQParams:
    """Qparams of a model quantized by :func:`edgeslim.quantize_` (graph mode).

    Every tensor's qparams are those of the ``ActQuant`` that quantizes it: the quantizer
    node after a layer (and its fused activation) or an add; the graph input's are the
    input quantizer of the first layer that reads it. Weights come from the layers' frozen
    integer buffers (see :func:`_read_quantized_layer`), so :meth:`weight` is not used.
    """

    def __init__(self, gm: fx.GraphModule) -> None:
        modules = dict(gm.named_modules())
        self.qparams: dict[str, spec.QParams] = {}
        for node in gm.graph.nodes:
            module = modules.get(node.target) if node.op == "call_module" else None
            if isinstance(module, ActQuant):
                self.qparams[node.name] = module.qparams()
                src = node.args[0]  # the layer / activation / add it quantizes
                while isinstance(src, fx.Node) and src.name not in self.qparams:
                    self.qparams[src.name] = module.qparams()
                    src = src.args[0] if src.op == "call_module" and _is_act(modules, src) else None
            elif node.op == "placeholder":
                layer = _first_layer(node, modules)
                if layer is not None:
                    self.qparams[node.name] = layer.input_quant.qparams()

    def activation(self, value: str) -> spec.QParams:
        if value not in self.qparams:
            raise LoweringError(
                f"{value}: no quantizer gives this tensor int8 qparams (a layer left in float, "
                "or an op the quantizer does not cover)"
            )
        return self.qparams[value]

    def weight(self, op: FloatOp, weight: np.ndarray, axis: int | None) -> spec.QParams:
        raise LoweringError(f"{op.name}: a float layer inside a quantized model")


def _is_act(modules: dict[str, nn.Module], node: fx.Node) -> bool:
    return isinstance(modules.get(node.target), (nn.ReLU, nn.ReLU6, nn.Hardtanh))


def _first_layer(node: fx.Node, modules: dict[str, nn.Module]) -> nn.Module | None:
    """The first quantized layer reading ``node``, through qparam-preserving ops."""
    for user in node.users:
        module = modules.get(user.target) if user.op == "call_module" else None
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
    gm: fx.GraphModule, calib: torch.Tensor, batch_size: int = 64
) -> dict[str, tuple[float, float]]:
    """``(min, max)`` of every tensor value of ``gm`` over the calibration inputs ``calib``."""
    probed = copy.deepcopy(gm)
    graph = probed.graph
    probes: dict[str, nn.Module] = {}
    for node in list(graph.nodes):
        if node.op == "output" or _shape(node) is None:
            continue
        name = f"_probe_{node.name}"
        probed.add_submodule(name, _Probe())
        with graph.inserting_after(node):
            probe = graph.call_module(name, (node,))
        node.replace_all_uses_with(probe)
        probe.args = (node,)
        probes[node.name] = probed.get_submodule(name)
    probed.recompile()
    ranges: dict[str, tuple[float, float]] = {}

    def see(name: str, module: nn.Module, inputs: tuple, output: Any) -> None:
        x = inputs[0].detach()
        lo, hi = float(x.min()), float(x.max())
        old = ranges.get(name)
        ranges[name] = (lo, hi) if old is None else (min(old[0], lo), max(old[1], hi))

    run_calibration(probed, calib, probes, see, batch_size=batch_size)
    return ranges


@dataclass
class _Value:
    """An IR tensor and how the PyTorch value maps onto it."""

    tensor: str
    torch_shape: tuple[int, ...]
    nchw_flatten: tuple[int, int, int] | None = None  # (C, H, W) of a flattened feature map


def _nhwc(shape: tuple[int, ...]) -> tuple[int, ...]:
    if len(shape) == 4:
        n, c, h, w = shape
        return (n, h, w, c)
    if len(shape) == 2:
        return shape
    raise LoweringError(f"tensors must be (N, C, H, W) or (N, F), got shape {shape}")


def build_graph(
    ops: list[FloatOp],
    input_value: str,
    output_value: str,
    input_shape: tuple[int, ...],
    source: QParamSource,
    *,
    per_channel_fc: bool = False,
    name: str = "model",
) -> ir.Graph:
    """Quantize the fused float ops into an :class:`ir.Graph` (with fixed-point params)."""
    b = _Builder(source, per_channel_fc)
    qp = source.activation(input_value)
    b.values[input_value] = _Value(b.act("input", _nhwc(input_shape), qp), input_shape)
    for o in ops:
        b.lower(o)
    out = b.values[output_value].tensor
    graph = ir.Graph(b.tensors, b.ops, input=b.values[input_value].tensor, output=out, name=name)
    ir.prepare(graph)
    graph.validate()
    return graph


class _Builder:
    """Accumulates IR tensors and ops while the float ops are lowered one by one."""

    def __init__(self, source: QParamSource, per_channel_fc: bool) -> None:
        self.source = source
        self.per_channel_fc = per_channel_fc
        self.tensors: dict[str, ir.Tensor] = {}
        self.ops: list[ir.Op] = []
        self.values: dict[str, _Value] = {}

    # ---- tensors

    def _unique(self, name: str) -> str:
        base = "".join(c if c.isalnum() else "_" for c in name).strip("_") or "t"
        out, i = base, 1
        while out in self.tensors:
            i += 1
            out = f"{base}_{i}"
        return out

    def act(self, name: str, shape: tuple[int, ...], qp: spec.QParams) -> str:
        name = self._unique(name)
        scale = spec.to_float32(qp.scale)
        self.tensors[name] = ir.Tensor(name, tuple(shape), "int8", scale, qp.zero_point.copy())
        return name

    def same_qparams_as(self, name: str, src: str, shape: tuple[int, ...]) -> str:
        t = self.tensors[src]
        name = self._unique(name)
        self.tensors[name] = ir.Tensor(name, tuple(shape), "int8", t.scale, t.zero_point)
        return name

    def const(self, name: str, data: np.ndarray, dtype: str, scale, axis: int | None) -> str:
        name = self._unique(name)
        scale = np.atleast_1d(np.asarray(scale, np.float64))
        zp = np.zeros(len(scale), np.int64)
        self.tensors[name] = ir.Tensor(
            name, tuple(data.shape), dtype, scale, zp, np.asarray(data, np.int64), axis
        )
        return name

    def _input(self, o: FloatOp, i: int = 0) -> _Value:
        return self.values[o.inputs[i]]

    def _output(self, o: FloatOp, tensor: str) -> None:
        self.values[o.value] = _Value(tensor, o.shape)

    # ---- ops

    def lower(self, o: FloatOp) -> None:
        getattr(self, f"_lower_{o.kind}")(o)

    def _weights(self, o: FloatOp, layout: Callable, axis: int | None, x: _Value):
        """int8 weights and int32 bias of a conv / linear, in TFLite layout (``layout``).

        A quantized layer's frozen integers are taken as they are (per output channel);
        float weights are quantized with the source's qparams.
        """
        s_in = self.tensors[x.tensor].qscale
        if "weight_int" in o.attrs:
            layer_in = o.module.input_quant.qparams()
            if (spec.to_float32(layer_in.scale[0]), int(layer_in.zero_point[0])) != (
                s_in,
                self.tensors[x.tensor].qzero,
            ):
                raise LoweringError(
                    f"{o.name}: the layer's input quantizer disagrees with the qparams of the "
                    f"tensor it reads ({x.tensor}); re-run quantize_ on the float model"
                )
            wq = layout(o.attrs["weight_int"])
            w_scale = spec.to_float32(o.attrs["weight_scale"])
            bq = o.attrs["bias_int"]
        else:
            w = layout(o.attrs["weight"])
            w_scale = spec.to_float32(self.source.weight(o, w, axis).scale)
            zero = np.zeros(len(w_scale), np.int64)
            wq = spec.quantize(
                w, spec.QParams(w_scale, zero, spec.WEIGHT_MIN, spec.WEIGHT_MAX, axis)
            )
            n_out = w.shape[axis] if axis is not None else w.shape[0]
            per_channel = np.broadcast_to(w_scale, (n_out,)) if len(w_scale) == 1 else w_scale
            bq = spec.quantize_bias(o.attrs["bias"], s_in, per_channel)
        weight = self.const(f"{o.name}.weight", wq, "int8", w_scale, axis)
        bias = self.const(f"{o.name}.bias", bq, "int32", spec.to_float32(s_in * w_scale), 0)
        return weight, bias

    def _lower_conv(self, o: FloatOp) -> None:
        x = self._input(o)
        conv: nn.Conv2d = o.module
        if conv.groups == 1:  # (Cout, Cin, KH, KW) -> (Cout, KH, KW, Cin)
            depthwise, axis = False, 0
            weight, bias = self._weights(o, lambda w: w.transpose(0, 2, 3, 1), axis, x)
        else:  # depthwise (checked when classified): (Cout, 1, KH, KW) -> (1, KH, KW, Cout)
            depthwise, axis = True, 3
            weight, bias = self._weights(o, lambda w: w.transpose(1, 2, 3, 0), axis, x)
        out = self.act(o.value, _nhwc(o.shape), self.source.activation(o.value))
        self.ops.append(
            ir.Conv2D(
                o.name,
                [x.tensor],
                out,
                weight=weight,
                bias=bias,
                stride=_pair(conv.stride),
                padding=o.attrs["padding"],
                depthwise=depthwise,
                activation=o.attrs.get("activation"),
            )
        )
        self._output(o, out)

    def _lower_linear(self, o: FloatOp) -> None:
        x = self._input(o)
        if len(x.torch_shape) != 2:
            raise LoweringError(f"{o.name}: Linear needs a (N, F) input, got {x.torch_shape}")

        def layout(w: np.ndarray) -> np.ndarray:  # (Cout, Cin)
            if x.nchw_flatten is None:
                return w
            c, h, wd = x.nchw_flatten  # the input was flattened in NCHW order; ours is NHWC
            return w.reshape(-1, c, h, wd).transpose(0, 2, 3, 1).reshape(w.shape[0], -1)

        per_channel = self.per_channel_fc or "weight_int" in o.attrs
        weight, bias = self._weights(o, layout, 0 if per_channel else None, x)
        out = self.act(o.value, o.shape, self.source.activation(o.value))
        self.ops.append(
            ir.FullyConnected(
                o.name,
                [x.tensor],
                out,
                weight=weight,
                bias=bias,
                activation=o.attrs.get("activation"),
            )
        )
        self._output(o, out)

    def _lower_quant(self, o: FloatOp) -> None:
        """A quantizer: nothing when its qparams are its input's, else a requantize."""
        x = self._input(o)
        qp = self.source.activation(o.value)
        t = self.tensors[x.tensor]
        if (spec.to_float32(qp.scale[0]), int(qp.zero_point[0])) == (t.qscale, t.qzero):
            self.values[o.value] = x
            return
        out = self.act(o.value, t.shape, qp)
        self.ops.append(ir.Requantize(o.name, [x.tensor], out))
        self._output(o, out)

    def _lower_add(self, o: FloatOp) -> None:
        a, b = self._input(o, 0), self._input(o, 1)
        out = self.act(o.value, _nhwc(o.shape), self.source.activation(o.value))
        self.ops.append(
            ir.Add(o.name, [a.tensor, b.tensor], out, activation=o.attrs.get("activation"))
        )
        self._output(o, out)

    def _lower_pool(self, o: FloatOp) -> None:
        x = self._input(o)
        ph, pw = o.attrs["padding"]
        out = self.same_qparams_as(o.value, x.tensor, _nhwc(o.shape))
        self.ops.append(
            ir.Pool2D(
                o.name,
                [x.tensor],
                out,
                mode=o.attrs["mode"],
                kernel=o.attrs["kernel"],
                stride=o.attrs["stride"],
                padding=(ph, pw, ph, pw),
            )
        )
        self._output(o, out)

    def _lower_gap(self, o: FloatOp) -> None:
        x = self._input(o)
        _, c, h, w = x.torch_shape
        pooled = self.same_qparams_as(o.value, x.tensor, (1, 1, 1, c))
        self.ops.append(
            ir.Pool2D(o.name, [x.tensor], pooled, mode="avg", kernel=(h, w), stride=(h, w))
        )
        if len(o.shape) == 2:  # mean(dim=(2, 3)) without keepdim: (N, C)
            flat = self.same_qparams_as(f"{o.value}_flat", pooled, (1, c))
            self.ops.append(ir.Reshape(o.name, [pooled], flat))
            pooled = flat
        self._output(o, pooled)

    def _lower_flatten(self, o: FloatOp) -> None:
        x = self._input(o)
        src = x.torch_shape
        out = self.same_qparams_as(o.value, x.tensor, o.shape)
        self.ops.append(ir.Reshape(o.name, [x.tensor], out))
        self.values[o.value] = _Value(out, o.shape)
        if len(src) == 4 and src[2] * src[3] > 1:  # NCHW order differs from NHWC
            self.values[o.value].nchw_flatten = (src[1], src[2], src[3])

    def _lower_cat(self, o: FloatOp) -> None:
        xs = [self._input(o, i) for i in range(len(o.inputs))]
        rank = len(o.shape)
        dim = o.attrs["dim"] % rank
        axis = {4: (0, 3, 1, 2), 2: (0, 1)}[rank][dim]  # NCHW dim -> NHWC axis
        qp = self.source.activation(o.value)
        out = self.act(o.value, _nhwc(o.shape), qp)
        inputs = []
        for x in xs:  # TFLite's CONCATENATION needs every input on the output's qparams
            t = self.tensors[x.tensor]
            if t.qscale == self.tensors[out].qscale and t.qzero == self.tensors[out].qzero:
                inputs.append(x.tensor)
                continue
            r = self.same_qparams_as(f"{x.tensor}_requant", out, t.shape)
            self.ops.append(ir.Requantize(f"{o.name} (input {x.tensor})", [x.tensor], r))
            inputs.append(r)
        self.ops.append(ir.Concat(o.name, inputs, out, axis=axis))
        self._output(o, out)

    def _lower_softmax(self, o: FloatOp) -> None:
        x = self._input(o)
        rank = len(o.shape)
        dim = o.attrs["dim"]
        if dim is None or (dim % rank) not in ((1,) if rank in (2, 4) else ()):
            raise LoweringError(f"{o.name}: softmax must be over dim 1 (features / channels)")
        qp = spec.QParams(
            np.array([spec.SOFTMAX_OUTPUT_SCALE]), np.array([spec.SOFTMAX_OUTPUT_ZERO_POINT])
        )
        out = self.act(o.value, _nhwc(o.shape), qp)
        self.ops.append(ir.Softmax(o.name, [x.tensor], out))
        self._output(o, out)


# --------------------------------------------------------------------------------------
# the one call
# --------------------------------------------------------------------------------------


def example_of(model: nn.Module, example: torch.Tensor | None) -> torch.Tensor:
    """``example`` or a zero batch of ``model.input_shape`` (zoo models know theirs)."""
    if example is not None:
        return example
    shape = getattr(model, "input_shape", None)
    if shape is None:
        raise ShapeError(
            f"{type(model).__name__} has no input_shape; pass example= or calib= inputs"
        )
    return torch.zeros(1, *shape)


def lower(
    model: nn.Module,
    calib: torch.Tensor,
    *,
    source: QParamSource | None = None,
    per_channel_fc: bool = False,
    name: str = "model",
) -> ir.Graph:
    """The integer graph of ``model``: trace, classify, fuse, quantize.

    ``calib`` is a batch of inputs ``(N, ...)``. A quantized model (``edgeslim.quantize_``)
    brings its own qparams (:class:`QuantizedModelQParams`); a float model is calibrated on
    ``calib`` (:class:`CalibratedQParams`). Raises :class:`LoweringError` naming every
    unsupported layer.
    """
    if not isinstance(calib, torch.Tensor) or calib.dim() < 2 or calib.shape[0] == 0:
        raise ShapeError("calib must be a non-empty batch of inputs (N, ...)")
    gm = trace(model, calib)
    ops, input_value, output_value = float_ops(gm)
    ops = fuse(ops)
    if source is None and any(isinstance(m, QuantModule) for m in model.modules()):
        source = QuantizedModelQParams(gm)
    elif source is None:
        source = CalibratedQParams(calibrate_ranges(gm, calib))
    input_shape = (1, *calib.shape[1:])
    return build_graph(
        ops,
        input_value,
        output_value,
        input_shape,
        source,
        per_channel_fc=per_channel_fc,
        name=name,
    )
