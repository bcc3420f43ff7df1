"""Classify the traced nodes of transformer-style models (:mod:`.trace` asks first).

Layout ops (``permute``, ``transpose``, ``reshape`` / ``view`` / ``flatten`` to any rank,
``unsqueeze``, ``select``, ``slice``), LayerNorm over the last axis, GELU, ``matmul``, a
multiply or add with a parameter (ConvNeXt's layer scale, ViT's position embeddings), a
multiply by a Python number (attention's ``1 / sqrt(d)``), ``cat`` with a parameter (ViT's
class token) and an attention mask (:func:`edgeslim.core.capture.attention_mask`) that
keeps every position. ``consts`` holds the values of the nodes that do not depend on the
model's input (parameters and what is computed from them alone).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from edgeslim.core.attention import attention_mask, head_dim_scale
from edgeslim.core.capture import _pad as _capture_pad
from edgeslim.core.fxpatterns import arg, is_add, is_mul
from edgeslim.quant.modules import QuantAdd

aten = torch.ops.aten

_PERMUTE = {aten.permute.default, torch.permute}
_TRANSPOSE = {aten.transpose.int, torch.transpose}
_RESHAPE = {
    aten.view.default,
    aten.reshape.default,
    aten._unsafe_view.default,
    aten.unsqueeze.default,
    aten.squeeze.dim,
    torch.reshape,
    torch.flatten,
    torch.unsqueeze,
    torch.squeeze,
}
_LAYER_NORM = {aten.layer_norm.default, F.layer_norm}
_GELU = {aten.gelu.default, F.gelu}
_MATMUL = {aten.matmul.default, aten.bmm.default, torch.matmul, torch.bmm, operator.matmul}
_ALIAS = {aten.clone.default, aten.contiguous.default, aten.alias.default}
_PAD = {F.pad, aten.pad.default, aten.constant_pad_nd.default, _capture_pad}
_POOL1D = {aten.adaptive_avg_pool1d.default, F.adaptive_avg_pool1d}


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().cpu().numpy()


def classify(
    node: fx.Node,
    module: nn.Module | None,
    make: Callable[..., Any],
    value: Callable[[Any], str],
    consts: dict[str, torch.Tensor],
    shape_of: Callable[[fx.Node], tuple[int, ...] | None],
) -> Any:
    """A FloatOp (via ``make(kind, inputs, **attrs)``), ``"alias"``, or None (not ours)."""
    first = node.args[0] if node.args else None
    if module is not None:
        if isinstance(module, nn.LayerNorm):
            w = None if module.weight is None else _np(module.weight)
            b = None if module.bias is None else _np(module.bias)
            return _layer_norm(make, [value(first)], module.normalized_shape, w, b, module.eps)
        if isinstance(module, nn.GELU):
            return make("gelu", [value(first)], approximate=module.approximate)
        if isinstance(module, nn.AdaptiveAvgPool1d):
            if tuple(np.atleast_1d(module.output_size)) != (1,):
                raise ValueError("only adaptive average pooling to 1 is supported")
            return make("gap", [value(first)])
        if isinstance(module, QuantAdd) and any(
            isinstance(a, fx.Node) and a.name in consts for a in node.args
        ):  # x + a parameter, in a quantized model
            return _binary(node, make, value, consts, add=True)
        return None
    if node.op == "call_method":
        return _method(node, make, value, shape_of)
    if node.op != "call_function":
        return None
    t = node.target
    if t in _ALIAS:
        return "alias"
    if t in _PERMUTE:
        dims = node.args[1] if len(node.args) == 2 else node.args[1:]
        return make("permute", [value(first)], dims=_dims(dims, len(shape_of(first))))
    if t in _TRANSPOSE:
        return _transpose(make, value(first), len(shape_of(first)), node.args[1], node.args[2])
    if t in _RESHAPE:
        return None if len(shape_of(node)) == 2 else make("reshape", [value(first)])
    if t in _PAD and not any(arg(node, 1, "pad", ())):
        return "alias"  # zero padding of nothing (Swin pads to whole windows)
    if t in _POOL1D:
        if tuple(np.atleast_1d(arg(node, 1, "output_size", 0))) != (1,):
            raise ValueError("only adaptive average pooling to 1 is supported")
        return make("gap", [value(first)])
    if t in _LAYER_NORM:
        w, b = (
            None if x is None else _np(consts[x.name])
            for x in (arg(node, 2, "weight", None), arg(node, 3, "bias", None))
        )
        eps = arg(node, 4, "eps", 1e-5)
        return _layer_norm(make, [value(first)], arg(node, 1, "normalized_shape", ()), w, b, eps)
    if t in _GELU:
        return make("gelu", [value(first)], approximate=arg(node, 1, "approximate", "none"))
    if t in _MATMUL:
        return make("matmul", [value(node.args[0]), value(node.args[1])])
    if t is aten.select.int:
        return make("select", [value(first)], dim=int(node.args[1]), index=int(node.args[2]))
    if t is operator.getitem and isinstance(first, fx.Node) and _is_chunk(first):
        return _chunk_part(first, int(node.args[1]), make, value, shape_of)
    if (
        t is operator.getitem
        and isinstance(first, fx.Node)
        and first.name not in consts
        and shape_of(first) is not None  # a tensor (not a module's tuple of outputs)
    ):
        idx = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
        full = [i for i, x in enumerate(idx) if x != slice(None)]
        if len(full) == 1 and isinstance(idx[full[0]], int) and Ellipsis not in idx:
            return make("select", [value(first)], dim=full[0], index=idx[full[0]])
        return None
    if t is aten.slice.Tensor:
        return _slice(node, make, value, shape_of)
    if t is head_dim_scale:
        return make("scale", [value(first)], factor=shape_of(node.args[1])[-1] ** -0.5)
    if t is attention_mask:
        mask = consts.get(node.args[1].name) if isinstance(node.args[1], fx.Node) else None
        if mask is None:
            raise ValueError("the attention mask must be a constant")
        if mask.dtype == torch.bool and bool(mask.all()):
            return "alias"
        if mask.dtype == torch.bool:
            raise ValueError("a boolean attention mask that hides positions is not supported")
        return make("add_const", [value(first)], const=_np(mask))
    if t in (torch.cat, aten.cat.default) and any(
        isinstance(x, fx.Node) and x.name in consts for x in node.args[0]
    ):
        parts = [
            ("const", _np(consts[x.name])) if x.name in consts else ("value", value(x))
            for x in node.args[0]
        ]
        inputs = [v for kind, v in parts if kind == "value"]
        return make("cat_const", inputs, parts=parts, dim=int(arg(node, 1, "dim", 0)))
    if is_mul(node) or is_add(node) or t in (operator.truediv, torch.div, aten.div.Tensor):
        return _binary(node, make, value, consts)
    return None


def _is_chunk(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target == "chunk"
    return node.op == "call_function" and node.target in (torch.chunk, aten.chunk.default)


def _chunk_part(node: fx.Node, i: int, make, value, shape_of) -> Any:
    """Part ``i`` of ``x.chunk(n, dim)``: a gather of its indices along ``dim``."""
    x = node.args[0]
    src = shape_of(x)
    n = int(arg(node, 1, "chunks", 1))
    dim = int(arg(node, 2, "dim", 0)) % len(src)
    if dim == 0:
        raise ValueError("chunking the batch dimension is not supported")
    size = -(-src[dim] // n)
    indices = tuple(range(src[dim]))[i * size : (i + 1) * size]
    return make("gather", [value(x)], dim=dim, indices=indices)


def moves_only(node: fx.Node) -> bool:
    """Does ``node`` only move or view its input's values (permute, transpose, reshape)?"""
    if node.op == "call_method":
        return node.target in ("permute", "transpose", "view", "reshape", "flatten", "contiguous")
    if node.op != "call_function":
        return False
    return node.target in _PERMUTE | _TRANSPOSE | _RESHAPE | _ALIAS


def _dims(dims: Any, rank: int) -> tuple[int, ...]:
    return tuple(int(d) % rank for d in dims)


def _transpose(make, x: str, rank: int, d0: int, d1: int):
    perm = list(range(rank))
    d0, d1 = int(d0) % rank, int(d1) % rank
    perm[d0], perm[d1] = perm[d1], perm[d0]
    return make("permute", [x], dims=tuple(perm))


def _method(node: fx.Node, make, value, shape_of) -> Any:
    first = node.args[0]
    t = node.target
    if t == "permute":
        one = len(node.args) == 2 and not isinstance(node.args[1], int)
        dims = node.args[1] if one else node.args[1:]
        return make("permute", [value(first)], dims=_dims(dims, len(shape_of(first))))
    if t == "transpose":
        return _transpose(make, value(first), len(shape_of(first)), node.args[1], node.args[2])
    if t in ("view", "reshape", "flatten", "unsqueeze", "squeeze"):
        return None if len(shape_of(node)) == 2 else make("reshape", [value(first)])
    return None


def _slice(node: fx.Node, make, value, shape_of) -> Any:
    src = shape_of(node.args[0])
    dim = int(arg(node, 1, "dim", 0)) % len(src)
    start = arg(node, 2, "start", None)
    end = arg(node, 3, "end", None)
    step = int(arg(node, 4, "step", 1))
    indices = tuple(range(src[dim]))[slice(start, end, step)]
    if indices == tuple(range(src[dim])):
        return "alias"
    if dim == 0:
        raise ValueError("slicing the batch dimension is not supported")
    return make("gather", [value(node.args[0])], dim=dim, indices=indices)


def _binary(node: fx.Node, make, value, consts, add: bool = False) -> Any:
    """``x * c``, ``x / c``, ``x + c`` with ``c`` a number or a parameter; None otherwise."""
    if node.kwargs or len(node.args) != 2:
        return None
    a, b = node.args
    div = node.target in (operator.truediv, torch.div, aten.div.Tensor)

    def is_const(v: Any) -> bool:
        return isinstance(v, (int, float)) or (isinstance(v, fx.Node) and v.name in consts)

    if is_const(a) and not is_const(b) and not div:
        a, b = b, a
    if not isinstance(a, fx.Node) or a.name in consts or not is_const(b):
        return None
    c = float(b) if isinstance(b, (int, float)) else _np(consts[b.name])
    if div:
        c = 1.0 / c
    if add or is_add(node):
        return make("add_const", [value(a)], const=np.asarray(c, np.float64))
    if isinstance(c, float):
        if c <= 0:
            raise ValueError("only a multiply by a positive number is supported")
        return make("scale", [value(a)], factor=c)
    return make("mul_const", [value(a)], const=np.asarray(c, np.float64))


def _layer_norm(make, x: list[str], normalized_shape, w, b, eps) -> Any:
    if len(tuple(normalized_shape)) != 1:
        raise ValueError("only LayerNorm over the last dimension is supported")
    return make("layernorm", x, weight=w, bias=b, eps=float(eps))
