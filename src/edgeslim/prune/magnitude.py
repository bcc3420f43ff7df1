"""Unstructured magnitude pruning, the way Han et al. did it.

Song Han, Jeff Pool, John Tran, William J. Dally. "Learning both Weights and Connections for
Efficient Neural Networks", NeurIPS 2015. https://arxiv.org/abs/1506.02626

The weights whose magnitude falls below a threshold are removed. Three ways to set it:

- ``quality``: per layer, threshold = quality x std(layer weights) (the paper's rule);
- ``layer_sparsity``: an explicit fraction of each named layer to remove;
- ``sparsity``: one global fraction, with a single magnitude threshold across all layers.

Scoring (|w|), choosing how much (here) and masking (:mod:`.masks`) are separate steps;
iterative prune -> fine-tune cycles live in :mod:`.schedule`. Masks only ever grow: a weight
once pruned stays pruned.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field, model_validator
from torch import nn

from edgeslim.core.errors import ConfigError
from edgeslim.core.linear import is_linear, skip_tied
from edgeslim.core.masks import get_mask, set_mask_
from edgeslim.core.options import Options
from edgeslim.core.registry import Context
from edgeslim.core.selection import FilterFn, lookup_layer, matches, select_layers, unmatched
from edgeslim.prune.registry import REGISTRY

PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class SparsityTarget(Options):
    """How much to prune, shared by the unstructured pruners (magnitude, OBD, OBS).

    Exactly one target field (``TARGETS``) must be given: ``sparsity`` (one number for the
    model) or ``layer_sparsity`` (per layer name; glob patterns such as ``"conv*"`` allowed).
    Layers matching ``exclude`` are left dense.
    """

    TARGETS: ClassVar[tuple[str, ...]] = ("sparsity", "layer_sparsity")
    graded: ClassVar[bool] = True  # scaled(): reachable in steps (iterative, AGP)

    sparsity: float | None = Field(None, ge=0, lt=1)
    layer_sparsity: dict[str, float] | None = None
    exclude: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check_target(self) -> SparsityTarget:
        given = [k for k in self.TARGETS if getattr(self, k) is not None]
        if len(given) != 1:
            names = [repr(k) for k in self.TARGETS]
            raise ValueError(
                f"give exactly one of {', '.join(names[:-1])} or {names[-1]}"
                + (f" (got {', '.join(given)})" if given else "")
            )
        for name, s in (self.layer_sparsity or {}).items():
            if not 0 <= s < 1:
                raise ValueError(f"layer_sparsity[{name!r}] = {s} must be in [0, 1)")
        return self

    def scaled(self, fraction: float) -> SparsityTarget:
        """This target ``fraction`` of the way from dense (for iterative schedules).

        Sparsities move geometrically in density (each step removes the same share of the
        remaining weights): density_k = density ** fraction.
        """

        def sp(s: float) -> float:
            return 1 - (1 - s) ** fraction

        update: dict[str, object] = {}
        if self.sparsity is not None:
            update["sparsity"] = sp(self.sparsity)
        if self.layer_sparsity is not None:
            update["layer_sparsity"] = {k: sp(v) for k, v in self.layer_sparsity.items()}
        return self.model_copy(update=update)


class MagnitudePrune(SparsityTarget):
    """Remove the smallest-magnitude weights (Han et al. 2015).

    Give exactly one of ``sparsity`` (global), ``layer_sparsity`` (per layer name; glob
    patterns such as ``"conv*"`` allowed) or ``quality`` (threshold = quality x std of each
    layer's weights; one number or per-layer). Layers matching ``exclude`` are left dense.
    """

    TARGETS: ClassVar[tuple[str, ...]] = ("sparsity", "layer_sparsity", "quality")

    quality: float | dict[str, float] | None = None

    @model_validator(mode="after")
    def _check_quality(self) -> MagnitudePrune:
        qualities = self.quality if isinstance(self.quality, dict) else {"*": self.quality or 0}
        for name, q in qualities.items():
            if q < 0:
                raise ValueError(f"quality[{name!r}] = {q} must be >= 0")
        return self

    def scaled(self, fraction: float) -> MagnitudePrune:
        """As :meth:`SparsityTarget.scaled`; ``quality`` scales linearly."""
        out = super().scaled(fraction)
        if self.quality is None:
            return out
        q = self.quality
        scaled_q = {k: v * fraction for k, v in q.items()} if isinstance(q, dict) else q * fraction
        return out.model_copy(update={"quality": scaled_q})


def prunable_layers(model: nn.Module, filter_fn: FilterFn | None = None) -> dict[str, nn.Module]:
    """Conv and Linear layers by name, narrowed by ``filter_fn(module, name)`` if given.

    Linear layers include transformers' ``Conv1D`` (GPT-2's, see ``core.linear.is_linear``).
    """
    layers = select_layers(model, filter_fn=filter_fn)
    return {n: m for n, m in layers.items() if isinstance(m, PRUNABLE) or is_linear(m)}


def _keep_smallest_removed(scores: torch.Tensor, n_remove: int) -> torch.Tensor:
    """Bool mask keeping all but the ``n_remove`` lowest scores (stable: exact count)."""
    keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if n_remove > 0:
        order = torch.argsort(scores.reshape(-1), stable=True)
        keep[order[:n_remove]] = False
    return keep.reshape(scores.shape)


def target_layers(
    layers: dict[str, nn.Module], exclude: list[str], layer_sparsity: dict[str, float] | None
) -> dict[str, nn.Module]:
    """``layers`` without the ``exclude`` patterns; every ``layer_sparsity`` key must match one."""
    layers = {n: m for n, m in layers.items() if not matches(n, exclude)}
    if layer_sparsity is not None:
        unknown = unmatched(layer_sparsity, layers)
        if unknown:
            raise ConfigError(
                f"layer_sparsity names {unknown} match no prunable layer; "
                f"prunable layers: {list(layers)}"
            )
    return layers


def masks_from_scores(
    scores: dict[str, torch.Tensor],
    sparsity: float | None = None,
    layer_sparsity: dict[str, float] | None = None,
) -> dict[str, torch.Tensor]:
    """Keep-masks removing the lowest ``scores``: one global ``sparsity`` or per layer.

    Any saliency works (|w| for magnitude, h w^2 / 2 for OBD): with ``sparsity`` one threshold
    runs across all layers; with ``layer_sparsity`` (exact names or glob patterns) each
    matching layer loses its own fraction, the others are left out.
    """
    masks: dict[str, torch.Tensor] = {}
    if sparsity is not None:  # one global threshold
        flat = torch.cat([s.reshape(-1) for s in scores.values()])
        keep = _keep_smallest_removed(flat, round(sparsity * flat.numel()))
        start = 0
        for name, s in scores.items():
            masks[name] = keep[start : start + s.numel()].reshape(s.shape)
            start += s.numel()
        return masks
    for name, s in scores.items():
        fraction = lookup_layer(layer_sparsity or {}, name)
        if fraction is not None:
            masks[name] = _keep_smallest_removed(s, round(fraction * s.numel()))
    return masks


def magnitude_masks(cfg: MagnitudePrune, layers: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """New keep-masks for each layer's weight (pure: the model is not changed)."""
    layers = target_layers(layers, cfg.exclude, cfg.layer_sparsity)
    if cfg.quality is None:
        scores = {name: m.weight.detach().abs() for name, m in layers.items()}
        return masks_from_scores(scores, cfg.sparsity, cfg.layer_sparsity)
    masks: dict[str, torch.Tensor] = {}
    for name, m in layers.items():
        w = m.weight.detach()
        q = lookup_layer(cfg.quality, name) if isinstance(cfg.quality, dict) else cfg.quality
        if q is None:
            continue
        old = get_mask(m, "weight")
        alive = w[old] if old is not None else w  # std over the surviving weights
        threshold = q * float(alive.std()) if alive.numel() > 1 else 0.0
        masks[name] = w.abs() > threshold
    return masks


def apply_new_masks_(
    layers: dict[str, nn.Module], masks: dict[str, torch.Tensor]
) -> dict[str, float]:
    """Set each layer's weight mask (AND the old one: a pruned weight stays pruned).

    Returns each masked layer's sparsity.
    """
    result: dict[str, float] = {}
    for name, keep in masks.items():
        module = layers[name]
        old = get_mask(module, "weight")
        if old is not None:
            keep = keep & old
        set_mask_(module, "weight", keep)
        result[name] = 1 - float(keep.float().mean())
    return result


def magnitude_prune_(model: nn.Module, cfg: MagnitudePrune, ctx: Context) -> dict[str, float]:
    """Prune ``model`` in place; returns each pruned layer's sparsity.

    Transformers' ``Conv1D`` layers (GPT-2's linear layers) are pruned like ``nn.Linear``
    (the score is element-wise, so their transposed layout does not matter). A layer whose
    weight is tied to another module's (a tied ``lm_head``) is left dense, with a warning:
    pruning it would zero the same entries of the input embedding.
    """
    filter_fn = ctx.filter_fn
    layers = prunable_layers(model, filter_fn)  # Conv1D included
    layers = skip_tied(layers, model, "MagnitudePrune")
    if not layers:
        raise ConfigError(f"{type(model).__name__} has no Conv or Linear layer to prune")
    return apply_new_masks_(layers, magnitude_masks(cfg, layers))


REGISTRY.register("magnitude", MagnitudePrune, magnitude_prune_, takes=("filter_fn",))
