"""Optimal Brain Damage: prune the weights whose removal costs the least loss.

Yann LeCun, John S. Denker, Sara A. Solla. "Optimal Brain Damage", NeurIPS 1989.
https://papers.nips.cc/paper/1989/hash/6c9882bbac1c7093bd25041881277658-Abstract.html

A second-order Taylor expansion of the loss around a trained minimum, with the Hessian taken
as diagonal, says that zeroing weight k raises the loss by the *saliency*

    s_k = h_kk * w_k^2 / 2

The diagonal h_kk is estimated on labelled calibration data in one of two ways:

- ``fisher``: the empirical Fisher / Gauss-Newton approximation, h_kk ~ mean over samples of
  (d loss_i / d w_k)^2, from per-sample gradients (``torch.func.vmap``);
- ``hutchinson``: h_kk ~ mean over Rademacher vectors z of z_k (H z)_k, with Hessian-vector
  products by double back-propagation (Hutchinson's estimator; |h_kk| is used, since a
  finite-sample estimate can come out negative);
- ``layerwise``: not the loss but each layer's own output error E||W x - W' x||^2, whose
  Hessian H = 2 E[x x^T] is exact and the same for every output row (Dong et al. 2017,
  :mod:`.obs`): s_ij = w_ij^2 H_jj / 2. It needs only unlabelled inputs. Since output errors
  of different layers are not on one scale, ``allocation`` splits a global ``sparsity`` over
  layers: ``magnitude`` (each layer loses as many weights as a global |w| threshold takes from
  it; the default for ``layerwise``) or ``normalized`` (one threshold on s / E||W x||^2).
  :class:`.obs.OBSPrune` adds the Optimal Brain Surgeon update of the kept weights.

With the loss Hessian, one global threshold (``allocation="global"``, the default) runs over
all layers, as in the paper.

Scoring (:func:`hessian_diagonal`, :func:`obd_scores`) is separate from choosing how much to
remove (the same ``sparsity`` / ``layer_sparsity`` targets as :class:`MagnitudePrune`, via
:func:`.magnitude.masks_from_scores`) and from masking (:mod:`edgeslim.core.masks`). OBD works
wherever magnitude does: one-shot, iterative (``scaled``), AGP and N:M (``NMPrune(score="obd")``).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from edgeslim.core.data.datasets import DataSplits
from edgeslim.core.device import model_device
from edgeslim.core.errors import ConfigError, ShapeError
from edgeslim.core.hooks import eval_mode
from edgeslim.core.registry import Context
from edgeslim.prune.magnitude import (
    SparsityTarget,
    apply_new_masks_,
    masks_from_scores,
    prunable_layers,
    target_layers,
)
from edgeslim.prune.obs import (
    allocate_masks,
    layerwise_masks,
    layerwise_obd_scores,
)
from edgeslim.prune.registry import REGISTRY

Calib = DataSplits | tuple[torch.Tensor, torch.Tensor]


class OBDPrune(SparsityTarget):
    """Remove the weights of lowest OBD saliency h_kk w_k^2 / 2 (LeCun et al. 1989).

    Give ``sparsity`` (one global threshold on saliency) or ``layer_sparsity`` (per layer
    name or glob). The Hessian diagonal comes from ``samples`` training examples: of the
    loss (``fisher``, ``hutchinson``; labelled) or of each layer's output error
    (``layerwise``; inputs only). ``allocation`` splits a global ``sparsity`` over layers:
    ``global`` (one saliency threshold; default for the loss Hessian), ``magnitude`` (the
    per-layer counts of a global |w| threshold; default for ``layerwise``) or ``normalized``
    (layer-wise only: one threshold on saliency / the layer's output energy).
    """

    hessian: Literal["fisher", "hutchinson", "layerwise"] = "fisher"
    allocation: Literal["global", "magnitude", "normalized"] | None = Field(
        None, description="how a global sparsity is split over layers (None: by hessian)"
    )
    samples: int = Field(256, ge=1, description="labelled examples for the Hessian estimate")
    probes: int = Field(8, ge=1, description="Rademacher vectors per batch (hutchinson)")
    damping: float = Field(
        0.0, ge=0, description="add damping x mean(h) to every h_kk (Levenberg-Marquardt)"
    )
    batch_size: int = Field(64, ge=1)
    seed: int = 0

    @model_validator(mode="after")
    def _check_allocation(self) -> OBDPrune:
        if self.hessian == "layerwise" and self.allocation == "global":
            raise ValueError(
                "hessian='layerwise' saliencies of different layers are not on one scale: "
                "use allocation='magnitude' or 'normalized' (or layer_sparsity)"
            )
        if self.hessian != "layerwise" and self.allocation == "normalized":
            raise ValueError("allocation='normalized' needs hessian='layerwise'")
        return self

    @property
    def split(self) -> Literal["global", "magnitude", "normalized"]:
        """The allocation in force: ``allocation``, or the default of the ``hessian``."""
        if self.allocation is not None:
            return self.allocation
        return "magnitude" if self.hessian == "layerwise" else "global"


# --------------------------------------------------------------------------------------
# scoring: the Hessian diagonal and the saliency
# --------------------------------------------------------------------------------------


def calibration_pairs(
    data: Calib | None, samples: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)``: ``samples`` labelled training examples (drawn by ``seed``) or the given pair."""
    if data is None:
        raise ConfigError(
            "OBD needs labelled calibration data: pass data=DataSplits or calib=(x, y)"
        )
    if isinstance(data, DataSplits):
        n = min(samples, len(data.train))
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(data.train), generator=g)[:n]
        return data.train.x[idx], data.train.y[idx]
    if not isinstance(data, tuple):
        raise ConfigError(
            "OBD with the loss Hessian needs labels: pass calib=(x, y), not inputs alone "
            "(or use hessian='layerwise')"
        )
    x, y = data
    if len(x) != len(y) or len(x) == 0:
        raise ShapeError(f"calib=(x, y) needs as many labels as inputs, got {len(x)} and {len(y)}")
    return x[:samples], y[:samples]


def _fisher(
    model: nn.Module, names: list[str], x: torch.Tensor, y: torch.Tensor, batch_size: int
) -> dict[str, torch.Tensor]:
    """Mean squared per-sample gradient of each weight named in ``names``."""
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())
    chosen = {k: params[k] for k in names}

    def loss_one(weights: dict[str, torch.Tensor], x1: torch.Tensor, y1: torch.Tensor):
        logits = functional_call(model, ({**params, **weights}, buffers), (x1[None],))
        return F.cross_entropy(logits, y1[None])

    per_sample = vmap(grad(loss_one), in_dims=(None, 0, 0))
    total = {k: torch.zeros_like(v) for k, v in chosen.items()}
    for i in range(0, len(x), batch_size):
        grads = per_sample(chosen, x[i : i + batch_size], y[i : i + batch_size])  # k: (B, *w)
        for k, g in grads.items():
            total[k] += g.pow(2).sum(0)
    return {k: v / len(x) for k, v in total.items()}


def _hutchinson(
    model: nn.Module,
    names: list[str],
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    probes: int,
    seed: int,
) -> dict[str, torch.Tensor]:
    """|E_z[z * Hz]| per weight: Hutchinson's diagonal estimate of the loss Hessian."""
    params = dict(model.named_parameters())
    weights = [params[k] for k in names]
    total = [torch.zeros_like(w) for w in weights]
    g = torch.Generator().manual_seed(seed)
    batches = 0
    for i in range(0, len(x), batch_size):
        loss = F.cross_entropy(model(x[i : i + batch_size]), y[i : i + batch_size])
        grads = torch.autograd.grad(loss, weights, create_graph=True)
        for _ in range(probes):
            zs = [  # drawn on the CPU: the same probes on every device
                (torch.randint(0, 2, w.shape, generator=g).float() * 2 - 1).to(w.device)
                for w in weights
            ]
            hz = torch.autograd.grad(grads, weights, grad_outputs=zs, retain_graph=True)
            for t, z, h in zip(total, zs, hz, strict=True):
                t += z * h.detach()
        batches += 1
    return {k: (t / (batches * probes)).abs() for k, t in zip(names, total, strict=True)}


def hessian_diagonal(
    model: nn.Module,
    layers: dict[str, nn.Module],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    method: Literal["fisher", "hutchinson"] = "fisher",
    batch_size: int = 64,
    probes: int = 8,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Estimated diag of the cross-entropy Hessian for each layer's weight (eval mode).

    Returns layer name -> tensor shaped like the weight. The model is not changed; ``x`` and
    ``y`` are moved to its device.
    """
    device = model_device(model)
    x, y = x.to(device), y.to(device)
    names = [f"{name}.weight" if name else "weight" for name in layers]
    with eval_mode(model):
        if method == "fisher":
            diag = _fisher(model, names, x, y, batch_size)
        else:
            with torch.enable_grad():
                diag = _hutchinson(model, names, x, y, batch_size, probes, seed)
    return {layer: diag[param] for layer, param in zip(layers, names, strict=True)}


def obd_scores(
    layers: dict[str, nn.Module], hessian: dict[str, torch.Tensor], damping: float = 0.0
) -> dict[str, torch.Tensor]:
    """Saliency (h_kk + lambda) w_k^2 / 2 of every weight, lambda = damping x mean(h).

    A little damping guards the ranking against a noisy or vanishing estimate of h (a
    well-fit model has near-zero per-sample gradients); large damping tends to magnitude.
    """
    lam = damping * float(torch.cat([h.reshape(-1) for h in hessian.values()]).mean())
    return {n: (hessian[n] + lam) * m.weight.detach().pow(2) / 2 for n, m in layers.items()}


# --------------------------------------------------------------------------------------
# the verb
# --------------------------------------------------------------------------------------


def obd_prune_(model: nn.Module, cfg: OBDPrune, ctx: Context) -> dict[str, float]:
    """Prune ``model`` in place by OBD saliency; returns each pruned layer's sparsity.

    Needs data: ``data`` (``samples`` training examples are drawn from it) or
    ``calib=(x, y)`` (for ``hessian="layerwise"`` inputs alone will do: ``calib=x``).
    """
    filter_fn, data, calib = ctx.filter_fn, ctx.data, ctx.calib
    layers = target_layers(prunable_layers(model, filter_fn), cfg.exclude, cfg.layer_sparsity)
    if not layers:
        raise ConfigError(f"{type(model).__name__} has no Conv or Linear layer to prune")
    if cfg.hessian == "layerwise":
        return _layerwise_obd_(model, cfg, layers, calib if calib is not None else data)
    x, y = calibration_pairs(calib if calib is not None else data, cfg.samples, cfg.seed)
    hessian = hessian_diagonal(
        model,
        layers,
        x,
        y,
        method=cfg.hessian,
        batch_size=cfg.batch_size,
        probes=cfg.probes,
        seed=cfg.seed,
    )
    scores = obd_scores(layers, hessian, cfg.damping)
    if cfg.split == "magnitude" and cfg.sparsity is not None:
        return apply_new_masks_(layers, allocate_masks(
            layers, scores, {}, sparsity=cfg.sparsity, layer_sparsity=None,
            allocation="magnitude",
        ))  # fmt: skip
    return apply_new_masks_(layers, masks_from_scores(scores, cfg.sparsity, cfg.layer_sparsity))


def _layerwise_obd_(
    model: nn.Module,
    cfg: OBDPrune,
    layers: dict[str, nn.Module],
    data: DataSplits | torch.Tensor | tuple[torch.Tensor, ...] | None,
) -> dict[str, float]:
    """OBD on each layer's output error: saliency w_ij^2 H_jj / 2, H = 2 E[x x^T]."""
    assert cfg.split != "global"  # rejected by the validator
    _, masks = layerwise_masks(model, layers, cfg, data, layerwise_obd_scores, cfg.split)
    return apply_new_masks_(layers, masks)


REGISTRY.register("obd", OBDPrune, obd_prune_, takes=("filter_fn", "data", "calib"))
