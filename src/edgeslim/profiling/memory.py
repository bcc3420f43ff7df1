"""Peak activation memory from tensor lifetimes in the exported ATen graph.

The graph is executed in node order, the way an inference runtime with a simple arena would:

- every ``call_function`` output is a new buffer of ``numel x itemsize`` bytes (one buffer per
  tensor of a tuple/list output);
- view and in-place ops (schema return with ``alias_info``: ``view``, ``flatten``, ``permute``,
  ``t``, ``relu_``, ``hardtanh_`` ...) allocate nothing: they share their input's buffer and
  keep it alive until their own last use (a view that changes dtype is counted as a copy);
- the model input is live from the start, weights (parameters, buffers, constants) are not
  activations and never count;
- a buffer is freed right after the last node that reads it; graph outputs live to the end.

The peak is the largest number of bytes live while one node executes (its inputs still live
plus its output). ``reshape``/``contiguous`` are taken as views, which they are on the
contiguous tensors a model normally produces.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
from torch.fx import Node

from edgeslim.profiling.counting import tensor_of

Storages = frozenset[int]


@dataclass
class MemoryTrace:
    """Live activation bytes over the execution of a graph."""

    peak_bytes: int
    peak_node: str  # the node executing at the peak ("" when the peak is the bare input)
    timeline: list[tuple[str, int]] = field(default_factory=list)  # (node, live bytes)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.dtype.itemsize


def _outputs(val: object) -> list[torch.Tensor | None]:
    """The tensors of a node's ``meta['val']``: one entry per output element."""
    if isinstance(val, (tuple, list)):
        return [v if isinstance(v, torch.Tensor) else None for v in val]
    return [val if isinstance(val, torch.Tensor) else None]


def _aliased_inputs(node: Node, ret: torch._C.Return) -> list[object]:
    """The arguments of ``node`` whose storage return ``ret`` shares (per the op schema)."""
    schema = node.target._schema
    wanted = ret.alias_info.before_set
    found = []
    for i, arg in enumerate(schema.arguments):
        info = arg.alias_info
        if info is None or (wanted and not (info.before_set & wanted)):
            continue
        value = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
        found.append(value)
    return found or list(node.args[:1])


class _Arena:
    """Buffers (id -> bytes) with the step they are born and the last step they are read."""

    def __init__(self) -> None:
        self.size: list[int] = []
        self.born: list[int] = []
        self.last: list[int] = []

    def new(self, nbytes: int, step: int) -> Storages:
        self.size.append(nbytes)
        self.born.append(step)
        self.last.append(step)
        return frozenset([len(self.size) - 1])

    def touch(self, storages: Storages, step: int) -> None:
        for s in storages:
            self.last[s] = max(self.last[s], step)


def activation_trace(ep: torch.export.ExportedProgram) -> MemoryTrace:
    """Walk ``ep``'s graph and return its live-activation timeline and peak."""
    user_inputs = set(ep.graph_signature.user_inputs)
    arena = _Arena()
    values: dict[Node, list[Storages]] = {}  # per output element, the buffers it lives in
    nodes = list(ep.graph.nodes)
    end = len(nodes)

    def storages_of(arg: object) -> Storages:
        out: set[int] = set()
        if isinstance(arg, Node):
            for part in values.get(arg, []):
                out |= part
        elif isinstance(arg, (tuple, list)):
            for a in arg:
                out |= storages_of(a)
        return frozenset(out)

    for step, node in enumerate(nodes):
        if node.op == "placeholder":
            val = tensor_of(node)
            born = node.name in user_inputs and val is not None
            values[node] = [arena.new(_nbytes(val), -1)] if born else [frozenset()]
        elif node.op == "output":
            arena.touch(storages_of(node.args), end)
        elif node.op == "call_function" and node.target is operator.getitem:
            src, index = node.args
            parts = values.get(src, [])
            part = parts[index] if isinstance(index, int) and index < len(parts) else frozenset()
            values[node] = [part]
            arena.touch(part, step)
        elif node.op == "call_function":
            values[node] = _call(node, step, arena, storages_of)
            for arg in node.all_input_nodes:
                arena.touch(storages_of(arg), step)
        else:  # get_attr and friends: weights or submodules, not activations
            values[node] = [frozenset()]

    return _sweep(nodes, arena, end)


def _call(node: Node, step: int, arena: _Arena, storages_of) -> list[Storages]:
    """Buffers of each output of a ``call_function`` node: shared (views) or new."""
    outs = _outputs(node.meta.get("val"))
    schema = getattr(node.target, "_schema", None)
    returns = list(schema.returns) if schema is not None else []
    result: list[Storages] = []
    for i, t in enumerate(outs):
        if t is None:
            result.append(frozenset())
            continue
        # a list return (``Tensor(a)[]``) describes every element; else one return per element
        ret = returns[0] if len(returns) == 1 else (returns[i] if i < len(returns) else None)
        if ret is not None and ret.alias_info is not None:
            bases = _aliased_inputs(node, ret)
            same_dtype = all(tensor_of(b) is None or tensor_of(b).dtype == t.dtype for b in bases)
            shared = frozenset().union(*(storages_of(b) for b in bases))
            if same_dtype and shared:
                arena.touch(shared, step)
                result.append(shared)
                continue
            if same_dtype:  # a view of a weight: still no activation bytes
                result.append(frozenset())
                continue
        result.append(arena.new(_nbytes(t), step))
    return result


def _sweep(nodes: list[Node], arena: _Arena, end: int) -> MemoryTrace:
    """Sum live bytes per step: a buffer is live from ``born`` through ``last``."""
    delta = [0] * (end + 2)
    initial = 0
    for size, born, last in zip(arena.size, arena.born, arena.last, strict=True):
        if born < 0:
            initial += size
            delta[0] += size
        else:
            delta[born] += size
        delta[last + 1] -= size
    peak, peak_node, live = initial, "", 0
    timeline: list[tuple[str, int]] = []
    for step, node in enumerate(nodes):
        live += delta[step]
        if node.op == "call_function":
            timeline.append((node.name, live))
            if live > peak:
                peak, peak_node = live, node.name
    return MemoryTrace(peak_bytes=peak, peak_node=peak_node, timeline=timeline)


def peak_activation_bytes(ep: torch.export.ExportedProgram) -> int:
    """Largest number of activation bytes live at once while ``ep`` runs."""
    return activation_trace(ep).peak_bytes
