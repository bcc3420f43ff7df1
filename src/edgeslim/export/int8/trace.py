"""Trace a PyTorch model with ``torch.fx`` and classify every node as a float op.

:func:`trace` records every node's output shape (from one example); :func:`float_ops` turns
the nodes into :class:`FloatOp` s, the float ops the int8 graph can express (conv, linear,
BatchNorm, ReLU / ReLU6, add, pooling, flatten, cat, softmax, zero padding). Pass-through
nodes (Identity, Dropout, ``contiguous``) become aliases of their input. Every node that
cannot be lowered is collected and *all* of them are named in one :class:`LoweringError`,
before anything is written.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from edgeslim.core.attention import LEAF_FUNCTIONS, decompose_attention
from edgeslim.core.capture import CaptureError, symbolic_trace_or_capture
from edgeslim.core.errors import LoweringError, ShapeError
from edgeslim.core.fxpatterns import (
    activation,
    arg,
    called_module,
    is_add,
    is_mul,
    unary_activation,
)
from edgeslim.export.int8 import trace_seq
from edgeslim.quant.modules import ActQuant, QuantAdd, QuantAvgPool, QuantModule

SUPPORTED = (
    "Conv2d / Conv1d (groups 1 or depthwise), Linear, BatchNorm after either, ReLU / ReLU6 after "
    "conv / linear / add, add of two tensors, MaxPool2d, AvgPool2d, AdaptiveAvgPool2d(1), "
    "mean over H and W (over L), flatten, cat, softmax, ZeroPad2d before a conv, Identity / "
    "Dropout, SiLU, Hardswish, Sigmoid, multiply of two tensors (same shape, or by a "
    "(N, C, 1, 1) gate); transformers: LayerNorm over the last dimension, GELU, Linear on the "
    "last dimension, permute / transpose / reshape / view / chunk / select / slice, matmul, "
    "softmax over the last dimension, scaled_dot_product_attention (no dropout, not causal), "
    "multiply by a number or a per-channel parameter, add or cat of a parameter"
)

_LEAVES = (
    nn.Conv2d,
    nn.Conv1d,
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
    nn.SiLU,
    nn.Hardswish,
    nn.Sigmoid,
)


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


def _is_leaf(m: nn.Module) -> bool:
    return isinstance(m, (*_LEAVES, QuantModule))


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return _is_leaf(m) or super().is_leaf_module(m, qualname)


def as_inputs(example: Any) -> tuple[torch.Tensor, ...]:
    """The model's inputs as a tuple: ``(x,)`` for one tensor, the tensors of a tuple / list
    for several (one batch ``(N, ...)`` each, the same ``N``)."""
    xs = tuple(example) if isinstance(example, (tuple, list)) else (example,)
    if not xs or not all(isinstance(x, torch.Tensor) and x.dim() >= 1 for x in xs):
        raise ShapeError(
            "inputs must be a batch tensor (N, ...) or, for a model with several inputs, a "
            f"tuple of them; got {_kind(example)}"
        )
    if len({x.shape[0] for x in xs}) != 1:
        sizes = [tuple(x.shape) for x in xs]
        raise ShapeError(f"the input batches must have the same size N, got shapes {sizes}")
    return xs


def _kind(x: Any) -> str:
    if isinstance(x, (tuple, list)):
        return f"{type(x).__name__} of {', '.join(_kind(v) for v in x)}"
    return f"tensor {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


def trace(model: nn.Module, example: Any) -> fx.GraphModule:
    """The graph of ``model`` with every node's output shape (from ``example[:1]``).

    ``example`` is a batch ``(N, ...)``, or a tuple of batches for a model with several
    inputs. ``torch.fx`` symbolic tracing, or where it fails (data-dependent control flow,
    shapes read in Python: transformers' vision models), the graph ``torch.export`` records on
    ``example[:1]`` (:mod:`edgeslim.core.capture`).
    """
    name = type(model).__name__
    xs = as_inputs(example)
    first = tuple(x[:1] for x in xs)
    try:
        tracer = _Tracer(autowrap_functions=LEAF_FUNCTIONS)
        gm = symbolic_trace_or_capture(
            model, first[0] if len(first) == 1 else first, _is_leaf, tracer
        )
        decompose_attention(gm)  # (a captured graph's already is)
    except CaptureError as exc:
        raise LoweringError(
            f"{exc}; the int8 backends (.tflite, C) need a model torch.fx or torch.export can "
            "capture: export it to ONNX instead (edgeslim.export_onnx)"
        ) from exc
    placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(xs):
        raise ShapeError(
            f"{name} takes {len(placeholders)} tensor input(s) ({', '.join(placeholders)}), "
            f"got {len(xs)} ({_kind(example)}): pass one batch per input, as a tuple for "
            "several"
        )
    try:
        with torch.no_grad():
            _ValueProp(gm, _constant_nodes(gm)).propagate(*first)
    except RuntimeError as exc:
        raise ShapeError(
            f"{name} cannot run on input of shape "
            f"{', '.join(str(tuple(x.shape)) for x in xs)}: "
            f"{str(exc).strip().splitlines()[0]}"
        ) from exc
    return gm


class _ValueProp(ShapeProp):
    """ShapeProp that also keeps the values of the nodes in ``keep`` (``meta["value"]``)."""

    def __init__(self, gm: fx.GraphModule, keep: set[str]) -> None:
        super().__init__(gm)
        self.keep = keep

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if n.name in self.keep and isinstance(result, torch.Tensor):
            n.meta["value"] = result.detach().clone()
        return result


def _constant_nodes(gm: fx.GraphModule) -> set[str]:
    """Nodes whose value does not depend on the input's values (parameters and what is
    computed from them and from shapes alone)."""
    data: set[str] = set()
    consts: set[str] = set()
    sizes: set[str] = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            data.add(node.name)
            continue
        if node.op == "output":
            continue
        reads = [a for a in node.all_input_nodes]
        shape = (node.op == "call_function" and node.target is torch.ops.aten.sym_size.int) or (
            node.op == "call_function" and node.target is getattr and node.args[1] == "shape"
        )
        shape = shape or (node.op == "call_method" and node.target == "size")
        shape = shape or (node.target is operator.getitem and reads and reads[0].name in sizes)
        if shape:
            sizes.add(node.name)
            continue  # a shape: not the input's data
        if any(a.name in data for a in reads):
            data.add(node.name)
        else:
            consts.add(node.name)
    return consts


def shape_of(node: fx.Node) -> tuple[int, ...] | None:
    """The output shape :func:`trace` recorded for ``node``; None for non-tensor values."""
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    """``(v, v)`` for an int, else the first two entries (a module's 2-d size argument)."""
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def float_ops(gm: fx.GraphModule) -> tuple[list[FloatOp], str, str]:
    """Classify the traced graph of a model with one input and one output:
    ``(ops, input value, output value)`` (:func:`float_ops_io` for several)."""
    ops, inputs, outputs = float_ops_io(gm)
    if len(inputs) != 1 or len(outputs) != 1:
        raise LoweringError(
            f"this exporter needs a model with one tensor input and one tensor output; it "
            f"takes {len(inputs)} and returns {len(outputs)} (the int8 .tflite and C exporters "
            "take several)"
        )
    return ops, inputs[0], outputs[0]


def float_ops_io(gm: fx.GraphModule) -> tuple[list[FloatOp], list[str], list[str]]:
    """Classify the traced graph: ``(ops, input values, output values)``, inputs in argument
    order, outputs in the order the model returns them (a tensor; a tuple, list or dict of
    tensors; a ``ModelOutput``'s logits).

    Raises :class:`LoweringError` naming every node that cannot be lowered.
    """
    modules = dict(gm.named_modules())
    alias: dict[str, str] = {}  # identity-like node -> the value it passes on
    ops: list[FloatOp] = []
    problems: list[str] = []
    constants: dict[str, torch.Tensor] = {}
    inputs: list[str] = []
    outputs: list[str] = []

    def value(a: object) -> str:
        if not isinstance(a, fx.Node):
            raise TypeError
        return alias.get(a.name, a.name)

    for node in gm.graph.nodes:
        if node.op == "placeholder":
            inputs.append(node.name)
            continue
        if node.op == "output":
            returned = _returned(node.args[0])
            if returned is None:
                problems.append(
                    "output: the model must return tensors (one, or a tuple, list or dict of "
                    f"them), got {node.args[0]!r}"
                )
            else:
                outputs = [value(out) for out in returned]
            continue
        shape = shape_of(node)
        if shape is None:  # x.size(0) and other non-tensor values: used only as arguments
            if node.op == "call_module":  # a layer returning several tensors (LSTM, GRU)
                what = type(modules[node.target]).__name__
                problems.append(f"{node.target} ({what}): not supported (several outputs)")
            continue
        if "value" in node.meta:  # a parameter used as a value (ViT's class token), or
            constants[node.name] = node.meta["value"]  # computed from parameters alone:
            continue  # named by the op that reads it
        module = called_module(node, modules)
        where = node.target if node.op == "call_module" else node.name
        try:
            op = _classify(node, modules, shape, value, constants)
        except (TypeError, ValueError) as exc:
            detail = str(exc) or "unsupported arguments"
            problems.append(f"{where} ({_describe(node, module)}): {detail}")
            continue
        if op is None:
            what = _describe(node, module)
            problems.append(f"{where} ({what}): {_UNSUPPORTED_WHY.get(what, 'not supported')}")
        elif op == "alias":
            alias[node.name] = value(node.args[0])
        elif read := [x for x in op.inputs if x in constants]:
            problems.append(
                f"{where} ({_describe(node, module)}): reads a parameter as a tensor "
                f"({', '.join(read)}); only layers' own weights are supported"
            )
        else:
            op.name = str(where)
            ops.append(op)
    if not inputs:
        problems.append("the model must take at least one tensor input, it takes none")
    problems += [
        f"output {k}: returns its input {name!r} unchanged"
        for k, name in enumerate(outputs)
        if name in inputs
    ]
    if len(set(outputs)) != len(outputs):
        problems.append(f"output: the same tensor is returned twice ({outputs})")
    if problems:
        raise LoweringError(
            "cannot lower to the int8 graph; unsupported:\n  "
            + "\n  ".join(problems)
            + f"\nsupported: {SUPPORTED}\nwhat to do: export the model to ONNX instead "
            "(edgeslim.export_onnx supports every layer), or replace these layers with "
            "supported ones (e.g. ReLU6 or Hardswish for another activation)"
        )
    return ops, inputs, outputs


def _returned(out: Any) -> list[fx.Node] | None:
    """The nodes a model returns, in order; None if it returns anything but tensors."""
    if isinstance(out, dict):  # a ModelOutput (transformers): its logits; else every value
        out = out["logits"] if "logits" in out else list(out.values())
    items = list(out) if isinstance(out, (tuple, list)) else [out]
    if not items or not all(isinstance(x, fx.Node) for x in items):
        return None
    return items


_UNSUPPORTED_WHY = {  # the layers users meet most, with the reason
    "GroupNorm": "not supported: no int8 GroupNorm (LayerNorm over the last dimension is)",
    "group_norm": "not supported: no int8 GroupNorm (LayerNorm over the last dimension is)",
}


def _describe(node: fx.Node, module: nn.Module | None) -> str:
    if module is not None:
        return type(module).__name__
    target = node.target
    return getattr(target, "__name__", str(target))


def _classify(
    node: fx.Node,
    modules: dict[str, nn.Module],
    shape: tuple[int, ...],
    value: Callable,
    constants: dict[str, torch.Tensor] | None = None,
) -> FloatOp | str | None:
    """A :class:`FloatOp`, ``"alias"`` for pass-through nodes, or None if unsupported."""
    module = called_module(node, modules)

    def op(kind: str, inputs: list[str], **attrs: Any) -> FloatOp:
        return FloatOp(kind, "", node.name, inputs, shape, module, attrs)

    seq = trace_seq.classify(node, module, op, value, constants or {}, shape_of)
    if seq is not None:
        return seq

    first = node.args[0] if node.args else None
    act = activation(node, modules, inplace=True, hardtanh=True)
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
        if isinstance(module, (nn.Conv2d, nn.Conv1d)):  # Conv1d: a Conv2d with H = 1
            _check_conv(module)
            return op("conv", x)
        if isinstance(module, nn.Linear):
            return op("linear", x)
        if unary_activation(node, modules):
            return op(unary_activation(node, modules), x)
        if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            return op("bn", x)
        if act == "hardtanh":
            raise ValueError("only Hardtanh(0, 6) (ReLU6) is supported")
        if act is not None:
            return op("act", x, activation=act)
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
        if isinstance(module, nn.AvgPool2d) and _is_global(node, module, shape):
            return op("gap", x, keepdim=True)
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
            if pair(module.output_size) != (1, 1):
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
    if act == "hardtanh":
        raise ValueError("only hardtanh(0, 6) (ReLU6) is supported")
    if act is not None:
        return op("act", [value(first)], activation=act)
    if is_add(node, inplace=True, methods=True):
        return _add(op, node, value)
    target = node.target
    if unary_activation(node, modules):
        return op(unary_activation(node, modules), [value(first)])
    if is_mul(node):
        return _mul(op, node, value)
    if node.op == "call_function":
        if target in (torch.flatten, torch.reshape):
            return _flatten(op, node, shape, value)
        if target is torch.cat:
            tensors = arg(node, 0, "tensors", None)
            return op("cat", [value(t) for t in tensors], dim=arg(node, 1, "dim", 0))
        if target in (F.softmax, torch.softmax):
            return op("softmax", [value(first)], dim=arg(node, 1, "dim", None))
        if target is F.adaptive_avg_pool2d:
            if pair(arg(node, 1, "output_size", None)) != (1, 1):
                raise ValueError("only output size 1 (global average pooling) is supported")
            return op("gap", [value(first)])
        if target in _POOL_FUNCS:
            return _pool_function(op, node, value)
        if target is F.pad:
            if arg(node, 2, "mode", "constant") != "constant" or arg(node, 3, "value", 0):
                raise ValueError("only constant zero padding is supported")
            return op("pad", [value(first)], pad=tuple(arg(node, 1, "pad", ())))
        if target is torch.mean:
            return _mean(op, node, value)
        return None
    if node.op == "call_method":
        if target == "contiguous":
            return "alias"
        if target in ("view", "reshape", "flatten"):
            return _flatten(op, node, shape, value)
        if target == "mean":
            return _mean(op, node, value)
        return None
    return None


def _is_global(node: fx.Node, pool: nn.AvgPool2d, shape: tuple[int, ...]) -> bool:
    """An average pool whose window covers the whole input (and no padding): a global mean
    (transformers' EfficientNet pools with ``AvgPool2d(hidden_dim, ceil_mode=True)``)."""
    src = shape_of(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
    if src is None or len(src) != 4 or len(shape) != 4 or shape[2:] != (1, 1):
        return False
    kh, kw = pair(pool.kernel_size)
    return kh >= src[2] and kw >= src[3] and pair(pool.padding) == (0, 0)


def _pool(op, x, mode, kernel, stride, padding, dilation, ceil_mode, count_include_pad=False):
    if pair(dilation) != (1, 1) or ceil_mode:
        raise ValueError("dilation and ceil_mode are not supported")
    padding = pair(padding)
    if mode == "avg" and count_include_pad and padding != (0, 0):
        raise ValueError("average pooling with padding must use count_include_pad=False")
    stride = pair(stride if stride is not None else kernel)
    return op("pool", x, mode=mode, kernel=pair(kernel), stride=stride, padding=padding)


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
    a = {n: arg(node, i + 1, n, _POOL_DEFAULTS.get(n)) for i, n in enumerate(names)}
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
    if arg(node, 2, "alpha", 1) != 1 or shape_of(a) != shape_of(b):
        raise ValueError("only the sum of two tensors of the same shape is supported")
    return op("add", [value(a), value(b)])


def _mul(op, node: fx.Node, value: Callable) -> FloatOp:
    a, b = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        raise ValueError("only the product of two tensors is supported (not tensor * constant)")
    sa, sb = shape_of(a), shape_of(b)
    if sa != sb and _gates(sa, sb):
        return op("mul", [value(a), value(b)])  # x * gate (N, C, 1, 1)
    if sa != sb and _gates(sb, sa):
        return op("mul", [value(b), value(a)])
    if sa != sb:
        raise ValueError(f"only the product of tensors of the same shape is supported ({sa}, {sb})")
    return op("mul", [value(a), value(b)])


def _gates(x: tuple[int, ...] | None, gate: tuple[int, ...] | None) -> bool:
    """Is ``gate`` a (N, C, 1, 1) tensor that broadcasts over ``x`` (N, C, H, W)?"""
    return (
        x is not None
        and gate is not None
        and len(x) == len(gate) == 4
        and gate[:2] == x[:2]
        and gate[2:] == (1, 1)
    )


def _flatten(op, node: fx.Node, shape: tuple[int, ...], value: Callable) -> FloatOp:
    src = shape_of(node.args[0])
    if len(shape) != 2 or src is None or shape[0] != src[0]:
        raise ValueError(f"only flattening to (batch, features) is supported, got {shape}")
    return op("flatten", [value(node.args[0])])


def _mean(op, node: fx.Node, value: Callable) -> FloatOp:
    dims = arg(node, 1, "dim", None)
    src = shape_of(node.args[0]) if isinstance(node.args[0], fx.Node) else None
    rank = len(src) if src is not None else 4
    dims = {int(d) % rank for d in (dims if isinstance(dims, (tuple, list)) else [dims])}
    if dims != ({2, 3} if rank == 4 else {2}):
        raise ValueError(
            "only the mean over H and W of an NCHW tensor (over L of an NCL one) is supported"
        )
    keepdim = bool(arg(node, 2, "keepdim", False))
    return op("gap", [value(node.args[0])], keepdim=keepdim)


def conv_pair(conv: nn.Conv2d | nn.Conv1d, v: int | tuple[int, ...]) -> tuple[int, int]:
    """A conv's 2-d size argument; a Conv1d's ``(v,)`` is ``(1, v)`` (its H is 1)."""
    if isinstance(conv, nn.Conv1d):
        return (1, int(v if isinstance(v, int) else v[0]))
    return pair(v)


def _check_conv(conv: nn.Conv2d | nn.Conv1d) -> None:
    """Raise ValueError for conv settings the int8 graph does not support."""
    if conv.padding_mode != "zeros":
        raise ValueError(f"padding_mode {conv.padding_mode!r} is not supported")
    if conv_pair(conv, conv.dilation) != (1, 1):
        raise ValueError("dilation is not supported")
    cin, groups = conv.in_channels, conv.groups
    if groups != 1 and not (groups == cin and conv.out_channels % cin == 0):
        raise ValueError(f"grouped conv with groups={groups} is not supported (1 or depthwise)")
