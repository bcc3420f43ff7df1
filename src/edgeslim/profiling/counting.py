"""Parameters, nonzeros and multiply-accumulates (MACs), counted on an exported ATen graph.

MACs are counted for the ops that do multiply-accumulate work:

* convolutions (``aten.conv1d/2d/3d``, ``aten.convolution``, ``aten.conv_transpose*``):
  ``out_numel * Cin/groups * prod(kernel)`` (transposed: ``in_numel * Cout/groups * prod(kernel)``);
* matrix products (``aten.linear``, ``mm``, ``addmm``, ``matmul``, ``bmm``, ``baddbmm``):
  ``out_numel * K`` with ``K`` the contracted dimension;
* ``aten.scaled_dot_product_attention``: ``Q @ K^T`` plus ``attn @ V``.

Bias adds, normalisation, activations, pooling and element-wise arithmetic are *not* counted:
they are cheap next to the products above and are not what compression removes.

Effective MACs skip zero weights: when an operand is a weight (a parameter, buffer or
constant, possibly seen through views such as ``t``), every entry of it takes part in the
same number of MACs, so ``effective = macs * nnz(weight) / numel(weight)`` exactly (for a
conv: ``out_spatial * nnz``; for a linear layer: ``rows * nnz``). When both operands are
activations, effective = dense. When both are weights, the sparser one is used.
A weight computed in ``forward`` by non-view ops (e.g. ``w * mask``) counts as an activation.

Memory access cost (Ma et al. 2018, "ShuffleNet V2", guideline G1; :func:`memory_access_bytes`)
is the bytes every op reads and writes: for each op that is not a view, the bytes of its
distinct tensor inputs (activations and weights) plus the bytes of its outputs. It is what a
runtime without fusion moves through memory, and it explains why a model with fewer MACs
(many thin depthwise/1x1 layers, shuffles, concatenations) can still run slower.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.fx import Node

_CONV = {"aten::conv1d", "aten::conv2d", "aten::conv3d", "aten::convolution", "aten::_convolution"}
_CONV_T = {"aten::conv_transpose1d", "aten::conv_transpose2d", "aten::conv_transpose3d"}
# op name -> positions of the two matrix operands (first one holds the contracted dim last)
_MATMUL = {
    "aten::linear": (0, 1),
    "aten::mm": (0, 1),
    "aten::matmul": (0, 1),
    "aten::bmm": (0, 1),
    "aten::addmm": (1, 2),
    "aten::baddbmm": (1, 2),
}
_SDPA = "aten::scaled_dot_product_attention"
# ops that keep a weight's values (so its zeros) when applied to it
_VALUE_PRESERVING = {"aten::clone", "aten::contiguous", "aten::_to_copy", "aten::to"}


@dataclass
class ModuleCount:
    """What the graph says about one module path (``""`` is the root module)."""

    path: str
    class_name: str
    order: int  # index of its first MAC op, else of the first node run inside it
    output_shape: tuple[int, ...] = ()  # of the last node run inside it, without batch dim
    macs: int = 0
    effective_macs: int = 0
    has_mac_ops: bool = False


def count_params(module: nn.Module, recurse: bool = True) -> tuple[int, int]:
    """``(params, nonzero_params)`` of ``module`` (buffers and pruning masks excluded)."""
    params = nonzero = 0
    for p in module.parameters(recurse=recurse):
        params += p.numel()
        nonzero += int(torch.count_nonzero(p.detach()))
    return params, nonzero


def op_name(node: Node) -> str | None:
    """``"aten::conv2d"`` for an ATen call, None for anything else."""
    schema = getattr(node.target, "_schema", None)
    return schema.name if schema is not None else None


def tensor_of(arg: object) -> torch.Tensor | None:
    """The (fake) tensor a graph argument stands for, if any."""
    if isinstance(arg, Node):
        v = arg.meta.get("val")
        if isinstance(v, (tuple, list)):
            v = next((t for t in v if isinstance(t, torch.Tensor)), None)
        return v if isinstance(v, torch.Tensor) else None
    return None


def _arg(node: Node, index: int, name: str, default: object = None) -> object:
    if index < len(node.args):
        return node.args[index]
    return node.kwargs.get(name, default)


def weight_values(ep: torch.export.ExportedProgram) -> dict[str, torch.Tensor]:
    """Placeholder name -> real tensor, for every lifted parameter, buffer and constant."""
    sig = ep.graph_signature
    out: dict[str, torch.Tensor] = {}
    for mapping, store in (
        (sig.inputs_to_parameters, ep.state_dict),
        (sig.inputs_to_buffers, {**ep.state_dict, **ep.constants}),
        (sig.inputs_to_lifted_tensor_constants, ep.constants),
    ):
        for placeholder, name in mapping.items():
            value = store.get(name)
            if isinstance(value, torch.Tensor):
                out[placeholder] = value.detach()
    return out


def _constant(arg: object, weights: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The real value of ``arg`` when it is a weight, seen through views/copies; else None."""
    if not isinstance(arg, Node):
        return None
    if arg.op == "placeholder":
        return weights.get(arg.name)
    if arg.op != "call_function":
        return None
    schema = getattr(arg.target, "_schema", None)
    if schema is None or not arg.args:
        return None
    is_view = schema.returns and schema.returns[0].alias_info is not None and not schema.is_mutable
    if not (is_view or schema.name in _VALUE_PRESERVING):
        return None
    base = _constant(arg.args[0], weights)
    if base is None:
        return None
    try:
        out = arg.target(base, *arg.args[1:], **arg.kwargs)
    except Exception:  # an op we cannot replay on the real tensor: treat as activation
        return None
    return out if isinstance(out, torch.Tensor) else None


def _effective(macs: int, operands: list[object], weights: dict[str, torch.Tensor]) -> int:
    """``macs`` scaled by the density of the sparsest weight operand (dense if none)."""
    best = macs
    for arg in operands:
        w = _constant(arg, weights)
        if w is not None and w.numel() > 0:
            best = min(best, macs * int(torch.count_nonzero(w)) // w.numel())
    return best


def node_macs(node: Node, weights: dict[str, torch.Tensor]) -> tuple[int, int] | None:
    """``(macs, effective_macs)`` of one graph node, or None when it does no MAC work."""
    name = op_name(node)
    out = tensor_of(node)
    if name is None or out is None:
        return None
    if name in _CONV or name in _CONV_T:
        x, w = tensor_of(node.args[0]), tensor_of(node.args[1])
        if x is None or w is None or w.dim() == 0:
            return None
        # aten.convolution / _convolution carry a ``transposed`` flag (arg 6)
        transposed = name in _CONV_T or (
            name in ("aten::convolution", "aten::_convolution")
            and bool(_arg(node, 6, "transposed"))
        )
        # weight (Cout, Cin/g, *k) -> MACs per output = Cin/g * prod(k) = w.numel() / Cout;
        # transposed weight (Cin, Cout/g, *k) -> MACs per input = Cout/g * prod(k)
        per = w.numel() // w.shape[0]
        macs = (x.numel() if transposed else out.numel()) * per
        return macs, _effective(macs, [node.args[1]], weights)
    if name in _MATMUL:
        i, j = _MATMUL[name]
        a = tensor_of(node.args[i])
        if a is None or a.dim() == 0:
            return None
        macs = out.numel() * a.shape[-1]
        return macs, _effective(macs, [node.args[i], node.args[j]], weights)
    if name == _SDPA:
        q, k = tensor_of(node.args[0]), tensor_of(node.args[1])
        if q is None or k is None or out.dim() < 2:
            return None
        rows = out.numel() // out.shape[-1]  # batch * heads * L
        macs = rows * k.shape[-2] * (q.shape[-1] + out.shape[-1])  # QK^T + AV
        return macs, macs
    return None


def _stack(node: Node) -> list[tuple[str, str]]:
    """``[(module_path, class_fullname), ...]`` from the outermost to the owning module."""
    stack = node.meta.get("nn_module_stack") or {}
    out = []
    for value in stack.values():
        path, cls = value
        out.append((str(path), cls if isinstance(cls, str) else getattr(cls, "__name__", "")))
    return out


def module_counts(ep: torch.export.ExportedProgram) -> dict[str, ModuleCount]:
    """Per-module MACs, effective MACs, output shape and execution order from the graph.

    Each op's MACs go to the innermost module it ran in (``nn_module_stack``), or to the root
    ``""`` when it ran directly in the top-level ``forward``. Shapes are those of the graph's
    example input; the batch dimension (dim 0) is dropped.
    """
    weights = weight_values(ep)
    counts: dict[str, ModuleCount] = {}
    for index, node in enumerate(ep.graph.nodes):
        if node.op != "call_function":
            continue
        stack = _stack(node) or [("", "")]
        for path, cls in stack:
            if path not in counts:
                counts[path] = ModuleCount(path, cls.rsplit(".", 1)[-1], index)
            out = tensor_of(node)
            if out is not None:
                counts[path].output_shape = tuple(int(s) for s in out.shape[1:])
        found = node_macs(node, weights)
        if found is not None:
            owner = counts[stack[-1][0]]
            if not owner.has_mac_ops:  # a row with MACs sits where its first MAC op runs
                owner.order = index
            owner.macs += found[0]
            owner.effective_macs += found[1]
            owner.has_mac_ops = True
    return counts


def _moves_no_data(node: Node) -> bool:
    """A pure view (``view``, ``t``, ``permute``, ``expand`` ...): aliases, writes nothing."""
    schema = getattr(node.target, "_schema", None)
    if schema is None or not schema.returns:
        return False
    return all(r.alias_info is not None and not r.alias_info.is_write for r in schema.returns)


def _tensor_bytes(val: object) -> int:
    if isinstance(val, torch.Tensor):
        return val.numel() * val.dtype.itemsize
    if isinstance(val, (tuple, list)):
        return sum(_tensor_bytes(v) for v in val)
    return 0


def memory_access_bytes(ep: torch.export.ExportedProgram) -> int:
    """Bytes read and written by the graph's ops (see the module docstring), batch as traced."""
    total = 0
    for node in ep.graph.nodes:
        if node.op != "call_function" or _moves_no_data(node) or op_name(node) is None:
            continue
        reads = sum(_tensor_bytes(arg.meta.get("val")) for arg in node.all_input_nodes)
        total += reads + _tensor_bytes(node.meta.get("val"))
    return total
