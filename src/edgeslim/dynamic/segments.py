"""Cut a network into consecutive segments at named modules (for exits, caches, shared trunks).

``split(model, ["conv1", "conv2"])`` traces ``model`` with ``torch.fx`` (the named modules are
kept as leaves, so a block such as ``blocks.3`` is one call) and cuts the graph right after
the *last* call of each named module. A cut is only valid where exactly one tensor crosses
it: the named module's output. Anything else still needed later (the input, a residual from
before the cut, a second branch) makes the cut a :class:`ConfigError` that names the value.

The segments are ``torch.fx.GraphModule`` objects sharing the original parameters; running
them in order equals ``model(x)``.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from edgeslim.core.errors import ConfigError

__all__ = ["count_macs", "module_names", "split"]


class _Tracer(fx.Tracer):
    def __init__(self, leaves: set[str]) -> None:
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname in self.leaves or super().is_leaf_module(m, qualname)


def module_names(model: nn.Module) -> list[str]:
    """Named submodules of ``model`` (no root), for error messages."""
    return [n for n, _ in model.named_modules() if n]


def _check_names(model: nn.Module, names: list[str], where: str) -> None:
    known = set(module_names(model))
    for name in names:
        if name not in known:
            sample = module_names(model)[:25]
            raise ConfigError(
                f"{where}: {type(model).__name__} has no module {name!r}; its modules include "
                f"{sample}"
            )


def trace(model: nn.Module, leaves: list[str], where: str) -> fx.GraphModule:
    """``torch.fx`` trace of ``model`` with ``leaves`` kept as single calls."""
    _check_names(model, leaves, where)
    try:
        graph = _Tracer(set(leaves)).trace(model)
    except Exception as exc:  # fx raises many types; all mean "cannot trace"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"{where}: cannot trace {type(model).__name__} with torch.fx to cut it: {first}"
        ) from exc
    return fx.GraphModule(model, graph)


def split(model: nn.Module, after: list[str], where: str = "after") -> list[fx.GraphModule]:
    """``len(after) + 1`` segments of ``model``, cut after the last call of each named module.

    ``after`` must name modules in the order the forward pass calls them.
    """
    if not after:
        raise ConfigError(f"{where}: give at least one module name to cut after")
    if len(set(after)) != len(after):
        raise ConfigError(f"{where}: module names repeat: {after}")
    gm = trace(model, after, where)
    nodes = list(gm.graph.nodes)
    last_call: dict[str, int] = {}
    for i, node in enumerate(nodes):
        if node.op == "call_module" and node.target in after:
            last_call[node.target] = i
    for name in after:
        if name not in last_call:
            raise ConfigError(
                f"{where}: module {name!r} is never called by {type(model).__name__}.forward "
                "(or is inside a module that torch.fx keeps whole)"
            )
    cuts = [last_call[n] for n in after]
    if cuts != sorted(cuts):
        order = sorted(after, key=lambda n: last_call[n])
        raise ConfigError(f"{where}: list the modules in the order they run: {order}")
    placeholders = [n for n in nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise ConfigError(f"{where}: only single-input models can be cut (got {len(placeholders)})")
    bounds = [*cuts, len(nodes)]
    segments: list[fx.GraphModule] = []
    start, carried = 0, placeholders[0]
    for k, end in enumerate(bounds):
        body = nodes[start : end + 1] if k < len(cuts) else nodes[start:]
        inside = set(body) | {carried}
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {carried: graph.placeholder("x")}
        out_node = None
        for node in body:
            if node.op == "placeholder":
                continue
            if node.op == "output":
                out_node = node
                continue
            for used in node.all_input_nodes:
                if used not in inside:
                    raise ConfigError(
                        f"{where}: cannot cut before {node.name!r}: it uses {used.name!r} from "
                        "before the cut (a skip connection or a second branch crosses it); "
                        "cut after a whole block instead"
                    )
            env[node] = graph.node_copy(node, env.__getitem__)
        if k < len(cuts):
            cut_node = nodes[end]
            here = set(body) | {carried}
            crossing = {
                v.name for u in nodes[end + 1 :] for v in u.all_input_nodes if v in here
            } - {cut_node.name}
            if crossing:
                raise ConfigError(
                    f"{where}: cannot cut after {after[k]!r}: {sorted(crossing)} also cross the "
                    "cut (a skip connection or a second branch); cut after a whole block instead"
                )
            graph.output(env[cut_node])
            carried = cut_node
        else:
            graph.output(fx.map_arg(out_node.args[0], env.__getitem__))
        segment = fx.GraphModule(gm, graph)
        segments.append(segment)
        start = end + 1
    return segments


def count_macs(fn, *args) -> int:
    """Multiply-accumulates of the ops ``fn(*args)`` really executes (PyTorch's flop counter
    / 2): convolutions and matrix products only, skipped work is not counted."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn(*args)
    return counter.get_total_flops() // 2
