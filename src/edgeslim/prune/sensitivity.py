"""Sensitivity analysis: how much does pruning each layer alone cost?

Hao Li et al. "Pruning Filters for Efficient ConvNets", ICLR 2017 (sec. 4.1, per-layer
sensitivity); Song Han et al. 2015 (fig. 6); the method of Distiller and NNCF.

Each layer (``kind="unstructured"``: its smallest-magnitude weights) or each coupled channel
group (``kind="channel"``: its least important channels, physically removed from a copy) is
pruned *alone* at each ratio, with everything else dense, and the model is scored on the
validation split: ``accuracy`` (top-1) or ``fidelity`` (mean cosine similarity of the outputs
to the dense model's, for models without labels). One curve per layer.

From the curves (linearly interpolated) per-layer ratios follow:

- :meth:`Sensitivity.ratios_for_drop`: each layer gets the largest ratio whose own drop
  stays within ``max_drop`` (an allowed accuracy drop);
- :meth:`Sensitivity.ratios_for_sparsity`: the smallest common drop whose ratios remove a
  global fraction of the weights (unstructured); :class:`.channel.ChannelPrune` does the
  same for a MACs target (:mod:`.budget`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from rich.table import Table
from torch import nn

from edgeslim.core.data.datasets import DataSplits
from edgeslim.core.device import model_device
from edgeslim.core.errors import ConfigError
from edgeslim.core.hooks import eval_mode
from edgeslim.core.masks import get_mask
from edgeslim.core.plotting import new_figure, save_png
from edgeslim.core.progress import enabled, progress_bar
from edgeslim.core.selection import FilterFn
from edgeslim.core.train import evaluate
from edgeslim.prune.groups import prepare
from edgeslim.prune.magnitude import _keep_smallest_removed, prunable_layers
from edgeslim.prune.plan import ProbeOptions, plan_groups
from edgeslim.prune.surgery import zeroed

Metric = Literal["accuracy", "fidelity"]
DEFAULT_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
SLOPE = 0.01  # tie-break for target searches: 1 point of score per 100% of a layer removed


@dataclass
class Sensitivity:
    """Per-layer curves: score after pruning that layer alone at each of ``ratios``."""

    kind: str  # "unstructured" (fraction of weights) or "channel" (fraction of channels)
    metric: str
    baseline: float  # the dense model's score
    ratios: list[float]
    curves: dict[str, list[float]]  # layer or group -> score at each ratio
    sizes: dict[str, int] = field(default_factory=dict)  # weights / channels per layer

    def drop(self, name: str, ratio: float) -> float:
        """Interpolated score drop of layer ``name`` pruned alone at ``ratio`` (0 at 0)."""
        xs = [0.0, *self.ratios]
        ys = [0.0, *(self.baseline - s for s in self.curves[name])]
        return float(np.interp(ratio, xs, ys))

    def ratio_for_drop(
        self, name: str, max_drop: float, max_ratio: float = 0.95, slope: float = 0.0
    ) -> float:
        """Largest ratio (step 0.005) up to which the layer's drop never exceeds ``max_drop``.

        ``slope`` charges every ratio a small extra drop (``slope * ratio``): layers whose
        curve is flat then get ratios that grow steadily with ``max_drop`` instead of jumping
        to ``max_ratio`` at once, which makes a search for a global target continuous.
        """
        best, worst = 0.0, 0.0
        for r in np.arange(0.005, max_ratio + 1e-9, 0.005):
            worst = max(worst, self.drop(name, float(r)))
            if worst + slope * float(r) > max_drop + 1e-12:
                break
            best = float(r)
        return best

    def ratios_for_drop(
        self, max_drop: float, max_ratio: float = 0.95, slope: float = 0.0
    ) -> dict[str, float]:
        """Each layer's largest ratio whose own drop stays within ``max_drop``."""
        if max_drop < 0:
            raise ConfigError(f"max_drop must be >= 0, got {max_drop}")
        return {n: self.ratio_for_drop(n, max_drop, max_ratio, slope) for n in self.curves}

    def worst_drop(self) -> float:
        """The largest drop any layer shows at any ratio (an upper end for searches)."""
        return max(self.baseline - min(c) for c in self.curves.values())

    def ratios_for_sparsity(
        self, target: float, max_ratio: float = 0.95, slope: float = SLOPE
    ) -> dict[str, float]:
        """Per-layer sparsities removing ``target`` of all weights at the least common drop."""
        if self.kind != "unstructured":
            raise ConfigError("ratios_for_sparsity needs an unstructured sensitivity analysis")
        total = sum(self.sizes.values())
        if not 0 <= target <= max_ratio:
            raise ConfigError(f"target sparsity {target} must be in [0, {max_ratio}]")

        def removed(d: float) -> float:
            ratios = self.ratios_for_drop(d, max_ratio, slope)
            return sum(self.sizes[n] * r for n, r in ratios.items())

        low, high = 0.0, self.worst_drop() + slope * max_ratio + 1e-6
        if removed(high) < target * total:
            return dict.fromkeys(self.curves, max_ratio)
        for _ in range(30):
            mid = (low + high) / 2
            low, high = (low, mid) if removed(mid) >= target * total else (mid, high)
        return self.ratios_for_drop(high, max_ratio, slope)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self, title: str | None = None) -> Table:
        """A rich table: one row per layer, one column per ratio (score in %)."""
        table = Table(title=title, caption=f"dense {self.metric}: {100 * self.baseline:.2f}%")
        table.add_column("layer" if self.kind == "unstructured" else "group")
        table.add_column("size", justify="right")
        for r in self.ratios:
            table.add_column(f"{r:.0%}", justify="right")
        for name, scores in self.curves.items():
            table.add_row(name, f"{self.sizes.get(name, 0):,}", *(f"{100 * s:.1f}" for s in scores))
        return table

    def plot(self, path: str | Path) -> Path:
        """Save the curves as a PNG (one line per layer)."""
        fig = new_figure(6.4, 4.2)
        ax = fig.add_subplot(1, 1, 1)
        for name, scores in self.curves.items():
            ax.plot([0, *self.ratios], [self.baseline, *scores], marker=".", label=name)
        what = "weights" if self.kind == "unstructured" else "channels"
        ax.set_xlabel(f"fraction of the layer's {what} removed (that layer alone)")
        ax.set_ylabel(self.metric)
        ax.grid(alpha=0.3)
        if len(self.curves) <= 16:
            ax.legend(fontsize=6, ncol=2)
        return save_png(fig, Path(path))


# --------------------------------------------------------------------------------------
# scoring one probe
# --------------------------------------------------------------------------------------


def _scorer(model: nn.Module, data: DataSplits, metric: Metric, samples: int):
    """A function ``model -> score`` on the validation split."""
    if metric == "accuracy":
        return lambda m: evaluate(m, data, "val")
    x = data.val.x[:samples].to(model_device(model))  # the probes run where the model is
    with eval_mode(model), torch.no_grad():
        reference = model(x).flatten(1)

    def fidelity(m: nn.Module) -> float:
        with eval_mode(m), torch.no_grad():
            out = m(x).flatten(1)
        return float(F.cosine_similarity(out, reference, dim=1).mean())

    return fidelity


def _check_ratios(ratios: tuple[float, ...] | list[float]) -> list[float]:
    ratios = sorted(float(r) for r in ratios)
    if not ratios or ratios[0] <= 0 or ratios[-1] >= 1:
        raise ConfigError(f"sensitivity ratios must be in (0, 1), got {ratios}")
    return ratios


# --------------------------------------------------------------------------------------
# the two analyses
# --------------------------------------------------------------------------------------


@torch.no_grad()
def unstructured_sensitivity(
    model: nn.Module,
    data: DataSplits,
    ratios: tuple[float, ...] | list[float] = DEFAULT_RATIOS,
    metric: Metric = "accuracy",
    filter_fn: FilterFn | None = None,
    *,
    samples: int = 256,
    progress: bool | None = None,
) -> Sensitivity:
    """Prune each Conv/Linear layer alone by magnitude at each ratio; score; restore."""
    ratios = _check_ratios(ratios)
    layers = prunable_layers(model, filter_fn)
    if not layers:
        raise ConfigError(f"{type(model).__name__} has no Conv or Linear layer to analyse")
    score = _scorer(model, data, metric, samples)
    result = Sensitivity("unstructured", metric, score(model), ratios, {}, {})
    with progress_bar(disable=not enabled(progress)) as bar:
        task = bar.add_task("sensitivity", total=len(layers) * len(ratios))
        for name, layer in layers.items():
            original = layer.weight.detach().clone()
            old = get_mask(layer, "weight")
            scores = original.abs().masked_fill(~old, -1) if old is not None else original.abs()
            curve = []
            for r in ratios:
                keep = _keep_smallest_removed(scores, round(r * original.numel()))
                layer.weight.copy_(original * keep)
                curve.append(score(model))
                bar.update(task, advance=1)
            layer.weight.copy_(original)
            result.curves[name] = curve
            result.sizes[name] = original.numel()
    return result


def channel_sensitivity(
    model: nn.Module,
    data: DataSplits,
    example: torch.Tensor,
    cfg: Any = None,
    ratios: tuple[float, ...] | list[float] = DEFAULT_RATIOS,
    metric: Metric = "accuracy",
    *,
    samples: int = 256,
    progress: bool | None = None,
) -> Sensitivity:
    """Remove channels of each coupled group alone (zeroed in place) at each ratio; score.

    ``cfg`` (a :class:`~edgeslim.prune.ChannelPrune`) sets importance, rounding and ignored
    layers; its own target is not used. Without it, ``ChannelPrune``'s defaults.
    """
    ratios = _check_ratios(ratios)
    base = ProbeOptions() if cfg is None else cfg.model_copy(update={"max_ratio": 0.99})
    score = _scorer(model, data, metric, samples)
    dg, groups = prepare(model, example, base)
    if not groups:
        raise ConfigError(f"{type(model).__name__} has no channel group that can be pruned")
    result = Sensitivity("channel", metric, score(model), ratios, {}, {})
    with progress_bar(disable=not enabled(progress)) as bar:
        task = bar.add_task("channel sensitivity", total=len(groups) * len(ratios))
        for g in groups:
            curve = []
            for r in ratios:
                plans = plan_groups([g], base, {g.name: r})
                with zeroed(dg, g, plans[0].remove if plans else []):
                    curve.append(score(model))
                bar.update(task, advance=1)
            result.curves[g.name] = curve
            result.sizes[g.name] = g.channels
    return result


def sensitivity(
    model: nn.Module,
    data: DataSplits,
    *,
    kind: Literal["unstructured", "channel"] = "unstructured",
    ratios: tuple[float, ...] | list[float] = DEFAULT_RATIOS,
    metric: Metric = "accuracy",
    example: torch.Tensor | None = None,
    cfg: Any = None,
    filter_fn: FilterFn | None = None,
    progress: bool | None = None,
) -> Sensitivity:
    """Per-layer sparsity vs score curves of ``model`` on ``data.val`` (see the module doc).

    ``kind="channel"`` removes channels (needs ``example``, default ``data.example()``);
    ``cfg`` is then a :class:`ChannelPrune` whose importance and ignores are used.
    """
    if kind == "unstructured":
        return unstructured_sensitivity(model, data, ratios, metric, filter_fn, progress=progress)
    if kind == "channel":
        example = data.example() if example is None else example
        example = example.to(model_device(model))  # traced where the model is
        return channel_sensitivity(model, data, example, cfg, ratios, metric, progress=progress)
    raise ConfigError(f"sensitivity kind must be 'unstructured' or 'channel', got {kind!r}")
