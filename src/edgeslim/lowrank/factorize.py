"""The two low-rank handlers, :func:`svd_` and :func:`conv_decompose_`, and their replay.

Both share one driver: pick the layers, solve for the factors, size them on one probe input,
choose ranks (:mod:`.ranks`), replace the layers by thin pairs (:mod:`.layers`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from edgeslim.core.errors import ConfigError, ShapeError
from edgeslim.core.hooks import iter_batches
from edgeslim.core.linear import is_linear, skip_tied
from edgeslim.core.registry import Context
from edgeslim.core.selection import FilterFn, matches
from edgeslim.lowrank.conv import ConvDecompose, response_factors
from edgeslim.lowrank.layers import geometries, replace_, thin_pair
from edgeslim.lowrank.ranks import RankTarget, factorize_, inside_factored
from edgeslim.lowrank.registry import REGISTRY
from edgeslim.lowrank.svd import SVD, weight_factors


def candidates(
    model: nn.Module,
    types: tuple[type[nn.Module], ...],
    exclude: list[str],
    filter_fn: FilterFn | None = None,
) -> dict[str, nn.Module]:
    """Layers that can be factorised: ``types`` (``nn.Linear`` includes transformers'
    ``Conv1D``, the same linear layer with its weight transposed), ungrouped convs, not
    already factorised."""
    done = inside_factored(model)
    found = {}
    for name, m in model.named_modules():
        kind = isinstance(m, types) or (nn.Linear in types and is_linear(m))
        if not name or not kind or name in done or matches(name, exclude):
            continue
        if isinstance(m, nn.Conv2d) and m.groups != 1:
            continue  # depthwise or grouped: no cross-channel structure to factor
        if filter_fn is None or filter_fn(m, name):
            found[name] = m
    return skip_tied(found, model, "low-rank")


def probe_input(model: nn.Module, calib: Any) -> Any:
    """One input to trace layer shapes: the first calibration input (a tensor, or keyword
    inputs), or the model's own."""
    if calib is not None:
        batch = next(iter_batches(calib))
        if isinstance(batch, dict):
            return {k: v[:1] if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        if isinstance(batch, tuple):
            return batch[0][:1]
        return batch[:1]
    from edgeslim.core.models.io import example_input

    try:
        return example_input(model)
    except ShapeError as exc:
        raise ConfigError(
            f"lowrank_ must run {type(model).__name__} once to size its layers: pass calib=INPUTS"
        ) from exc


def _factorize_layers_(
    model: nn.Module,
    cfg: RankTarget,
    layers: dict[str, nn.Module],
    calib: Any,
    separable: bool = False,
) -> dict[str, dict[str, float]]:
    if cfg.solver == "response":
        factors = response_factors(model, layers, calib)
    else:
        factors = {
            name: weight_factors(
                m, separable and isinstance(m, nn.Conv2d) and 1 not in m.kernel_size
            )
            for name, m in layers.items()
        }
    for name, geometry in geometries(model, layers, probe_input(model, calib)).items():
        factors[name].geometry = geometry
    return factorize_(model, cfg, factors, calib)


def svd_(model: nn.Module, cfg: SVD, ctx: Context) -> dict[str, dict[str, float]]:
    """Factor ``model``'s Linear layers (and transformers' Conv1D) in place as ``cfg``
    says (see :class:`SVD`)."""
    calib, filter_fn = ctx.calib, ctx.filter_fn
    layers = candidates(model, (nn.Linear,), cfg.exclude, filter_fn)
    if not layers:
        raise ConfigError(
            f"{type(model).__name__} has no Linear layer to factorise (tied layers are left "
            "as they are)"
        )
    return _factorize_layers_(model, cfg, layers, calib)


def conv_decompose_(
    model: nn.Module, cfg: ConvDecompose, ctx: Context
) -> dict[str, dict[str, float]]:
    """Factor ``model``'s Conv2d (with ``linear``, also Linear) layers in place as ``cfg`` says."""
    calib, filter_fn = ctx.calib, ctx.filter_fn
    types = (nn.Conv2d, nn.Linear) if cfg.linear else (nn.Conv2d,)
    layers = candidates(model, types, cfg.exclude, filter_fn)
    if not layers:
        raise ConfigError(f"{type(model).__name__} has no ungrouped Conv2d layer to factorise")
    return _factorize_layers_(model, cfg, layers, calib, cfg.separable)


def replay_factors_(model: nn.Module, cfg: RankTarget, log: dict, example: Any) -> nn.Module:
    """Replace each layer the log names by an (uninitialised) factored pair of the logged
    rank; the saved state fills it."""
    for name, entry in log.items():
        layer = model.get_submodule(name)
        separable = (
            isinstance(cfg, ConvDecompose)
            and cfg.separable
            and 1 not in getattr(layer, "kernel_size", (1,))
        )
        shape = "linear" if is_linear(layer) else "separable" if separable else "conv"
        bias = layer.bias is not None or cfg.solver == "response"  # response re-adds the mean
        replace_(model, name, thin_pair(layer, int(entry["rank"]), shape, bias))
    return model


REGISTRY.register("svd", SVD, svd_, takes=("calib", "filter_fn"), replay=replay_factors_)
REGISTRY.register(
    "conv", ConvDecompose, conv_decompose_, takes=("calib", "filter_fn"), replay=replay_factors_
)
