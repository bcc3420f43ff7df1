"""Small ``torch.fx`` node patterns: is this node an add, a ReLU / ReLU6, and its arguments.

Graph passes (PTQ's fusion, the int8 lowering) ask the same questions of a traced node; the
answers are written once here. Each predicate recognises the plain form and, when asked,
the in-place and method forms, so a pass keeps exactly the set of spellings it supports::

    modules = dict(gm.named_modules())
    for node in gm.graph.nodes:
        if is_add(node) and tensor_operands(node) is not None:  # a + b of two tensors
            ...
        kind = activation(node, modules)  # "relu", "relu6" or None
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

ADD_FUNCTIONS = (operator.add, torch.add)
INPLACE_ADD_FUNCTIONS = (operator.iadd,)
RELU_FUNCTIONS = (torch.relu, F.relu)
INPLACE_RELU_FUNCTIONS = (torch.relu_,)
RELU6 = (0.0, 6.0)  # the bounds of a Hardtanh that is a ReLU6
MUL_FUNCTIONS = (operator.mul, torch.mul)
# activations that are not clamps: int8 backends compute them (TFLite LOGISTIC, HARD_SWISH)
UNARY_MODULES = {nn.SiLU: "silu", nn.Hardswish: "hardswish", nn.Sigmoid: "sigmoid"}
UNARY_FUNCTIONS = {
    F.silu: "silu",
    F.hardswish: "hardswish",
    torch.sigmoid: "sigmoid",
    F.sigmoid: "sigmoid",
}
UNARY_METHODS = {"sigmoid": "sigmoid"}


def arg(node: fx.Node, index: int, key: str, default: Any) -> Any:
    """Argument ``index`` of ``node``'s call, given positionally or as keyword ``key``."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(key, default)


def called_module(node: fx.Node, modules: Mapping[str, nn.Module]) -> nn.Module | None:
    """The submodule a ``call_module`` node calls; None for every other node."""
    return modules.get(node.target) if node.op == "call_module" else None


def is_add(node: fx.Node, *, inplace: bool = False, methods: bool = False) -> bool:
    """Whether ``node`` is ``a + b`` / ``torch.add``; with ``inplace`` also ``a += b``, with
    ``methods`` also ``a.add(b)`` (and ``a.add_(b)`` when both are set).

    Only the call is matched; what is added is for :func:`tensor_operands` or the caller.
    """
    if node.op == "call_function":
        funcs = ADD_FUNCTIONS + (INPLACE_ADD_FUNCTIONS if inplace else ())
        return node.target in funcs
    if node.op == "call_method" and methods:
        return node.target in (("add", "add_") if inplace else ("add",))
    return False


def tensor_operands(node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """The two operands of a binary call when both are graph values passed positionally
    (no keyword arguments), else None: ``a + b`` but not ``a + 1`` or ``add(a, b, alpha=2)``."""
    if len(node.args) != 2 or node.kwargs:
        return None
    a, b = node.args
    if isinstance(a, fx.Node) and isinstance(b, fx.Node):
        return a, b
    return None


def activation(
    node: fx.Node,
    modules: Mapping[str, nn.Module],
    *,
    inplace: bool = False,
    hardtanh: bool = False,
) -> str | None:
    """``"relu"`` or ``"relu6"`` when ``node`` applies that activation, else None.

    Recognised: ``torch.relu`` / ``F.relu`` / ``x.relu()`` / ``nn.ReLU``, ``F.relu6`` /
    ``nn.ReLU6``; with ``inplace`` also ``torch.relu_`` / ``x.relu_()``. With ``hardtanh``
    any ``nn.Hardtanh`` / ``F.hardtanh`` counts too: ``"relu6"`` for bounds (0, 6),
    ``"hardtanh"`` for other bounds (for the caller to refuse).
    """
    if node.op == "call_function":
        funcs = RELU_FUNCTIONS + (INPLACE_RELU_FUNCTIONS if inplace else ())
        if node.target in funcs:
            return "relu"
        if node.target is F.relu6:
            return "relu6"
        if hardtanh and node.target is F.hardtanh:
            bounds = (arg(node, 1, "min_val", -1.0), arg(node, 2, "max_val", 1.0))
            return "relu6" if bounds == RELU6 else "hardtanh"
        return None
    if node.op == "call_method":
        return "relu" if node.target in (("relu", "relu_") if inplace else ("relu",)) else None
    module = called_module(node, modules)
    if isinstance(module, nn.ReLU):
        return "relu"
    if hardtanh and isinstance(module, nn.Hardtanh):  # nn.ReLU6 is a Hardtanh(0, 6)
        return "relu6" if (module.min_val, module.max_val) == RELU6 else "hardtanh"
    if isinstance(module, nn.ReLU6):
        return "relu6"
    return None


def unary_activation(node: fx.Node, modules: Mapping[str, nn.Module]) -> str | None:
    """``"silu"``, ``"hardswish"`` or ``"sigmoid"`` when ``node`` applies that activation
    (``nn.SiLU`` / ``F.silu``, ``nn.Hardswish`` / ``F.hardswish``, ``nn.Sigmoid`` /
    ``torch.sigmoid`` / ``x.sigmoid()``), else None."""
    if node.op == "call_function":
        return UNARY_FUNCTIONS.get(node.target)
    if node.op == "call_method":
        return UNARY_METHODS.get(node.target)
    module = called_module(node, modules)
    return UNARY_MODULES.get(type(module)) if module is not None else None


def is_mul(node: fx.Node) -> bool:
    """Whether ``node`` is ``a * b`` / ``torch.mul`` / ``a.mul(b)`` (operands unchecked)."""
    if node.op == "call_function":
        return node.target in MUL_FUNCTIONS
    return node.op == "call_method" and node.target == "mul"
