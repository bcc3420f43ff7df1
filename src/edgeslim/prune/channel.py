"""Structured pruning: remove whole channels, filters, FFN neurons and attention heads.

Gongfan Fang et al. "DepGraph: Towards Any Structural Pruning", CVPR 2023.
https://arxiv.org/abs/2301.12900 (the dependency graph, from the ``torch-pruning`` package)

Unlike masks, this makes the model physically smaller: a conv with 64 filters becomes a conv
with 32, so dense runtimes (PyTorch, ONNX Runtime) really run fewer MACs. Layers tied by the
graph are cut together -- the BatchNorm after a conv, every conv feeding the same residual add,
both sides of a depthwise conv, the slices of a concat, the input columns of each consumer, the
query/key/value/output projections of an attention head -- so the model stays consistent.

Three separate steps:

1. **groups** (:func:`prunable_groups`): Torch-Pruning's ``DependencyGraph`` lists the coupled
   groups. A group is left alone when it produces the model's output (the classifier's
   classes, a transformer's hidden size), matches ``ignore``, or touches a tensor the graph
   cannot handle (a bare ``nn.Parameter`` outside a known layer): that op is named in a
   warning (``on_unsupported="skip"``) or an error (``"error"``) and the rest is pruned.
2. **plan** (:func:`plan_groups`): per group, a ratio (uniform ``ratio``, per-layer
   ``layer_ratio``, or found for a ``macs`` target, uniformly or from a sensitivity analysis),
   rounded so the channels kept are a multiple of ``round_to`` (for a ``macs`` target, the
   channels rounding cut beyond the budget are given back, :func:`fill_budget`); the
   lowest-importance channels (:mod:`.importance`) are chosen. Attention groups lose whole heads.
3. **surgery** (:func:`apply_plans`): checked first on a copy (the pruned copy must run and give
   outputs of the same shape; a group that breaks it is reported like an unsupported op), then
   done on the model.
"""

from __future__ import annotations

import copy
import fnmatch
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch_pruning as tp
from pydantic import ConfigDict, Field, model_validator
from torch import nn

from edgeslim.core.data.datasets import DataSplits
from edgeslim.core.errors import ConfigError, EdgeslimError, ShapeError
from edgeslim.core.hooks import eval_mode
from edgeslim.core.masks import iter_masks
from edgeslim.core.options import Options
from edgeslim.prune.importance import (
    Importance,
    accumulate_gradients,
    forget_inputs,
    record_inputs,
    scorer,
)

ROOT_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


class UnsupportedOpError(EdgeslimError):
    """Structured pruning met an op or tensor the dependency graph cannot handle."""


class ChannelPrune(Options):
    """Remove whole channels / neurons / heads (physically smaller layers).

    Give exactly one target: ``ratio`` (fraction of channels removed in every prunable group),
    ``layer_ratio`` (per layer name or glob; a group matches when any of its layers does) or
    ``macs`` (fraction of the MACs to keep; the ratios are searched, ``allocation`` uniform or
    from a channel sensitivity analysis -- that one needs ``data=``).
    ``heads`` is the fraction of attention heads removed (default: the group's ratio).
    """

    model_config = ConfigDict(extra="forbid")

    ratio: float | None = Field(None, ge=0, lt=1)
    layer_ratio: dict[str, float] | None = None
    macs: float | None = Field(None, gt=0, lt=1, description="fraction of MACs to keep")
    allocation: Literal["uniform", "sensitivity"] = "uniform"
    heads: float | None = Field(None, ge=0, lt=1)
    importance: Importance = "l2"
    round_to: int = Field(1, ge=1, description="channels kept: a multiple of this")
    fill: bool = Field(
        True, description="macs target with round_to > 1: give back channels rounding overcut"
    )
    max_ratio: float = Field(0.9, gt=0, lt=1, description="never remove more of one group")
    ignore: list[str] = Field(default_factory=list, description="layer names/globs kept whole")
    on_unsupported: Literal["skip", "error"] = "skip"
    samples: int = Field(256, ge=1, description="labelled examples for taylor / sensitivity")
    probe_ratios: list[float] = Field(
        default_factory=lambda: [0.25, 0.5, 0.75, 0.9],
        description="ratios each group is probed at for allocation='sensitivity'",
    )

    @model_validator(mode="after")
    def _one_target(self) -> ChannelPrune:
        given = [k for k in ("ratio", "layer_ratio", "macs") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of 'ratio', 'layer_ratio' or 'macs'"
                + (f" (got {', '.join(given)})" if given else "")
            )
        for name, r in (self.layer_ratio or {}).items():
            if not 0 <= r < 1:
                raise ValueError(f"layer_ratio[{name!r}] = {r} must be in [0, 1)")
        return self


# --------------------------------------------------------------------------------------
# 1. groups
# --------------------------------------------------------------------------------------


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


def _outputs(out: Any) -> Iterator[torch.Tensor]:
    """Every tensor in a model output (tensor, tuple, dict, ModelOutput)."""
    if isinstance(out, torch.Tensor):
        yield out
    elif isinstance(out, dict):
        for v in out.values():
            yield from _outputs(v)
    elif isinstance(out, (tuple, list)):
        for v in out:
            yield from _outputs(v)


def call(model: nn.Module, example: Any) -> Any:
    """``model(example)``, unpacking a dict of keyword inputs (transformers' tokenizers)."""
    return model(**example) if isinstance(example, dict) else model(example)


def output_modules(model: nn.Module, example: Any) -> set[nn.Module]:
    """Modules whose forward result is (part of) the model's output: their width is fixed."""
    produced: list[tuple[torch.Tensor, nn.Module]] = []  # tensors kept alive: ids stay unique

    def hook(mod: nn.Module, _inputs: Any, out: Any) -> None:
        produced.extend((t, mod) for t in _outputs(out))

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        with eval_mode(model), torch.no_grad():
            out = call(model, example)
    finally:
        for h in handles:
            h.remove()
    results = {id(t) for t in _outputs(out)}
    return {mod for t, mod in produced if id(t) in results}


def build_graph(model: nn.Module, example: Any) -> tp.DependencyGraph:
    """Torch-Pruning's dependency graph of ``model`` traced on ``example``."""

    def first(out: Any) -> torch.Tensor:
        return sum(t.float().sum() for t in _outputs(out))

    forward = (lambda m, x: m(**x)) if isinstance(example, dict) else None
    try:
        with eval_mode(model), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return tp.DependencyGraph().build_dependency(
                model,
                example_inputs=example,
                forward_fn=forward,
                output_transform=first,
                verbose=False,
            )
    except Exception as exc:  # tracing failures come in many types
        raise UnsupportedOpError(
            f"cannot trace {type(model).__name__} for structured pruning: "
            f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc) else ''}"
        ) from exc


HEAD_COUNTS = ("num_attention_heads", "num_heads")
PROJECTIONS = (("query", "key", "value"), ("q_proj", "k_proj", "v_proj"))


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


def _matches(name: str, patterns: list[str] | dict[str, float]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _report_unsupported(cfg: ChannelPrune, what: str) -> None:
    if cfg.on_unsupported == "error":
        raise UnsupportedOpError(
            f"structured pruning cannot handle {what}; "
            f"set on_unsupported='skip' to prune the rest, or ignore those layers"
        )
    warnings.warn(f"structured pruning skipped {what}", stacklevel=3)


def prunable_groups(
    model: nn.Module, dg: tp.DependencyGraph, example: Any, cfg: ChannelPrune
) -> list[Group]:
    """The groups that may be pruned, in graph order (see the module docstring, step 1)."""
    names = {m: n for n, m in model.named_modules()}
    order = {m: i for i, m in enumerate(names)}  # definition order names a group stably
    fixed = output_modules(model, example)
    heads = attention_heads(model)
    ignored = [m for n, m in model.named_modules() if n and _matches(n, cfg.ignore)]
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
        if any(m in fixed for m in cut):
            continue  # its width is the model's output width
        if bare:
            _report_unsupported(
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


# --------------------------------------------------------------------------------------
# 2. plan
# --------------------------------------------------------------------------------------


@dataclass
class Plan:
    """What to cut from one group: channel indices (and whole heads for attention)."""

    group: str  # the group's name: its first layer in definition order
    layers: list[str]
    channels: int
    remove: list[int]
    heads_removed: int = 0

    @property
    def kept(self) -> int:
        return self.channels - len(self.remove)


def group_ratio(group: Group, cfg: ChannelPrune, ratios: dict[str, float] | None) -> float:
    """The fraction of ``group`` to remove: from ``ratios`` (by any of its layers) or ``ratio``."""
    table = ratios if ratios is not None else cfg.layer_ratio
    if table is None:
        r = cfg.ratio or 0.0
    else:
        r = 0.0
        for key, value in table.items():
            if any(fnmatch.fnmatchcase(n, key) for n in [group.name, *group.layers]):
                r = value
                break
    if group.heads and cfg.heads is not None:
        r = cfg.heads
    return min(r, cfg.max_ratio)


def n_to_remove(channels: int, ratio: float, round_to: int = 1) -> int:
    """How many of ``channels`` to cut for ``ratio``, keeping a multiple of ``round_to`` (>= 1)."""
    keep = max(1, round(channels * (1 - ratio)))
    if round_to > 1:
        keep = max(round_to, round(keep / round_to) * round_to)
    return max(0, channels - min(channels, keep))


def plan_groups(
    groups: list[Group],
    cfg: ChannelPrune,
    ratios: dict[str, float] | None = None,
) -> list[Plan]:
    """Choose the channels to cut in each group, lowest importance first."""
    score = scorer(cfg.importance)
    plans: list[Plan] = []
    for g in groups:
        ratio = group_ratio(g, cfg, ratios)
        if ratio <= 0:
            continue
        imp = score(g.deps)
        if imp is None:  # e.g. taylor without gradients
            raise ConfigError(f"importance {cfg.importance!r} gave no score for group {g.name}")
        imp = imp.detach().cpu().float()
        if g.heads:  # whole heads: mean importance per head
            size = g.channels // g.heads
            n_heads = n_to_remove(g.heads, ratio)
            order = imp.view(g.heads, size).mean(1).argsort(stable=True)[:n_heads]
            remove = sorted(int(h) * size + i for h in order for i in range(size))
            plans.append(Plan(g.name, g.layers, g.channels, remove, n_heads))
            continue
        per = g.channels // g.ch_groups
        imp = imp.view(g.ch_groups, per).mean(0) if g.ch_groups > 1 else imp
        n = n_to_remove(per, ratio, max(1, cfg.round_to // g.ch_groups))
        order = imp.argsort(stable=True)[:n]
        remove = sorted(int(i) + k * per for k in range(g.ch_groups) for i in order)
        if remove:
            plans.append(Plan(g.name, g.layers, g.channels, remove))
    return plans


# --------------------------------------------------------------------------------------
# 3. surgery, checked on a copy first
# --------------------------------------------------------------------------------------


def prepare(
    model: nn.Module, example: Any, cfg: ChannelPrune
) -> tuple[tp.DependencyGraph, list[Group]]:
    """The dependency graph of ``model`` and its prunable groups."""
    dg = build_graph(model, example)
    return dg, prunable_groups(model, dg, example, cfg)


def _cut(dg: tp.DependencyGraph, groups: list[Group], plans: list[Plan]) -> None:
    by_name = {g.name: g for g in groups}
    for plan in plans:
        g = by_name[plan.group]
        dg.get_pruning_group(g.root, g.handler, plan.remove).prune()
        for attention in g.attention:
            heads = head_count(attention) - plan.heads_removed
            for attr in HEAD_COUNTS:
                if isinstance(getattr(attention, attr, None), int):
                    setattr(attention, attr, heads)
            if hasattr(attention, "all_head_size"):
                attention.all_head_size = heads * (g.channels // g.heads)


@contextmanager
def zeroed(dg: tp.DependencyGraph, group: Group, remove: list[int]) -> Iterator[None]:
    """Within the block, the ``remove`` channels of ``group`` are zero instead of cut.

    Every layer that would lose output channels gets those rows (weight, bias, norm scale and
    shift) set to 0, so each consumer sees exact zeros there -- what cutting them does, for
    activations with f(0) = 0 (ReLU, ReLU6, GELU, SiLU) and heads whose values are 0. Used by
    sensitivity probes: far cheaper than copying and cutting the model. Restored on exit.
    """
    saved: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    items = dg.get_pruning_group(group.root, group.handler, remove)
    with torch.no_grad():
        for dep, idxs in items:
            module = dep.target.module
            if not dg.is_out_channel_pruning_fn(dep.handler) or not isinstance(module, nn.Module):
                continue
            index = torch.as_tensor(list(idxs), dtype=torch.long)
            for pname in ("weight", "bias"):
                param = getattr(module, pname, None)
                if isinstance(param, torch.Tensor) and param.dim() >= 1:
                    saved.append((param, index, param[index].clone()))
                    param[index] = 0
    try:
        yield
    finally:
        with torch.no_grad():
            for param, index, values in saved:
                param[index] = values


def _failure(model: nn.Module, example: Any, shapes: list[tuple[int, ...]]) -> str | None:
    """None when ``model`` runs on ``example`` with outputs of ``shapes``; else what failed."""
    running: list[str] = []
    names = {m: n for n, m in model.named_modules()}

    def enter(mod: nn.Module, _inputs: Any) -> None:
        running.append(f"{names.get(mod) or '(root)'} ({type(mod).__name__})")

    def leave(_mod: nn.Module, _inputs: Any, _out: Any) -> None:
        running.pop()

    handles = [m.register_forward_pre_hook(enter) for m in model.modules()]
    handles += [m.register_forward_hook(leave) for m in model.modules()]
    try:
        with eval_mode(model), torch.no_grad():
            out = call(model, example)
    except Exception as exc:  # any failure of the cut model is reported, not raised
        where = running[-1] if running else "(root)"
        return f"{where}: {type(exc).__name__}: {str(exc).strip().splitlines()[0]}"
    finally:
        for h in handles:
            h.remove()
    got = [tuple(t.shape) for t in _outputs(out)]
    return None if got == shapes else f"output shapes {got} instead of {shapes}"


def apply_plans(
    model: nn.Module,
    example: Any,
    cfg: ChannelPrune,
    dg: tp.DependencyGraph,
    groups: list[Group],
    plans: list[Plan],
) -> list[Plan]:
    """Cut ``plans`` from ``model`` in place after checking them on a copy; returns those cut.

    A plan whose cut breaks the copy (an op the graph mis-handled) is reported as
    unsupported (warning or error, per ``cfg.on_unsupported``) and left out.
    """
    with eval_mode(model), torch.no_grad():
        shapes = [tuple(t.shape) for t in _outputs(call(model, example))]

    def trial(chosen: list[Plan]) -> str | None:
        twin = copy.deepcopy(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tdg, tgroups = prepare(twin, example, cfg)
        try:
            _cut(tdg, tgroups, chosen)
        except Exception as exc:  # the graph library failed on an op it mis-mapped
            return f"the cut itself: {type(exc).__name__}: {str(exc).strip()[:120]}"
        return _failure(twin, example, shapes)

    if plans and trial(plans) is not None:
        good = []
        for plan in plans:
            failure = trial([plan])
            if failure is None:
                good.append(plan)
            else:
                _report_unsupported(cfg, f"the group of {plan.group}: cutting it breaks {failure}")
        plans = good
    _cut(dg, groups, plans)
    return plans


# --------------------------------------------------------------------------------------
# targets: a fraction of the MACs, uniformly or from sensitivity
# --------------------------------------------------------------------------------------


def count_macs(model: nn.Module, example: torch.Tensor) -> int:
    """Dense MACs of one sample in Conv and Linear layers (forward hooks; fast).

    The same rule as :mod:`edgeslim.profiling.counting` for these layers -- output elements
    times ``weight.numel() / out_channels`` -- without tracing, for the ratio searches.
    """
    total = 0

    def hook(mod: nn.Module, _inputs: Any, out: torch.Tensor) -> None:
        nonlocal total
        total += out[:1].numel() * (mod.weight.numel() // mod.weight.shape[0])

    layers = [m for m in model.modules() if isinstance(m, ROOT_TYPES)]
    handles = [m.register_forward_hook(hook) for m in layers]
    try:
        with eval_mode(model), torch.no_grad():
            model(example[:1])
    finally:
        for h in handles:
            h.remove()
    return total


def macs_after(
    model: nn.Module, example: torch.Tensor, cfg: ChannelPrune, ratios: dict[str, float]
) -> int:
    """MACs of a copy of ``model`` pruned with per-group ``ratios`` (the model is untouched)."""
    twin = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dg, groups = prepare(twin, example, cfg)
        _cut(dg, groups, plan_groups(groups, cfg, ratios))
    return count_macs(twin, example)


def search(
    cost: Callable[[float], float], target: float, low: float, high: float, steps: int = 6
) -> float:
    """The smallest knob in [low, high] with ``cost(knob) <= target``, else ``high``.

    A coarse scan (12 points) finds the first feasible knob, then ``steps`` bisections refine
    it; the scan keeps the search right when ``cost`` is not quite monotone at the extremes.
    """
    grid = [low + (high - low) * k / 12 for k in range(1, 13)]
    previous = low
    for knob in grid:
        if cost(knob) <= target:
            break
        previous = knob
    else:
        return high
    for _ in range(steps):
        mid = (previous + knob) / 2
        if cost(mid) <= target:
            knob = mid
        else:
            previous = mid
    return knob


def fill_budget(
    model: nn.Module,
    example: torch.Tensor,
    cfg: ChannelPrune,
    groups: list[Group],
    ratios: dict[str, float],
    dense: int,
) -> dict[str, float]:
    """Give channels back, one ``round_to`` step at a time, while the MACs stay within budget.

    Rounding kept channels to a multiple of ``round_to`` can overshoot a MACs target by far (a
    16-wide group can only keep 8 or 16). Each pass offers every cut group, most-cut first,
    ``round_to`` more kept channels and keeps the change when the model still fits
    ``cfg.macs``; passes repeat until nothing fits.
    """
    ratios = {g.name: group_ratio(g, cfg, ratios) for g in groups}
    changed = True
    while changed:
        changed = False
        for g in sorted(groups, key=lambda g: -ratios[g.name]):
            if g.heads or ratios[g.name] <= 0:
                continue
            step = cfg.round_to / g.channels  # one more step of kept channels
            trial = {**ratios, g.name: max(0.0, ratios[g.name] - step)}
            if macs_after(model, example, cfg, trial) <= cfg.macs * dense:
                ratios, changed = trial, True
    return ratios


def ratios_for_macs(
    model: nn.Module,
    example: torch.Tensor,
    cfg: ChannelPrune,
    groups: list[Group],
    data: DataSplits | None = None,
) -> dict[str, float]:
    """Per-group ratios that keep about ``cfg.macs`` of the MACs (see ``cfg.allocation``)."""
    dense = count_macs(model, example)

    def fraction(ratios: dict[str, float]) -> float:
        return macs_after(model, example, cfg, ratios) / dense

    def filled(ratios: dict[str, float]) -> dict[str, float]:
        if cfg.round_to == 1 or not cfg.fill:
            return ratios
        return fill_budget(model, example, cfg, groups, ratios, dense)

    if cfg.allocation == "uniform":

        def uniform(r: float) -> dict[str, float]:
            return {g.name: r for g in groups}

        r = search(lambda r: fraction(uniform(r)), cfg.macs, 0.0, cfg.max_ratio)
        return filled(uniform(r))
    if data is None:
        raise ConfigError("ChannelPrune(allocation='sensitivity') needs data= (labelled splits)")
    from edgeslim.prune.sensitivity import SLOPE, channel_sensitivity

    sens = channel_sensitivity(model, data, example, cfg, cfg.probe_ratios)

    def ratios(drop: float) -> dict[str, float]:
        return sens.ratios_for_drop(drop, cfg.max_ratio, SLOPE)

    top = max(sens.worst_drop(), 0.0) + SLOPE * cfg.max_ratio + 1e-6  # probes may gain
    return filled(ratios(search(lambda d: fraction(ratios(d)), cfg.macs, 0.0, top)))


# --------------------------------------------------------------------------------------
# the verb
# --------------------------------------------------------------------------------------


def channel_prune_(
    model: nn.Module,
    cfg: ChannelPrune,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    *,
    example: Any = None,
    data: DataSplits | None = None,
    calib: Any = None,
) -> dict[str, float]:
    """Remove channels from ``model`` in place; returns each cut group's removed fraction.

    See :func:`cut_channels_` for the arguments.
    """
    plans = cut_channels_(model, cfg, filter_fn, example=example, data=data, calib=calib)
    return {p.group: len(p.remove) / p.channels for p in plans}


def replay_(model: nn.Module, example: Any, plans: list[dict[str, Any]]) -> None:
    """Cut the channels that :func:`cut_channels_` chose (its plans, as dicts) again.

    For a fresh copy of the original model, e.g. when a pipeline resumes after a channel
    pruning stage: the structure is redone, then the saved weights are loaded.
    """
    if isinstance(example, torch.Tensor):
        example = example[:1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dg, groups = prepare(model, example, ChannelPrune(ratio=0.5))
    known = {g.name for g in groups}
    chosen = [Plan(**p) for p in plans]
    missing = [p.group for p in chosen if p.group not in known]
    if missing:
        raise ConfigError(f"cannot replay channel pruning: no group named {missing} in the model")
    _cut(dg, groups, chosen)


def cut_channels_(
    model: nn.Module,
    cfg: ChannelPrune,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    *,
    example: Any = None,
    data: DataSplits | None = None,
    calib: Any = None,
) -> list[Plan]:
    """Remove channels from ``model`` in place; returns the plans that were cut.

    ``example`` (an input batch, or a dict of keyword inputs) is needed to trace the model.
    Layers for which ``filter_fn(module, name)`` is False are kept whole. ``data`` (or
    ``calib=(x, y)``) is needed for ``importance='taylor'`` and ``allocation='sensitivity'``;
    ``importance='activation'`` reads ``calib`` (inputs: a tensor batch, a dict of keyword
    inputs, or ``(x, y)``), else ``data``'s calibration set, else ``example``.
    """
    if example is None:
        raise ConfigError("ChannelPrune needs example= (an input batch) to trace the model's graph")
    if any(True for _ in iter_masks(model)):
        raise ConfigError(
            "the model carries unstructured pruning masks; call edgeslim.prune.remove_masks_ "
            "before structured pruning (or prune channels first)"
        )
    if isinstance(example, torch.Tensor):
        if example.dim() == 0 or example.shape[0] == 0:
            raise ShapeError(f"example must be a batch (B, ...), got shape {tuple(example.shape)}")
        example = example[:1]  # one sample traces the graph; checks stay cheap
    if filter_fn is not None:
        kept = [n for n, m in model.named_modules() if n and not filter_fn(m, n)]
        cfg = cfg.model_copy(update={"ignore": [*cfg.ignore, *kept]})
    if cfg.importance == "taylor":
        from edgeslim.prune.obd import calibration_pairs

        x, y = calibration_pairs(calib if calib is not None else data, cfg.samples)
        accumulate_gradients(model, x, y)
    if cfg.importance == "activation":
        inputs = calib[0] if isinstance(calib, tuple) else calib
        if inputs is None:
            inputs = data.calib(min(cfg.samples, len(data.train))) if data else example
        record_inputs(model, inputs)
    dg, groups = prepare(model, example, cfg)
    ratios = None
    if cfg.macs is not None:
        if not isinstance(example, torch.Tensor):
            raise ConfigError("ChannelPrune(macs=...) needs a tensor example to count MACs")
        ratios = ratios_for_macs(model, example, cfg, groups, data)
    plans = plan_groups(groups, cfg, ratios)
    done = apply_plans(model, example, cfg, dg, groups, plans)
    if cfg.importance == "taylor":
        model.zero_grad(set_to_none=True)
    forget_inputs(model)
    return done
