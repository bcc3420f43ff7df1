"""Layer-wise Optimal Brain Surgeon: prune each layer to keep its own output, then repair it.

Xin Dong, Shangyu Chen, Sinno Jialin Pan. "Learning to Prune Deep Neural Networks via
Layer-wise Optimal Brain Surgeon", NeurIPS 2017. https://arxiv.org/abs/1705.07565
(after Babak Hassibi, David G. Stork. "Second order derivatives for network pruning: Optimal
Brain Surgeon", NeurIPS 1992.)

Instead of the loss, each layer keeps its own output: for a layer y = W x with calibration
inputs x, the error of pruned weights W' is E||W x - W' x||^2, whose Hessian with respect to
each output row is the same matrix for every row::

    H = 2 E[x x^T]                                    (in, in)

It is exact (the error is quadratic) and cheap: one pass of calibration inputs
(:func:`edgeslim.core.hooks.run_calibration`). A Conv2d (``groups=1``) is a linear layer on
the unfolded input patches (in = C_in * k_h * k_w).

- Layer-wise OBD saliency (no update): s_ij = w_ij^2 H_jj / 2. An input that is always 0 (the
  border pixels of MNIST) has H_jj = 0, so its weights cost nothing; |w| cannot see that.
- Layer-wise OBS saliency: s_ij = w_ij^2 / (2 [H^-1]_jj), the error left after the other
  weights of row i have been moved to compensate (Hassibi & Stork). Removing a set P of a
  row at once, the best compensation keeps the output error minimal over the kept set
  K: W'_iK = (H_KK)^-1 (H w_i)_K, W'_iP = 0 -- the many-weight OBS update
  (delta w = -H^-1 e_P (e_P^T H^-1 e_P)^-1 w_P), solved here per row on the kept set. For one
  weight q it is delta w = -w_q / [H^-1]_qq * H^-1 e_q. (SparseGPT,
  :mod:`.sparsegpt`, approximates the same update column by column for layers too large to
  solve per row.)

How much of each layer to remove (``allocation``), since output errors of different layers
are not on one scale:

- ``magnitude``: each layer loses as many weights as one global |w| threshold at the same
  ``sparsity`` would remove from it (Han et al.), so only *which* weights go changes;
- ``normalized``: one global threshold on the saliency divided by the layer's output energy
  E||W x||^2 = tr(W H W^T) / 2 (a relative output error).

Scoring, choosing how much (:func:`allocate_masks`) and the update are separate steps.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from edgeslim.core.data.datasets import DataSplits
from edgeslim.core.errors import ConfigError, ShapeError
from edgeslim.core.hooks import run_calibration
from edgeslim.core.masks import get_mask
from edgeslim.core.registry import Context
from edgeslim.oneshot.stats import Hessian, wide_dtype
from edgeslim.prune.magnitude import (
    SparsityTarget,
    _keep_smallest_removed,
    apply_new_masks_,
    masks_from_scores,
    prunable_layers,
    target_layers,
)
from edgeslim.prune.registry import REGISTRY

Allocation = Literal["magnitude", "normalized"]


class OBSPrune(SparsityTarget):
    """Layer-wise Optimal Brain Surgeon (Dong et al. 2017): remove, then re-solve each row.

    Weights of lowest w^2 / (2 [H^-1]_jj) go, H = 2 E[x x^T] of each layer's inputs from
    ``samples`` calibration examples; each row's kept weights are then re-fit to keep the
    layer's output. Give ``sparsity`` (split over layers by ``allocation``) or
    ``layer_sparsity`` (per layer name or glob).
    """

    allocation: Allocation = "magnitude"
    samples: int = Field(512, ge=1, description="calibration inputs for H = 2 E[x x^T]")
    percdamp: float = Field(0.01, gt=0, description="damping of H, as a share of mean(diag H)")
    batch_size: int = Field(64, ge=1)
    seed: int = 0


# --------------------------------------------------------------------------------------
# the layer-wise Hessian H = 2 E[x x^T]
# --------------------------------------------------------------------------------------


def calibration_inputs(
    data: DataSplits | torch.Tensor | tuple[torch.Tensor, ...] | None, samples: int, seed: int = 0
) -> torch.Tensor:
    """``samples`` inputs: drawn (by ``seed``) from ``data.train``, or the given batch / (x, y)."""
    if data is None:
        raise ConfigError(
            "layer-wise OBD/OBS needs calibration inputs: pass data=DataSplits or calib=x "
            "(or calib=(x, y))"
        )
    if isinstance(data, DataSplits):
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(data.train), generator=g)[: min(samples, len(data.train))]
        return data.train.x[idx]
    x = data[0] if isinstance(data, tuple) else data
    if not isinstance(x, torch.Tensor) or x.dim() == 0 or len(x) == 0:
        raise ShapeError("calib must be a non-empty batch of inputs (N, ...) or a pair (x, y)")
    return x[:samples]


def _check_supported(name: str, module: nn.Module) -> None:
    conv2d = isinstance(module, nn.Conv2d) and module.groups == 1
    if conv2d and module.padding_mode != "zeros":
        conv2d = False
    if not (isinstance(module, nn.Linear) or conv2d):
        raise ConfigError(
            f"layer-wise OBD/OBS handles Linear and Conv2d (groups=1, zero padding) layers; "
            f"{name!r} is {module}: leave it out with exclude=[{name!r}] or filter_fn"
        )


def layer_inputs_2d(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The rows the layer multiplies by W (out, in): (N*, in) (unfolded patches for a conv)."""
    if isinstance(module, nn.Conv2d):
        cols = F.unfold(  # (N, C_in*kh*kw, L)
            x,
            module.kernel_size,
            dilation=module.dilation,
            padding=module.padding,
            stride=module.stride,
        )
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return x.reshape(-1, x.shape[-1])


def weight_2d(module: nn.Module) -> torch.Tensor:
    """A float64 copy of the weight as (out, in)."""
    w = module.weight.detach()
    return w.reshape(w.shape[0], -1).double()


def layer_hessians(
    model: nn.Module, layers: dict[str, nn.Module], x: torch.Tensor, batch_size: int = 64
) -> dict[str, torch.Tensor]:
    """H = 2 E[x x^T] (in, in), float64, of each layer's inputs as the model runs ``x``."""
    for name, module in layers.items():
        _check_supported(name, module)
    stats = {
        name: Hessian(
            weight_2d(m).shape[1],
            device=m.weight.device,
            dtype=wide_dtype(m.weight.device),  # small layers: float64 sums, as before
        )
        for name, m in layers.items()
    }

    def see(name: str, module: nn.Module, inputs: tuple, output: object) -> None:
        stats[name].add(layer_inputs_2d(module, inputs[0]))

    run_calibration(model, x, layers, see, batch_size=batch_size)
    return {name: s.h for name, s in stats.items()}


def damped(h: torch.Tensor, percdamp: float) -> torch.Tensor:
    """H + damp I, damp = percdamp * mean(diag H) (positive definite unless H = 0)."""
    damp = percdamp * float(torch.diag(h).mean()) or percdamp
    return h + damp * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)


# --------------------------------------------------------------------------------------
# saliencies and allocation
# --------------------------------------------------------------------------------------


def layerwise_obd_scores(
    layers: dict[str, nn.Module], hessians: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """w_ij^2 H_jj / 2 per weight, shaped like each weight (0 where input j is always 0)."""
    out = {}
    for name, m in layers.items():
        w = weight_2d(m)  # (out, in)
        out[name] = (w.pow(2) * torch.diag(hessians[name]).unsqueeze(0) / 2).reshape(m.weight.shape)
    return out


def obs_scores(
    layers: dict[str, nn.Module], hessians: dict[str, torch.Tensor], percdamp: float
) -> dict[str, torch.Tensor]:
    """w_ij^2 / (2 [H^-1]_jj) per weight with the damped H (0 where input j is always 0)."""
    out = {}
    for name, m in layers.items():
        h = hessians[name]
        w = weight_2d(m)  # (out, in)
        hinv_diag = torch.diag(torch.linalg.inv(damped(h, percdamp)))  # (in,)
        s = w.pow(2) / (2 * hinv_diag.unsqueeze(0))
        s[:, torch.diag(h) == 0] = 0  # a dead input: removing its weights changes nothing
        out[name] = s.reshape(m.weight.shape)
    return out


def output_energy(layers: dict[str, nn.Module], hessians: dict[str, torch.Tensor]) -> dict:
    """E||W x||^2 = tr(W H W^T) / 2 of each layer."""
    return {
        name: float(((weight_2d(m) @ hessians[name]) * weight_2d(m)).sum() / 2)
        for name, m in layers.items()
    }


def allocate_masks(
    layers: dict[str, nn.Module],
    scores: dict[str, torch.Tensor],
    hessians: dict[str, torch.Tensor],
    *,
    sparsity: float | None,
    layer_sparsity: dict[str, float] | None,
    allocation: Allocation,
) -> dict[str, torch.Tensor]:
    """Keep-masks removing the lowest layer-wise ``scores``, split over layers by ``allocation``.

    ``layer_sparsity`` is used as given. For a global ``sparsity``, ``magnitude`` takes each
    layer's count of removed weights from one global |w| threshold; ``normalized`` puts one
    threshold on score / E||W x||^2 of the layer.
    """
    if sparsity is None:
        return masks_from_scores(scores, None, layer_sparsity)
    if allocation == "normalized":
        energy = output_energy(layers, hessians)
        relative = {n: s / max(energy[n], 1e-30) for n, s in scores.items()}
        return masks_from_scores(relative, sparsity)
    magnitude = {n: m.weight.detach().abs() for n, m in layers.items()}
    counts = {n: int((~k).sum()) for n, k in masks_from_scores(magnitude, sparsity).items()}
    return {n: _keep_smallest_removed(scores[n], counts[n]) for n in scores}


def layerwise_masks(
    model: nn.Module,
    layers: dict[str, nn.Module],
    cfg: SparsityTarget,
    calib: Any,
    score: Callable[[dict[str, nn.Module], dict[str, torch.Tensor]], dict[str, torch.Tensor]],
    allocation: Allocation,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The layer-wise Hessians on ``cfg.samples`` calibration inputs, and the keep-masks of
    ``score(layers, hessians)`` at ``cfg``'s sparsity (OBD's and OBS's shared first half)."""
    x = calibration_inputs(calib, cfg.samples, cfg.seed)
    hessians = layer_hessians(model, layers, x, cfg.batch_size)
    masks = allocate_masks(
        layers,
        score(layers, hessians),
        hessians,
        sparsity=cfg.sparsity,
        layer_sparsity=cfg.layer_sparsity,
        allocation=allocation,
    )
    return hessians, masks


# --------------------------------------------------------------------------------------
# the update: re-fit each row on its kept weights
# --------------------------------------------------------------------------------------


@torch.no_grad()
def obs_update(w: torch.Tensor, h: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Pruned ``w`` (out, in) with each row's kept weights re-fit: W'_iK = (H_KK)^-1 (H w_i)_K.

    ``h`` (in, in) positive definite (damped), ``keep`` (out, in) bool. This minimises
    (w'_i - w_i)^T H (w'_i - w_i) with w'_iP = 0, i.e. the layer's output error, row by row.
    """
    hw = w.double() @ h  # (out, in): row i is (H w_i)^T
    new = torch.zeros_like(w, dtype=torch.float64)
    for i in range(w.shape[0]):
        kept = keep[i].nonzero().squeeze(1)  # (K,)
        if len(kept):
            new[i, kept] = torch.linalg.solve(h[kept][:, kept], hw[i, kept])
    return new.to(w.dtype)


# --------------------------------------------------------------------------------------
# the verb
# --------------------------------------------------------------------------------------


def obs_prune_(model: nn.Module, cfg: OBSPrune, ctx: Context) -> dict[str, float]:
    """Prune ``model`` in place by layer-wise OBS; returns each pruned layer's sparsity.

    Needs calibration inputs: ``data`` (``samples`` training inputs are drawn from it) or
    ``calib`` (a batch of inputs, or ``(x, y)``).
    """
    filter_fn, data, calib = ctx.filter_fn, ctx.data, ctx.calib
    layers = target_layers(prunable_layers(model, filter_fn), cfg.exclude, cfg.layer_sparsity)
    if not layers:
        raise ConfigError(f"{type(model).__name__} has no Conv or Linear layer to prune")
    hessians, masks = layerwise_masks(
        model,
        layers,
        cfg,
        calib if calib is not None else data,
        lambda layers, hessians: obs_scores(layers, hessians, cfg.percdamp),
        cfg.allocation,
    )
    for name, keep in masks.items():
        module = layers[name]
        old = get_mask(module, "weight")
        keep = masks[name] = keep & old if old is not None else keep  # masks only grow
        keep_2d = keep.reshape(keep.shape[0], -1)  # (out, in)
        w = obs_update(weight_2d(module), damped(hessians[name], cfg.percdamp), keep_2d)
        with torch.no_grad():
            module.weight.copy_(w.reshape(module.weight.shape).to(module.weight.dtype))
    return apply_new_masks_(layers, masks)


REGISTRY.register("obs", OBSPrune, obs_prune_, takes=("filter_fn", "data", "calib"))
