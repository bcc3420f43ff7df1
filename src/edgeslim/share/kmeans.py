"""Trained quantization by k-means weight sharing, as in Deep Compression.

Song Han, Huizi Mao, William J. Dally. "Deep Compression: Compressing Deep Neural Networks
with Pruning, Trained Quantization and Huffman Coding", ICLR 2016, section 3.
https://arxiv.org/abs/1510.00149

Per layer, the nonzero weights are clustered by 1-D k-means into ``k = 2**bits`` shared
values (centroids); every weight is replaced by its centroid and remembers its cluster as a
code (0 for a zero weight, which stays zero). Centroid initialisation as in the paper:
``linear`` (evenly spaced between min and max: the paper's best, since it keeps the few large
weights), ``density`` (evenly spaced in the weights' CDF) or ``random`` (Forgy: k weights
drawn at random). Fine-tuning then trains the centroids: the gradient of every shared weight
is summed into its centroid (eq. 3), done by :func:`edgeslim.core.masks.mask_grads_` inside the
ordinary ``fit`` / ``finetune`` loop.

Clustering (:func:`kmeans_1d`, pure numpy), choosing the bits of each layer
(:func:`layer_bits`) and tying the model's weights (:func:`edgeslim.core.masks.set_shared_`) are
separate steps.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import ConfigDict, Field, field_validator
from torch import nn

from edgeslim.core.errors import ConfigError
from edgeslim.core.masks import set_shared_
from edgeslim.core.options import Options
from edgeslim.core.registry import Context
from edgeslim.core.selection import lookup_layer, matches, select_layers, unmatched
from edgeslim.share.registry import REGISTRY

SHAREABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
TYPE_KEYS = {"conv": (nn.Conv1d, nn.Conv2d, nn.Conv3d), "linear": (nn.Linear,)}
MAX_BITS = 12


class KMeansShare(Options):
    """Share each layer's nonzero weights among ``2**bits`` values found by k-means.

    ``bits`` is one number for every Conv/Linear layer, or a mapping whose keys are layer
    names, glob patterns (``"fc*"``) or the layer types ``"conv"`` and ``"linear"`` (the
    paper: ``{"conv": 8, "linear": 5}``); a name or pattern wins over a type. Layers without
    an entry are left alone. ``bias_bits`` also shares each such layer's bias (its own
    ``2**bias_bits`` values; None leaves biases in full precision).
    """

    model_config = ConfigDict(extra="forbid")

    bits: int | dict[str, int] = Field(default_factory=lambda: {"conv": 8, "linear": 5})
    init: Literal["linear", "density", "random"] = "linear"
    iterations: int = Field(50, ge=0, description="Lloyd iterations (stops early when stable)")
    bias_bits: int | None = Field(None, ge=1, le=MAX_BITS)
    exclude: list[str] = Field(default_factory=list)
    seed: int = 0

    @field_validator("bits")
    @classmethod
    def _bits_in_range(cls, value: int | dict[str, int]) -> int | dict[str, int]:
        for key, b in value.items() if isinstance(value, dict) else [("bits", value)]:
            if not 1 <= b <= MAX_BITS:
                raise ValueError(f"{key}: bits = {b} must be in [1, {MAX_BITS}]")
        return value


# --------------------------------------------------------------------------------------
# 1-D k-means
# --------------------------------------------------------------------------------------


def init_centroids(values: np.ndarray, k: int, init: str, seed: int = 0) -> np.ndarray:
    """Initial centroids (k,) of 1-D ``values``: the paper's linear, density or random init."""
    if init == "linear":
        return np.linspace(values.min(), values.max(), k)
    if init == "density":
        return np.quantile(values, (np.arange(k) + 0.5) / k)
    if init == "random":
        rng = np.random.default_rng(seed)
        return np.sort(rng.choice(values, size=k, replace=values.size < k))
    raise ValueError(f"unknown init {init!r}; expected linear, density or random")


def assign(values: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index (n,) of the nearest centroid of each value (centroids sorted ascending)."""
    midpoints = (centroids[1:] + centroids[:-1]) / 2  # (k-1,)
    return np.searchsorted(midpoints, values, side="left")


def kmeans_1d(
    values: np.ndarray, k: int, init: str = "linear", iterations: int = 50, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's k-means on 1-D ``values``: ``(centroids (k,) ascending, labels (n,))``.

    Deterministic; an empty cluster keeps its centroid. Runs in float64.
    """
    values = np.asarray(values, dtype=np.float64)
    centroids = np.sort(init_centroids(values, k, init, seed))
    labels = assign(values, centroids)
    for _ in range(iterations):
        sums = np.bincount(labels, weights=values, minlength=k)
        counts = np.bincount(labels, minlength=k)
        centroids = np.where(counts > 0, sums / np.maximum(counts, 1), centroids)
        centroids = np.sort(centroids)
        new = assign(values, centroids)
        if np.array_equal(new, labels):
            break
        labels = new
    return centroids, labels


# --------------------------------------------------------------------------------------
# model surgery
# --------------------------------------------------------------------------------------


def layer_bits(cfg: KMeansShare, layers: dict[str, nn.Module]) -> dict[str, int]:
    """Bits of each layer that ``cfg`` shares (layers without an entry are left out)."""
    layers = {n: m for n, m in layers.items() if not matches(n, cfg.exclude)}
    if isinstance(cfg.bits, int):
        return dict.fromkeys(layers, cfg.bits)
    names = {k: v for k, v in cfg.bits.items() if k not in TYPE_KEYS}
    unknown = unmatched(names, layers)
    if unknown:
        raise ConfigError(
            f"bits names {unknown} match no Conv or Linear layer; layers: {list(layers)}"
        )
    out: dict[str, int] = {}
    for name, module in layers.items():
        match = lookup_layer(names, name)
        if match is None:
            match = next(
                (
                    cfg.bits[t]
                    for t, kinds in TYPE_KEYS.items()
                    if t in cfg.bits and isinstance(module, kinds)
                ),
                None,
            )
        if match is not None:
            out[name] = match
    return out


@torch.no_grad()
def share_tensor_(module: nn.Module, pname: str, bits: int, cfg: KMeansShare) -> dict[str, float]:
    """Cluster ``module.<pname>``'s nonzero values into ``2**bits`` centroids and tie it."""
    param = getattr(module, pname)
    w = param.detach().reshape(-1).cpu().double().numpy()  # (numel,)
    nonzero = np.flatnonzero(w)
    k = 1 << bits
    codes = np.zeros(w.size, dtype=np.int64)
    if nonzero.size:
        centroids, labels = kmeans_1d(w[nonzero], k, cfg.init, cfg.iterations, cfg.seed)
        codes[nonzero] = labels + 1
    else:
        centroids = np.zeros(k)
    centroids32 = torch.from_numpy(centroids).to(param.device, param.dtype)  # (k,)
    dtype = torch.uint8 if k <= 255 else torch.int16
    codes_t = torch.from_numpy(codes).to(param.device, dtype).reshape(param.shape)
    before = param.detach().clone()
    set_shared_(module, pname, codes_t, centroids32)
    err = (param.detach() - before).double()
    used = int(np.unique(codes[nonzero]).size)
    return {"bits": bits, "clusters": k, "used": used, "rmse": float(err.pow(2).mean().sqrt())}


def kmeans_share_(model: nn.Module, cfg: KMeansShare, ctx: Context) -> dict[str, dict[str, float]]:
    """Share the weights of ``model``'s Conv/Linear layers in place; a log row per tensor."""
    filter_fn = ctx.filter_fn
    layers = select_layers(model, SHAREABLE, filter_fn=filter_fn)
    if not layers:
        raise ConfigError(f"{type(model).__name__} has no Conv or Linear layer to share")
    log: dict[str, dict[str, float]] = {}
    for name, bits in layer_bits(cfg, layers).items():
        module = layers[name]
        log[f"{name}.weight"] = share_tensor_(module, "weight", bits, cfg)
        if cfg.bias_bits is not None and module.bias is not None:
            log[f"{name}.bias"] = share_tensor_(module, "bias", cfg.bias_bits, cfg)
    return log


REGISTRY.register("kmeans", KMeansShare, kmeans_share_, takes=("filter_fn",))
