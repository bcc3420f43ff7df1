"""Model surgery: physically remove the planned channels, checked on a copy first.

The cut (:func:`cut`) is Torch-Pruning's: every layer of a group loses the same channels, and
attention modules get their head counts updated. :func:`apply_plans` first cuts a copy (the
pruned copy must run and give outputs of the same shape; a group that breaks it is reported
like an unsupported op), then the model. :func:`replay_` redoes recorded plans on a fresh
copy of the original model; :func:`zeroed` imitates a cut without doing it (for probes).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from edgeslim.core.errors import ConfigError
from edgeslim.core.hooks import eval_mode, output_tensors
from edgeslim.prune.groups import (
    HEAD_COUNTS,
    Group,
    GroupOptions,
    call,
    head_count,
    prepare,
    report_unsupported,
)
from edgeslim.prune.plan import Plan, ProbeOptions


def cut(dg: tp.DependencyGraph, groups: list[Group], plans: list[Plan]) -> None:
    """Remove each plan's channels from its group (and heads from its attention modules)."""
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
    got = [tuple(t.shape) for t in output_tensors(out)]
    return None if got == shapes else f"output shapes {got} instead of {shapes}"


def apply_plans(
    model: nn.Module,
    example: Any,
    cfg: GroupOptions,
    dg: tp.DependencyGraph,
    groups: list[Group],
    plans: list[Plan],
) -> list[Plan]:
    """Cut ``plans`` from ``model`` in place after checking them on a copy; returns those cut.

    A plan whose cut breaks the copy (an op the graph mis-handled) is reported as
    unsupported (warning or error, per ``cfg.on_unsupported``) and left out.
    """
    with eval_mode(model), torch.no_grad():
        shapes = [tuple(t.shape) for t in output_tensors(call(model, example))]

    def trial(chosen: list[Plan]) -> str | None:
        twin = copy.deepcopy(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tdg, tgroups = prepare(twin, example, cfg)
        try:
            cut(tdg, tgroups, chosen)
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
                report_unsupported(cfg, f"the group of {plan.group}: cutting it breaks {failure}")
        plans = good
    cut(dg, groups, plans)
    return plans


def replay_(model: nn.Module, example: Any, plans: list[dict[str, Any]]) -> None:
    """Cut the channels that :func:`~edgeslim.prune.channel.channel_prune_` chose again.

    ``plans`` are its plans, as dicts. For a fresh copy of the original model, e.g. when a
    pipeline resumes after a channel pruning stage: the structure is redone, then the saved
    weights are loaded.
    """
    if isinstance(example, torch.Tensor):
        example = example[:1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dg, groups = prepare(model, example, ProbeOptions())
    known = {g.name for g in groups}
    chosen = [Plan(**p) for p in plans]
    missing = [p.group for p in chosen if p.group not in known]
    if missing:
        raise ConfigError(f"cannot replay channel pruning: no group named {missing} in the model")
    cut(dg, groups, chosen)
