"""Coupled channel groups: which layers must lose the same channels, and which may not.

Gongfan Fang et al. "DepGraph: Towards Any Structural Pruning", CVPR 2023.
https://arxiv.org/abs/2301.12900 (the dependency graph, from the ``torch-pruning`` package)

Torch-Pruning's ``DependencyGraph`` lists the coupled groups (:func:`prunable_groups`). A
group is left alone when it produces the model's output (the classifier's classes, a
transformer's hidden size), also through ops that are no modules (a classifier conv followed
by global pooling and ``flatten``, as in SqueezeNet), matches ``ignore``, or touches a tensor
the graph cannot handle (a bare ``nn.Parameter`` outside a known layer): that op is named in
a warning (``on_unsupported="skip"``) or an error (``"error"``) and the rest is pruned.

Channel permutations: a module that declares ``permutes_channels = True`` (the zoo's
``ChannelShuffle``, ShuffleNet's channel shuffle) maps input channel ``i`` to another output
channel. Torch-Pruning traces such a shuffle (reshape to groups, transpose, reshape back) as
an ordinary reshape and its shape inference fails on it (a ``ZeroDivisionError`` in its index
mapping, Torch-Pruning 1.6). While the graph is traced the module runs as one opaque,
shape-keeping op (:class:`_Permutation`), and every group that passes through it keeps its
width: cutting channel ``i`` before a shuffle and channel ``i`` after it would cut different
channels. The other groups (a branch's inner width, the stem, the head) are pruned.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch_pruning as tp
from torch import nn

from edgeslim.core.errors import EdgeslimError
from edgeslim.core.hooks import eval_mode, forward_hooks, output_tensors
from edgeslim.core.selection import matches

ROOT_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
HEAD_COUNTS = ("num_attention_heads", "num_heads")
OUTPUT = tp.ops.OPTYPE.OUTPUT  # the graph's node for the model's output
PROJECTIONS = (("query", "key", "value"), ("q_proj", "k_proj", "v_proj"))
PERMUTATION = "_PermutationBackward"  # the autograd node of a traced channel permutation


class UnsupportedOpError(EdgeslimError):
    """Structured pruning met an op or tensor the dependency graph cannot handle."""


class GroupOptions(Protocol):
    """What finding groups reads from a :class:`~edgeslim.prune.ChannelPrune`."""

    ignore: list[str]
    on_unsupported: str


@dataclass
class Group:
    """One coupled group: the layers whose outputs it cuts, named by the first of them."""

    name: str
    root: nn.Module
    handler: Callable[..., Any]
    channels: int
    layers: list[str]  # layers losing output channels (conv filters, BN entries, ...)
    ch_groups: int = 1  # grouped conv: channels are cut the same way in each group
    heads: int = 0  # attention: number of heads (0 when not attention)
    attention: list[nn.Module] = field(default_factory=list)  # modules to update
    deps: Any = None  # the Torch-Pruning group over all channels (for scoring)


def call(model: nn.Module, example: Any) -> Any:
    """``model(example)``, unpacking a dict of keyword inputs (transformers' tokenizers)."""
    return model(**example) if isinstance(example, dict) else model(example)


def output_modules(model: nn.Module, example: Any) -> set[nn.Module]:
    """Modules whose forward result is (part of) the model's output: their width is fixed."""
    produced: list[tuple[torch.Tensor, nn.Module]] = []  # tensors kept alive: ids stay unique

    def seen(_name: str, mod: nn.Module, _inputs: Any, out: Any) -> None:
        produced.extend((t, mod) for t in output_tensors(out))

    with forward_hooks(dict(model.named_modules()), seen), eval_mode(model), torch.no_grad():
        out = call(model, example)
    results = {id(t) for t in output_tensors(out)}
    return {mod for t, mod in produced if id(t) in results}


class _Permutation(torch.autograd.Function):
    """A channel-permuting module's forward as one autograd node (named ``PERMUTATION``),
    which the dependency graph takes for a shape-keeping op it cannot see into."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, module: nn.Module, forward: Callable) -> torch.Tensor:
        with torch.no_grad():
            y = forward(x)
        if y.shape != x.shape:
            raise UnsupportedOpError(
                f"{type(module).__name__} declares permutes_channels but changes the shape "
                f"{tuple(x.shape)} -> {tuple(y.shape)}"
            )
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:  # never called: tracing only
        raise NotImplementedError


@contextmanager
def opaque_permutations(model: nn.Module) -> Iterator[None]:
    """Run each module declaring ``permutes_channels`` as one :class:`_Permutation` node."""
    patched = [m for m in model.modules() if getattr(m, "permutes_channels", False)]
    own = [m.__dict__.get("forward") for m in patched]  # a forward set on the instance
    try:
        for m in patched:
            orig = m.forward
            m.forward = lambda x, m=m, orig=orig: _Permutation.apply(x, m, orig)
        yield
    finally:
        for m, forward in zip(patched, own, strict=True):
            if forward is None:
                del m.forward  # back to the class's forward
            else:
                m.forward = forward


def build_graph(model: nn.Module, example: Any) -> tp.DependencyGraph:
    """Torch-Pruning's dependency graph of ``model`` traced on ``example`` (channel
    permutations traced as opaque ops, see the module docstring)."""

    def first(out: Any) -> torch.Tensor:
        return sum(t.float().sum() for t in output_tensors(out))

    forward = (lambda m, x: m(**x)) if isinstance(example, dict) else None
    try:
        with eval_mode(model), warnings.catch_warnings(), opaque_permutations(model):
            warnings.simplefilter("ignore")
            return tp.DependencyGraph().build_dependency(
                model,
                example_inputs=example,
                forward_fn=forward,
                output_transform=first,
                verbose=False,
            )
    except Exception as exc:  # tracing failures come in many types
        hint = ""
        if isinstance(exc, ZeroDivisionError):  # Torch-Pruning's reshape index mapping
            hint = (
                " (a reshape that mixes channels, e.g. a channel shuffle written as reshape / "
                "transpose / reshape: put it in a module with permutes_channels = True, like "
                "edgeslim.core.models.zoo.ChannelShuffle, and its groups keep their width)"
            )
        raise UnsupportedOpError(
            f"cannot trace {type(model).__name__} for structured pruning: "
            f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc) else ''}" + hint
        ) from exc


def head_count(module: nn.Module) -> int:
    """The number of heads an attention module declares (0 when it declares none)."""
    for attr in HEAD_COUNTS:
        value = getattr(module, attr, None)
        if isinstance(value, int):
            return value
    return 0


def attention_heads(model: nn.Module) -> dict[nn.Module, nn.Module]:
    """q/k/v projection -> its attention module, for transformers-style self-attention.

    Recognised: a module declaring ``num_attention_heads`` (or ``num_heads``) with Linear
    children ``query``/``key``/``value`` or ``q_proj``/``k_proj``/``v_proj`` (BERT, ViT,
    and the many models built like them), with as many key/value heads as query heads.
    """
    found: dict[nn.Module, nn.Module] = {}
    for module in model.modules():
        heads = head_count(module)
        if not heads or getattr(module, "num_key_value_heads", heads) != heads:
            continue
        for names in PROJECTIONS:
            projections = [getattr(module, k, None) for k in names]
            if all(isinstance(p, nn.Linear) for p in projections):
                for p in projections:
                    found[p] = module
    return found


def opaque_attention_layers(model: nn.Module) -> list[nn.Module]:
    """Linear layers of attention modules whose q/k/v projections :func:`attention_heads`
    does not recognise (GPT-2's fused ``c_attn``, split into query, key and value inside
    the forward): cutting their outputs would mix up the heads, so no group in which they
    lose output channels is cut (their input columns still follow the layers before)."""
    known = set(attention_heads(model).values())
    return [
        child
        for module in model.modules()
        if head_count(module) and module not in known
        for child in module.children()
        if isinstance(child, nn.Linear)
    ]


def report_unsupported(cfg: GroupOptions, what: str) -> None:
    """Name an op structured pruning cannot handle: a warning, or per ``cfg`` an error."""
    if cfg.on_unsupported == "error":
        raise UnsupportedOpError(
            f"structured pruning cannot handle {what}; "
            f"set on_unsupported='skip' to prune the rest, or ignore those layers"
        )
    warnings.warn(f"structured pruning skipped {what}", stacklevel=3)


def prunable_groups(
    model: nn.Module, dg: tp.DependencyGraph, example: Any, cfg: GroupOptions
) -> list[Group]:
    """The groups that may be pruned, in graph order (see the module docstring)."""
    names = {m: n for n, m in model.named_modules()}
    order = {m: i for i, m in enumerate(names)}  # definition order names a group stably
    fixed = output_modules(model, example)
    heads = attention_heads(model)
    ignored = [m for n, m in model.named_modules() if n and matches(n, cfg.ignore)]
    ignored += opaque_attention_layers(model)
    groups: list[Group] = []
    for group in dg.get_all_groups(ignored_layers=ignored, root_module_types=ROOT_TYPES):
        root = group[0].dep.target.module
        handler = group[0].dep.handler
        cut, bare, attention, ch_groups = [], [], [], 1
        for dep, _ in group:
            target = dep.target.module
            if dep.target.type == tp.ops.OPTYPE.PARAMETER:
                bare.append(dg._param_to_name.get(target, "a parameter"))
                continue
            grouped = isinstance(target, nn.Conv1d | nn.Conv2d) and target.groups > 1
            if grouped and target.groups < target.out_channels:  # grouped, not depthwise:
                ch_groups = max(ch_groups, target.groups)  # cut alike in every group
            if not dg.is_out_channel_pruning_fn(dep.handler) or target not in names:
                continue
            cut.append(target)
            if target in heads and heads[target] not in attention:
                attention.append(heads[target])
        cut.sort(key=order.__getitem__)
        name = names[cut[0]] if cut else names[root]
        if any(m in fixed for m in cut) or any(d.target.type == OUTPUT for d, _ in group):
            continue  # its width is the model's output width (maybe via pooling, flatten)
        if any(_permutes(d.target) for d, _ in group):
            continue  # it passes through a channel shuffle (see the module docstring)
        if bare:
            report_unsupported(
                cfg,
                f"the group of {name}: it reaches bare parameter(s) {sorted(set(bare))} "
                "outside any layer the dependency graph knows",
            )
            continue
        n_heads = head_count(attention[0]) if attention else 0
        if attention:  # cut heads from the downstream projection (Torch-Pruning's advice)
            for dep, _ in group:
                if isinstance(dep.target.module, ROOT_TYPES) and dg.is_in_channel_pruning_fn(
                    dep.handler
                ):
                    root, handler = dep.target.module, dep.handler
        out = dg.is_out_channel_pruning_fn(handler)
        channels = dg.get_out_channels(root) if out else dg.get_in_channels(root)
        deps = dg.get_pruning_group(root, handler, list(range(channels))) if attention else group
        groups.append(
            Group(
                name,
                root,
                handler,
                channels,
                [names[m] for m in cut],
                ch_groups,
                n_heads,
                attention,
                deps,
            )
        )
    return groups


def _permutes(node: Any) -> bool:
    """Whether a dependency-graph node is a traced channel permutation."""
    grad_fn = getattr(node, "grad_fn", None)
    return grad_fn is not None and type(grad_fn).__name__ == PERMUTATION


def prepare(
    model: nn.Module, example: Any, cfg: GroupOptions
) -> tuple[tp.DependencyGraph, list[Group]]:
    """The dependency graph of ``model`` and its prunable groups."""
    dg = build_graph(model, example)
    return dg, prunable_groups(model, dg, example, cfg)
