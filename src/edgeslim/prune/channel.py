"""Structured pruning: remove whole channels, filters, FFN neurons and attention heads.

Gongfan Fang et al. "DepGraph: Towards Any Structural Pruning", CVPR 2023.
https://arxiv.org/abs/2301.12900 (the dependency graph, from the ``torch-pruning`` package)

Unlike masks, this makes the model physically smaller: a conv with 64 filters becomes a conv
with 32, so dense runtimes (PyTorch, ONNX Runtime) really run fewer MACs. Layers tied by the
graph are cut together -- the BatchNorm after a conv, every conv feeding the same residual add,
both sides of a depthwise conv, the slices of a concat, the input columns of each consumer, the
query/key/value/output projections of an attention head -- so the model stays consistent.

This module holds the config and the verb; the steps live apart:

1. **groups** (:mod:`.groups`): the coupled groups, and the ops that cannot be pruned, named.
2. **importance** (:mod:`.importance`): one score per channel of a group.
3. **plan** (:mod:`.plan`): per group, a ratio (uniform ``ratio``, per-layer ``layer_ratio``,
   or found for a ``macs`` target by :mod:`.budget`, uniformly or from a sensitivity
   analysis), rounded to ``round_to``; the lowest-importance channels are chosen.
4. **surgery** (:mod:`.surgery`): checked on a copy first, then done on the model; replayed
   from recorded plans on resume.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Literal

import torch
from pydantic import ConfigDict, Field, model_validator
from torch import nn

from edgeslim.core.device import model_device, to_device
from edgeslim.core.errors import ConfigError, ShapeError
from edgeslim.core.hooks import no_kv_cache
from edgeslim.core.linear import conv1d_to_linear_
from edgeslim.core.masks import iter_masks
from edgeslim.core.options import Options
from edgeslim.core.registry import Context
from edgeslim.prune.budget import ratios_for_macs
from edgeslim.prune.groups import prepare
from edgeslim.prune.importance import Importance, accumulate_gradients, forget_inputs, record_inputs
from edgeslim.prune.plan import plan_groups
from edgeslim.prune.registry import REGISTRY, STRUCTURAL_TAKES
from edgeslim.prune.surgery import apply_plans, replay_

__all__ = ["ChannelPrune", "channel_prune_"]


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
        self.require_one_of("ratio", "layer_ratio", "macs")
        for name, r in (self.layer_ratio or {}).items():
            if not 0 <= r < 1:
                raise ValueError(f"layer_ratio[{name!r}] = {r} must be in [0, 1)")
        return self


def channel_prune_(model: nn.Module, cfg: ChannelPrune, ctx: Context) -> dict[str, Any]:
    with no_kv_cache(model):  # traced without a key/value cache in the outputs
        return _channel_prune(model, cfg, ctx)


def _channel_prune(model: nn.Module, cfg: ChannelPrune, ctx: Context) -> dict[str, Any]:
    """Remove channels from ``model`` in place; returns each cut group's removed fraction
    (``removed``) and the plans that were cut (``cut``: what :func:`replay_` redoes).

    ``example`` (an input batch, or a dict of keyword inputs) is needed to trace the model.
    Layers for which ``filter_fn(module, name)`` is False are kept whole. ``data`` (or
    ``calib=(x, y)``) is needed for ``importance='taylor'`` and ``allocation='sensitivity'``;
    ``importance='activation'`` reads ``calib`` (inputs: a tensor batch, a dict of keyword
    inputs, or ``(x, y)``), else ``data``'s calibration set, else ``example``.
    """
    filter_fn, example, data, calib = ctx.filter_fn, ctx.example, ctx.data, ctx.calib
    if example is None:
        raise ConfigError("ChannelPrune needs example= (an input batch) to trace the model's graph")
    if any(True for _ in iter_masks(model)):
        raise ConfigError(
            "the model carries unstructured pruning masks; call edgeslim.prune.remove_masks_ "
            "before structured pruning (or prune channels first)"
        )
    conv1d_to_linear_(model)  # GPT-2's Conv1D: the graph knows nn.Linear (same outputs)
    if isinstance(example, torch.Tensor):
        if example.dim() == 0 or example.shape[0] == 0:
            raise ShapeError(f"example must be a batch (B, ...), got shape {tuple(example.shape)}")
        example = example[:1]  # one sample traces the graph; checks stay cheap
    example = to_device(example, model_device(model))  # traced where the model is
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
    if not any(p.remove for p in done):
        import warnings

        why = (
            f"it found no channel group it can prune in {type(model).__name__} (only Conv, "
            "Linear and norm layers are cut; recurrent, attention-internal and ignored layers "
            "are not)"
            if not groups
            else f"the {len(groups)} prunable groups all round to zero channels at this ratio"
        )
        warnings.warn(f"ChannelPrune removed no channel: {why}", stacklevel=2)
    if cfg.importance == "taylor":
        model.zero_grad(set_to_none=True)
    forget_inputs(model)
    return {
        "removed": {p.group: len(p.remove) / p.channels for p in done},
        "cut": [asdict(p) for p in done],  # what a resumed run replays (replay_)
    }


def replay_channels_(model: nn.Module, cfg: ChannelPrune, log: dict, example: Any) -> nn.Module:
    """Cut the channels a ``ChannelPrune`` log records (its ``cut`` plans) again."""
    conv1d_to_linear_(model)  # as channel_prune_ did before cutting
    with no_kv_cache(model):
        replay_(model, example, log.get("cut", []))
    return model


REGISTRY.register(
    "channel", ChannelPrune, channel_prune_, takes=STRUCTURAL_TAKES, replay=replay_channels_
)
