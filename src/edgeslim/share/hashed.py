"""HashedNets: virtual weights drawn from K shared buckets by a hash of their position.

Wenlin Chen, James T. Wilson, Stephen Tyree, Kilian Q. Weinberger, Yixin Chen. "Compressing
Neural Networks with the Hashing Trick", ICML 2015. https://arxiv.org/abs/1504.04788

A hashed layer stores only K trainable bucket values. Its virtual weight matrix V (the shape
of the ordinary layer's weight) is ``V[p] = sign[p] * buckets[index[p]]`` where, for each flat
position p, ``index[p] = h(p) mod K`` and ``sign[p] = +-1`` come from two independent hashes
(the sign hash removes the bias of collisions, section 4.3). Back-propagation through the
gather sums the gradients of all virtual weights of a bucket into it, as in the paper. The
hash is MurmurHash3's 64-bit finalizer (``docs/format.md``, section 5), so index and sign are
regenerated from (shape, K, seed) and never stored.

:class:`HashedLinear` and :class:`HashedConv2d` are ordinary modules; :func:`hash_share_`
swaps them in for a model's Linear and Conv2d layers (``share_(model, HashShare(ratio=1/8))``)
with buckets initialised to the least-squares fit of the old weights, and ``fit`` trains them.
"""

from __future__ import annotations

import math
import zlib
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import ConfigDict, Field
from torch import nn

from edgeslim.core.errors import ConfigError, ContainerError
from edgeslim.core.options import Options
from edgeslim.core.registry import Context
from edgeslim.core.selection import select_layers
from edgeslim.share.registry import REGISTRY

_MASK64 = (1 << 64) - 1
_INDEX_SALT, _SIGN_SALT = 0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F


class HashShare(Options):
    """Replace Linear and Conv2d layers by hashed ones with ``ratio`` of their weights.

    Each layer keeps ``max(1, round(ratio * weights))`` buckets (the paper's compression
    factor is ``1 / ratio``). Layers matching ``exclude`` (glob patterns) stay as they are.
    """

    model_config = ConfigDict(extra="forbid")

    ratio: float = Field(0.125, gt=0, le=1)
    exclude: list[str] = Field(default_factory=list)
    seed: int = Field(0, ge=0, lt=1 << 32)


# --------------------------------------------------------------------------------------
# the hash
# --------------------------------------------------------------------------------------


def fmix64(x: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finalizer, on uint64 arrays (arithmetic mod 2**64)."""
    x = x ^ (x >> np.uint64(33))
    x = x * np.uint64(0xFF51AFD7ED558CCD)
    x = x ^ (x >> np.uint64(33))
    x = x * np.uint64(0xC4CEB9FE1A85EC53)
    return x ^ (x >> np.uint64(33))


HASH_CHUNK = 1 << 16  # positions hashed at a time: temporaries stay ~2.5 MB, not ~40 B/element
HASH_TEMP_BYTES = 40 * HASH_CHUNK  # working memory of hash_index / hash_sign, at most


def _hash_range(start: int, stop: int, seed: int, salt: int) -> np.ndarray:
    positions = np.arange(start, stop, dtype=np.uint64)
    return fmix64(positions ^ np.uint64((seed * salt) & _MASK64))


def hash_index(shape: tuple[int, ...], buckets: int, seed: int) -> torch.Tensor:
    """Bucket of every position of a tensor of ``shape`` (int64, same shape).

    Hashed ``HASH_CHUNK`` positions at a time, so the only large allocation is the result
    (8 bytes per element)."""
    numel = math.prod(shape)
    out = np.empty(numel, dtype=np.int64)
    k = np.uint64(buckets)
    for start in range(0, numel, HASH_CHUNK):
        stop = min(numel, start + HASH_CHUNK)
        out[start:stop] = _hash_range(start, stop, seed, _INDEX_SALT) % k
    return torch.from_numpy(out).reshape(shape)


def hash_sign(shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.float32):
    """+1 or -1 for every position of a tensor of ``shape`` (``dtype``, same shape).

    Chunked like :func:`hash_index`: the only large allocation is the result."""
    numel = math.prod(shape)
    out = torch.empty(numel, dtype=dtype)
    for start in range(0, numel, HASH_CHUNK):
        stop = min(numel, start + HASH_CHUNK)
        top = _hash_range(start, stop, seed, _SIGN_SALT) >> np.uint64(63)
        out[start:stop] = torch.from_numpy(1.0 - 2.0 * top.astype(np.float64))
    return out.reshape(shape)


def check_buckets(buckets: object, numel: int, where: str) -> int:
    """``buckets`` of a hashed layer read from a file: an int with ``1 <= buckets <= numel``
    (a :class:`~edgeslim.core.errors.ContainerError` otherwise)."""
    if type(buckets) is not int or not 1 <= buckets <= max(1, numel):
        raise ContainerError(
            f"{where}: buckets must be an integer from 1 to the layer's {numel} weights, "
            f"got {str(buckets)[:40]!r}"
        )
    return buckets


def _int_arg(args: dict, key: str, where: str, default: object = None) -> int:
    value = args.get(key, default)
    if type(value) is not int or not 0 <= value < 1 << 31:
        raise ContainerError(
            f"{where}: {key} must be a non-negative integer, got {str(value)[:40]!r}"
        )
    return value


# --------------------------------------------------------------------------------------
# layers
# --------------------------------------------------------------------------------------


class _Hashed(nn.Module):
    """Common part: K buckets, the hashed index and sign of a virtual weight of ``shape``."""

    def _init_hash(self, shape: tuple[int, ...], buckets: int, seed: int, fan_in: int) -> None:
        if buckets < 1:
            raise ValueError(f"buckets must be >= 1, got {buckets}")
        self.num_buckets, self.seed, self.virtual_shape = buckets, seed, tuple(shape)
        bound = 1 / math.sqrt(fan_in)  # nn.Linear / nn.Conv2d's default init range
        self.buckets = nn.Parameter(torch.empty(buckets).uniform_(-bound, bound))
        self.register_buffer("index", hash_index(shape, buckets, seed), persistent=False)
        self.register_buffer("sign", hash_sign(shape, seed), persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        """The virtual weight ``sign * buckets[index]`` (computed, not stored)."""
        return self.sign * self.buckets[self.index]

    @torch.no_grad()
    def fit_buckets_(self, weight: torch.Tensor) -> None:
        """Set each bucket to the mean of ``sign * weight`` over its positions (least squares)."""
        flat_index = self.index.reshape(-1)
        sums = torch.zeros(self.num_buckets, dtype=torch.float64, device=flat_index.device)
        sums.index_add_(0, flat_index, (self.sign * weight).reshape(-1).double())
        counts = torch.bincount(flat_index, minlength=self.num_buckets).clamp_min(1)
        self.buckets.copy_((sums / counts).to(self.buckets.dtype))


def build_bytes_for(args: dict, numel: int, where: str) -> int:
    """Bytes a hashed layer of ``numel`` virtual weights allocates: its buckets, the int64
    index and float sign per virtual weight, and the hash's working memory."""
    buckets = check_buckets(args.get("buckets"), numel, where)
    return 4 * buckets + 12 * numel + HASH_TEMP_BYTES


class HashedLinear(_Hashed):
    """A Linear layer whose ``(out, in)`` weight is hashed into ``buckets`` shared values."""

    def __init__(
        self, in_features: int, out_features: int, buckets: int, bias: bool = True, seed: int = 0
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_hash((out_features, in_features), buckets, seed, in_features)
        bound = 1 / math.sqrt(in_features)
        self.bias = (
            nn.Parameter(torch.empty(out_features).uniform_(-bound, bound)) if bias else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)  # (..., in) -> (..., out)

    @staticmethod
    def build_bytes(args: dict) -> int:
        """Memory that ``HashedLinear(**args)`` allocates (checked before building one from a
        file): buckets, bias, and the int64 index and float sign of every virtual weight,
        plus the hash's working memory. Refuses arguments that are not sane integers."""
        where = "HashedLinear"
        numel = _int_arg(args, "in_features", where) * _int_arg(args, "out_features", where)
        return build_bytes_for(args, numel, where)

    def slim_args(self) -> dict:
        """Constructor arguments, recorded in ``.slim`` files."""
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "buckets": self.num_buckets,
            "bias": self.bias is not None,
            "seed": self.seed,
        }

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, buckets={self.num_buckets}"


class HashedConv2d(_Hashed):
    """A Conv2d layer whose ``(out, in/groups, kh, kw)`` weight is hashed into ``buckets``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        buckets: int,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, (kh, kw)
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        shape = (out_channels, in_channels // groups, kh, kw)
        fan_in = shape[1] * kh * kw
        self._init_hash(shape, buckets, seed, fan_in)
        bound = 1 / math.sqrt(fan_in)
        self.bias = (
            nn.Parameter(torch.empty(out_channels).uniform_(-bound, bound)) if bias else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight  # (out, in/groups, kh, kw)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)

    @staticmethod
    def build_bytes(args: dict) -> int:
        """Memory that ``HashedConv2d(**args)`` allocates (see ``HashedLinear.build_bytes``)."""
        where = "HashedConv2d"
        k = args.get("kernel_size")
        ks = list(k) if isinstance(k, list | tuple) else [k, k]
        if len(ks) != 2:
            raise ContainerError(
                f"{where}: kernel_size must be an integer or two, got {str(k)[:40]!r}"
            )
        kh, kw = (_int_arg({"kernel_size": v}, "kernel_size", where) for v in ks)
        groups = max(1, _int_arg(args, "groups", where, 1))
        per_out = _int_arg(args, "in_channels", where) // groups * kh * kw
        numel = _int_arg(args, "out_channels", where) * per_out
        return build_bytes_for(args, numel, where)

    def slim_args(self) -> dict:
        """Constructor arguments, recorded in ``.slim`` files."""
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "kernel_size": list(self.kernel_size),
            "buckets": self.num_buckets,
            "stride": _listed(self.stride),
            "padding": _listed(self.padding),
            "dilation": _listed(self.dilation),
            "groups": self.groups,
            "bias": self.bias is not None,
            "seed": self.seed,
        }

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"buckets={self.num_buckets}"
        )


def _listed(v: int | tuple[int, ...]) -> int | list[int]:
    return list(v) if isinstance(v, tuple) else v


HASHED_MODULES: dict[str, type[nn.Module]] = {
    "HashedLinear": HashedLinear,
    "HashedConv2d": HashedConv2d,
}


# --------------------------------------------------------------------------------------
# model surgery
# --------------------------------------------------------------------------------------


def layer_seed(seed: int, name: str) -> int:
    """A per-layer hash seed (u32) from the config seed and the layer's name."""
    return zlib.crc32(name.encode(), seed) & 0xFFFFFFFF


def hashed_like(module: nn.Module, ratio: float, seed: int) -> nn.Module:
    """A hashed copy of a Linear or Conv2d layer with ``round(ratio * weights)`` buckets."""
    k = max(1, round(ratio * module.weight.numel()))
    bias = module.bias is not None
    if isinstance(module, nn.Linear):
        new = HashedLinear(module.in_features, module.out_features, k, bias, seed)
    else:
        if not isinstance(module.padding, (int, tuple)):  # e.g. padding="same"
            raise ConfigError(f"hashing needs a numeric padding, got {module.padding!r}")
        new = HashedConv2d(
            module.in_channels,
            module.out_channels,
            module.kernel_size,
            k,
            module.stride,
            module.padding,
            module.dilation,
            module.groups,
            bias,
            seed,
        )
    new = new.to(module.weight.device)
    new.fit_buckets_(module.weight.detach())
    if bias:
        with torch.no_grad():
            new.bias.copy_(module.bias)
    return new


def hash_share_(model: nn.Module, cfg: HashShare, ctx: Context) -> dict[str, dict[str, int]]:
    """Swap ``model``'s Linear and Conv2d layers for hashed ones in place; a log row per layer."""
    filter_fn = ctx.filter_fn
    layers = select_layers(model, (nn.Linear, nn.Conv2d), exclude=cfg.exclude, filter_fn=filter_fn)
    layers.pop("", None)  # the model itself cannot be swapped in place
    if not layers:
        raise ConfigError(f"{type(model).__name__} has no Linear or Conv2d layer to hash")
    log: dict[str, dict[str, int]] = {}
    for name, module in layers.items():
        new = hashed_like(module, cfg.ratio, layer_seed(cfg.seed, name))
        model.set_submodule(name, new)
        log[name] = {"virtual": module.weight.numel(), "buckets": new.num_buckets}
    return log


def replay_hashing_(model: nn.Module, cfg: HashShare, log: Any, example: Any) -> nn.Module:
    """Swap the hashed layers in again: their index and sign come from the same seeds (the
    saved state is loaded next). k-means sharing changes no structure: its codes and
    centroids come back with the state."""
    hash_share_(model, cfg, Context())
    return model


REGISTRY.register("hash", HashShare, hash_share_, takes=("filter_fn",), replay=replay_hashing_)
