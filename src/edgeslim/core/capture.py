"""A module-level ``torch.fx`` graph of a model, captured with ``torch.export``.

``torch.fx.symbolic_trace`` cannot trace most real models (transformers' vision models test
the input's channels, compute TF-style padding from its size, read ``config`` values in
Python control flow). ``torch.export`` runs the model on an example and records every ATen
op with the module it ran in (``nn_module_stack``). :func:`capture` turns that program back
into the graph the graph passes expect (PTQ's graph mode, the int8 lowering): each call of a
*leaf* module (``leaf(module)`` says which: conv, linear, BatchNorm, activations, pooling
...) becomes one ``call_module`` node, and the ATen ops outside leaf modules become the
``torch`` functions they implement (``aten.add.Tensor`` -> ``operator.add``, ``aten.mean.dim``
-> ``torch.mean`` ...), so the same patterns match a traced and a captured graph.

Shapes are fixed to the example's (batch included); what is left over stays an ATen call,
which a pass names when it does not support it. The graph returns what the model returns
(a transformers ``ModelOutput`` included, through its pytree spec).

    gm = symbolic_trace_or_capture(model, example, leaf)  # fx first, torch.export if it fails
"""

from __future__ import annotations

import contextlib
import io
import operator
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from edgeslim.core.attention import LEAF_FUNCTIONS, decompose_attention
from edgeslim.core.errors import EdgeslimError
from edgeslim.core.hooks import output_tensors

aten = torch.ops.aten


class CaptureError(EdgeslimError):
    """Neither ``torch.fx`` nor ``torch.export`` can capture the model's graph."""


def _pad(x, pad, mode="constant", value=None):
    return F.pad(x, list(pad), mode, 0.0 if value is None else value)


def _dropout(x, *args):
    return x


# ATen op -> (torch callable, how its ATen arguments map onto the callable's); None: alias
_FUNCTIONS: dict[Any, Callable | None] = {
    aten.add.Tensor: operator.add,
    aten.add_.Tensor: operator.add,
    aten.mul.Tensor: operator.mul,
    aten.mul_.Tensor: operator.mul,
    aten.relu.default: torch.relu,
    aten.relu_.default: torch.relu,
    aten.hardtanh.default: F.hardtanh,
    aten.hardtanh_.default: F.hardtanh,
    aten.silu.default: F.silu,
    aten.silu_.default: F.silu,
    aten.hardswish.default: F.hardswish,
    aten.hardswish_.default: F.hardswish,
    aten.sigmoid.default: torch.sigmoid,
    aten.mean.dim: torch.mean,
    aten.flatten.using_ints: torch.flatten,
    aten.view.default: torch.reshape,
    aten.reshape.default: torch.reshape,
    aten.cat.default: torch.cat,
    aten.adaptive_avg_pool2d.default: F.adaptive_avg_pool2d,
    aten.max_pool2d.default: F.max_pool2d,
    aten.avg_pool2d.default: F.avg_pool2d,
    aten.softmax.int: F.softmax,
    aten.pad.default: _pad,
    aten.constant_pad_nd.default: _pad,
    aten.dropout.default: None,
    aten.clone.default: None,
    aten.contiguous.default: None,
    aten.alias.default: None,
    aten.detach.default: None,
    aten.detach_.default: None,
}
_INPLACE = {
    aten.add_.Tensor,
    aten.mul_.Tensor,
    aten.relu_.default,
    aten.hardtanh_.default,
    aten.silu_.default,
    aten.hardswish_.default,
}


_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def torch_leaf(m: nn.Module) -> bool:
    """``torch.fx``'s default leaves: modules of ``torch.nn`` (not containers), and
    subclasses of them (transformers' ``EfficientNetDepthwiseConv2d`` is a Conv2d)."""
    if isinstance(m, _CONTAINERS):
        return False
    return any(
        c.__module__.startswith("torch.nn.modules") and c is not nn.Module for c in type(m).__mro__
    )


def symbolic_trace_or_capture(
    model: nn.Module,
    example: torch.Tensor | tuple[torch.Tensor, ...] | None,
    leaf: Callable[[nn.Module], bool],
    tracer: fx.Tracer | None = None,
) -> fx.GraphModule:
    """``torch.fx`` trace of ``model`` (with ``tracer``), or, when that fails and an
    ``example`` input is given, :func:`capture`. Raises :class:`CaptureError` if neither
    works, with both reasons."""
    name = type(model).__name__
    try:
        graph = (tracer or fx.Tracer(autowrap_functions=LEAF_FUNCTIONS)).trace(model)
        return fx.GraphModule(model, graph, name)
    except Exception as exc:  # fx raises many types; all mean "cannot trace"
        fx_reason = _first_line(exc)
        if example is None:
            raise CaptureError(f"cannot trace {name} with torch.fx: {fx_reason}") from exc
    try:
        return capture(model, example, leaf)
    except CaptureError as exc:
        raise CaptureError(f"{exc} (torch.fx: {fx_reason})") from exc


def capture(
    model: nn.Module,
    example: torch.Tensor | tuple[torch.Tensor, ...],
    leaf: Callable[[nn.Module], bool],
):
    """The module-level graph of ``model`` on ``example`` (see the module docstring); a
    tuple ``example`` holds one batch per input of a model with several."""
    name = type(model).__name__
    was_training = model.training
    xs = tuple(example) if isinstance(example, tuple) else (example,)
    model.eval()
    try:
        # a batch of 2 (batch 1 would be specialized): calibration batches of any size
        pairs = tuple(torch.cat([x[:1], x[:1]]) for x in xs)
        batch = tuple({0: torch.export.Dim.AUTO} for _ in xs)
        with torch.no_grad(), _quiet():
            ep = torch.export.export(model, pairs, dynamic_shapes=batch, strict=False)
    except Exception as exc:  # torch.export raises many types; all mean "cannot capture"
        raise CaptureError(f"cannot capture {name} with torch.export: {_first_line(exc)}") from exc
    finally:
        model.train(was_training)
    gm = _rebuild(model, ep, leaf)
    decompose_attention(gm)
    _check_same(model, gm, *(x[:1] for x in xs))
    return gm


def _check_same(model: nn.Module, gm: fx.GraphModule, *x: torch.Tensor) -> None:
    """The captured graph must compute what the model computes on the example."""
    try:
        with torch.no_grad():
            want, got = list(output_tensors(model(*x))), list(output_tensors(gm(*x)))
    except Exception as exc:  # the rebuilt graph cannot run: a module it misread
        raise CaptureError(
            f"the graph captured from {type(model).__name__} cannot run: {_first_line(exc)}"
        ) from exc
    same = len(want) == len(got) and all(
        a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-5)
        for a, b in zip(want, got, strict=True)
    )
    if not same:
        raise CaptureError(f"the graph captured from {type(model).__name__} computes otherwise")


def _first_line(exc: BaseException) -> str:
    lines = [x.strip() for x in str(exc).strip().splitlines() if x.strip()]
    return (lines[0] if lines else type(exc).__name__)[:300]


@contextlib.contextmanager
def _quiet():
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def _innermost(node: fx.Node) -> tuple[str, str] | None:
    """``(call key, module path)`` of the innermost module ``node`` ran in."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    key, (path, _) = list(stack.items())[-1]
    return key, path


def _leaf_call(node: fx.Node, model: nn.Module, leaf) -> tuple[str, str] | None:
    """``(call key, path)`` of the outermost leaf module ``node`` ran in, or None."""
    stack = node.meta.get("nn_module_stack") or {}
    for key, (path, _) in stack.items():
        if not path:
            continue
        try:
            module = model.get_submodule(path)
        except AttributeError:
            continue
        if leaf(module):
            return key, path
    return None


def _rebuild(model: nn.Module, ep: Any, leaf) -> fx.GraphModule:
    sig = ep.graph_signature
    attrs = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}
    attrs.update(getattr(sig, "inputs_to_lifted_tensor_constants", {}))
    user_inputs = list(sig.user_inputs)
    graph = fx.Graph()
    env: dict[fx.Node, Any] = {}
    nodes = list(ep.graph.nodes)
    groups = _leaf_calls(nodes, model, leaf)  # node -> (index of its call, module path)
    members: dict[int, list[fx.Node]] = {}
    for n, (k, _) in groups.items():
        members.setdefault(k, []).append(n)
    made: dict[int, fx.Node] = {}
    for n in nodes:
        if n.op == "placeholder":
            if n.name in attrs:
                env[n] = graph.get_attr(attrs[n.name])
            elif n.name in user_inputs:
                env[n] = graph.placeholder(n.name)
            else:
                raise CaptureError(f"cannot capture an input of kind {n.name!r}")
            continue
        if n.op == "output":
            outs = [env[a] if isinstance(a, fx.Node) else a for a in n.args[0]]
            graph.output(outs[0] if len(outs) == 1 else tuple(outs))
            continue
        if n.op == "call_function" and _is_assert(n.target):
            env[n] = None  # a runtime check torch.export records (dtypes, shapes)
            continue
        if n not in groups:
            env[n] = _copy(graph, n, env, nodes)
            continue
        k, path = groups[n]
        if k not in made:
            _check_one_output(members[k], path)
            made[k] = graph.call_module(path, _call_inputs(members[k], env, attrs))
        env[n] = made[k]  # every node of the call stands for its one output
    gm = fx.GraphModule(model, graph, type(model).__name__)
    gm.graph.eliminate_dead_code()  # the parameters leaf modules read for themselves
    gm.recompile()
    out_spec = ep.call_spec.out_spec if hasattr(ep, "call_spec") else None
    if out_spec is not None and not _is_leaf_spec(out_spec):
        gm = _with_output_spec(gm, graph, ep.call_spec.in_spec, out_spec)
    gm.graph.lint()
    return gm


def _is_assert(target: Any) -> bool:
    name = getattr(target, "__name__", str(target))
    return name.startswith(("_assert", "sym_constrain_range"))


def _is_leaf_spec(spec: Any) -> bool:
    return bool(spec.is_leaf())


def _with_output_spec(
    gm: fx.GraphModule, graph: fx.Graph, in_spec: Any, out_spec: Any
) -> fx.GraphModule:
    """Return what the model returns: the flat outputs, unflattened by ``out_spec``."""
    from torch.fx.graph import _PyTreeCodeGen, _PyTreeInfo

    out = next(n for n in graph.nodes if n.op == "output")
    flat = out.args[0]
    if not isinstance(flat, tuple):
        out.args = ((flat,),)
    names = [n.name for n in graph.nodes if n.op == "placeholder"]
    graph._codegen = _PyTreeCodeGen(_PyTreeInfo(names, in_spec, out_spec))
    gm.recompile()
    return gm


def _leaf_calls(nodes: list[fx.Node], model: nn.Module, leaf) -> dict[fx.Node, tuple[int, str]]:
    """The ATen nodes that run inside a leaf module: ``node -> (call index, path)``; one call
    is a contiguous run of nodes with the same module (a module called twice: two calls)."""
    out: dict[fx.Node, tuple[int, str]] = {}
    current: str | None = None
    k = -1
    for n in nodes:
        call = _leaf_call(n, model, leaf) if n.op == "call_function" else None
        if call is None:
            if n.op == "call_function" and not _is_assert(n.target):
                current = None
            continue
        if call[0] != current:
            current, k = call[0], k + 1
        out[n] = (k, call[1])
    return out


def _check_one_output(members: list[fx.Node], path: str) -> None:
    """A leaf call must hand on one value (an LSTM's ``(out, (h, c))`` cannot be one node)."""
    inside = set(members)
    escaping = [n for n in members if any(u not in inside for u in n.users)]
    if len(escaping) > 1:
        raise CaptureError(f"{path}: a module call with several outputs is not supported")


def _call_inputs(members: list[fx.Node], env: dict[fx.Node, Any], attrs: dict) -> tuple:
    """What a leaf module call reads: the tensors from outside the call, in first-use order
    (one for most modules; two for an add module)."""
    inside = set(members)
    found: list[Any] = []
    for n in members:
        for a in n.all_input_nodes:
            if a in inside or a.name in attrs or env.get(a) is None or env[a] in found:
                continue
            found.append(env[a])
    if not found:
        raise CaptureError(f"cannot find the input of the module call at {members[0].name}")
    return tuple(found)


def _copy(graph: fx.Graph, n: fx.Node, env: dict[fx.Node, Any], nodes: list[fx.Node]) -> Any:
    """``n`` (an ATen op outside leaf modules) as the torch function it implements."""

    def arg(a: Any) -> Any:
        return fx.node.map_arg(a, lambda x: env[x])

    args, kwargs = arg(n.args), arg(n.kwargs)
    if n.op != "call_function":
        return graph.node_copy(n, lambda x: env[x])
    if n.target is operator.getitem:
        return graph.call_function(operator.getitem, args, kwargs)
    if n.target in _INPLACE:  # fine only if the mutated input is not read afterwards
        later = nodes[nodes.index(n) + 1 :]
        src = n.args[0]
        if any(src in u.all_input_nodes for u in later):
            raise CaptureError(f"{n.name}: an in-place {n.target} whose input is read again")
    if n.target not in _FUNCTIONS:
        return graph.call_function(n.target, args, kwargs)
    fn = _FUNCTIONS[n.target]
    if fn is None:  # dropout (eval), clone, contiguous ...
        return args[0]
    if n.target in (aten.view.default, aten.reshape.default):
        return graph.call_function(torch.reshape, (args[0], tuple(args[1])))
    if n.target in (aten.mean.dim,):
        dims = args[1] if len(args) > 1 else kwargs.get("dim")
        keep = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
        return graph.call_function(torch.mean, (args[0], tuple(dims), keep))
    if n.target is aten.avg_pool2d.default:
        names = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor")
        a = dict(zip(names, args[1:], strict=False))
        a["divisor_override"] = a.pop("divisor", None)
        return graph.call_function(F.avg_pool2d, (args[0],), {**a, **kwargs})
    if n.target is aten.max_pool2d.default:
        names = ("kernel_size", "stride", "padding", "dilation", "ceil_mode")
        a = dict(zip(names, args[1:], strict=False))
        return graph.call_function(F.max_pool2d, (args[0],), {**a, **kwargs})
    if n.target is aten.softmax.int:
        return graph.call_function(F.softmax, (args[0],), {"dim": args[1]})
    if n.target is aten.constant_pad_nd.default:
        value = args[2] if len(args) > 2 else kwargs.get("value", 0.0)
        return graph.call_function(F.pad, (args[0], list(args[1]), "constant", value))
    if n.target is aten.pad.default:
        mode = args[2] if len(args) > 2 else kwargs.get("mode", "constant")
        value = args[3] if len(args) > 3 else kwargs.get("value")
        value = 0.0 if value is None else value
        return graph.call_function(F.pad, (args[0], list(args[1]), mode, value))
    return graph.call_function(fn, args, kwargs)
