"""Weight files in two storage formats, with sizes counted honestly.

``dense``  : a plain safetensors file, every tensor stored in full.
``sparse`` : a safetensors file where a tensor is stored as its nonzero values
             (``NAME::values``, same dtype, row-major order) plus a bitmap of which entries
             are nonzero (``NAME::bitmap``, uint8, ``numpy.packbits`` big-endian bit order,
             ``ceil(numel / 8)`` bytes) -- but only when that is smaller than the dense
             tensor. A tensor that is not sparse enough stays dense, so a sparse file is never
             larger than the dense one (beyond a few bytes of header).

Pruning masks (buffers named ``*_keep``) are not stored: a deployed model does not need
them, and the sparse bitmap already records where the zeros are. Nor are the codes and
centroids of shared weights (``*_codes``, ``*_centroids``): the weights hold their values.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from edgeslim.core.errors import CheckpointError
from edgeslim.core.fileio import save_tensors, strict_json_loads

FORMATS = ("dense", "sparse")
MASK_SUFFIX = "_keep"
CODES_SUFFIX, CENTROIDS_SUFFIX = "_codes", "_centroids"  # k-means shared weights
_VALUES, _BITMAP = "::values", "::bitmap"


def deployable_state(model_or_state: torch.nn.Module | dict[str, torch.Tensor]):
    """The tensors a deployed model needs: parameters and buffers, without pruning masks or
    sharing codes and centroids."""
    state = (
        model_or_state.state_dict()
        if isinstance(model_or_state, torch.nn.Module)
        else model_or_state
    )
    skip = training_only_keys(state)
    return {k: v for k, v in state.items() if k not in skip}


def training_only_keys(state: dict[str, torch.Tensor]) -> set[str]:
    """Keys of pruning masks, and of the codes and centroids of each shared ``NAME`` that
    ``state`` holds together with ``NAME`` itself."""
    out = {k for k in state if k.endswith(MASK_SUFFIX)}
    for key in state:
        base = key[: -len(CODES_SUFFIX)]
        if key.endswith(CODES_SUFFIX) and base in state and base + CENTROIDS_SUFFIX in state:
            out |= {key, base + CENTROIDS_SUFFIX}
    return out


def dense_tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of ``t`` stored in full."""
    return t.numel() * t.element_size()


def sparse_tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of ``t`` in the ``sparse`` format: nonzero values + bitmap, or dense if smaller."""
    if not t.is_floating_point():
        return dense_tensor_bytes(t)
    nnz = int(torch.count_nonzero(t))
    return min(dense_tensor_bytes(t), nnz * t.element_size() + math.ceil(t.numel() / 8))


def payload_bytes(state: dict[str, torch.Tensor], fmt: str) -> int:
    """Tensor bytes (without file header) of ``state`` in storage format ``fmt``."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown storage format {fmt!r}; expected one of {FORMATS}")
    size = dense_tensor_bytes if fmt == "dense" else sparse_tensor_bytes
    return sum(size(t) for t in state.values())


def encode_sparse(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each tensor as ``NAME::values`` + ``NAME::bitmap`` when that is smaller, else as is."""
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        t = t.detach().contiguous()
        if sparse_tensor_bytes(t) < dense_tensor_bytes(t):
            flat = t.reshape(-1)
            nz = flat != 0
            bits = np.packbits(nz.numpy().astype(np.uint8))
            out[name + _VALUES] = flat[nz].clone()
            out[name + _BITMAP] = torch.from_numpy(bits)
        else:
            out[name] = t
    return out


def save_weights(state: dict[str, torch.Tensor], path: str | os.PathLike, fmt: str) -> int:
    """Write ``state`` to ``path`` in ``fmt`` atomically; return the file's size in bytes."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown storage format {fmt!r}; expected one of {FORMATS}")
    path = Path(path)
    tensors = {k: v.detach().contiguous() for k, v in state.items()}
    if fmt == "sparse":
        tensors = encode_sparse(tensors)
    shapes = {k: list(v.shape) for k, v in state.items()}
    meta = {"format": fmt, "shapes": json.dumps(shapes)}
    save_tensors(tensors, path, metadata=meta)
    return path.stat().st_size


# A sparse tensor costs at most 8 x itemsize bytes per bitmap byte; reading one also needs
# a one-byte-per-element mask: a file may expand to this many times its size, no more.
MAX_EXPANSION = 8 * (8 + 1)
MAX_DIMS = 16


def load_weights(path: str | os.PathLike, max_bytes: int | None = None) -> dict[str, torch.Tensor]:
    """Read a dense or sparse weight file back into a dense state dict.

    ``max_bytes`` caps the memory decoding may take (see :func:`decode_sparse`).
    """
    path = Path(path)
    try:
        # own, 64-byte aligned memory: a mapped tensor starts wherever the header ends, and
        # float kernels round differently on unaligned input (docs/determinism.md)
        raw = {k: v.clone() for k, v in load_file(str(path)).items()}
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"cannot read weight file {path}: {exc}") from exc
    shapes = strict_json_loads(meta.get("shapes", "{}"), f"{path}: 'shapes' metadata")
    if not isinstance(shapes, dict):
        raise CheckpointError(f"{path}: 'shapes' metadata is not a JSON object")
    return decode_sparse(raw, shapes, path, max_bytes=max_bytes)


def check_shape(shape: object, path: str | os.PathLike, name: str) -> tuple[int, ...]:
    """``shape`` as a tuple of non-negative ints (at most ``MAX_DIMS``), or a
    :class:`CheckpointError` naming the file and the tensor."""
    if not isinstance(shape, list | tuple) or len(shape) > MAX_DIMS:
        raise CheckpointError(
            f"{path}: tensor {name!r} has shape {str(shape)[:80]}, not a list of at most "
            f"{MAX_DIMS} dimensions"
        )
    for dim in shape:
        if type(dim) is not int or not 0 <= dim < 2**62:
            raise CheckpointError(
                f"{path}: tensor {name!r} has shape {str(shape)[:80]}: dimensions must be "
                "non-negative integers"
            )
    return tuple(shape)


def decode_budget(path: str | os.PathLike, max_bytes: int | None = None) -> int:
    """Bytes decoding ``path`` may allocate: ``MAX_EXPANSION`` times the file's size, and
    no more than ``max_bytes`` when given."""
    try:
        size = os.path.getsize(path)
    except OSError:
        size = 0
    budget = MAX_EXPANSION * size + (1 << 20)
    return budget if max_bytes is None else min(budget, max_bytes)


def decode_sparse(
    raw: dict[str, torch.Tensor],
    shapes: dict[str, list[int]],
    path: str | os.PathLike,
    max_bytes: int | None = None,
) -> dict[str, torch.Tensor]:
    """Undo :func:`encode_sparse`: dense tensors by name (``path`` names the file in errors).

    Every sparse tensor's shape is checked before anything is allocated: non-negative
    dimensions, a bitmap of exactly ``ceil(numel / 8)`` bytes with as many set bits as
    there are values, and the dense tensors plus the largest temporary mask within
    :func:`decode_budget` (``max_bytes`` caps it further).
    """
    if not isinstance(shapes, dict):
        raise CheckpointError(f"{path}: shapes metadata is not a JSON object")
    plan: dict[str, tuple[tuple[int, ...], int]] = {}
    total = largest_mask = 0
    for name, t in raw.items():
        if not name.endswith(_VALUES):
            continue
        base = name[: -len(_VALUES)]
        if base not in shapes or base + _BITMAP not in raw:
            raise CheckpointError(f"{path}: sparse tensor {base!r} lacks its shape or bitmap")
        shape = check_shape(shapes[base], path, base)
        numel = math.prod(shape)
        bitmap = raw[base + _BITMAP]
        if bitmap.dtype != torch.uint8 or bitmap.dim() != 1 or t.dim() != 1:
            raise CheckpointError(
                f"{path}: sparse tensor {base!r} needs a 1-D uint8 bitmap and 1-D values"
            )
        if bitmap.numel() != -(-numel // 8):
            raise CheckpointError(
                f"{path}: sparse tensor {base!r} of shape {list(shape)} ({numel} elements) "
                f"has a bitmap of {bitmap.numel()} bytes, not {-(-numel // 8)}"
            )
        total += numel * t.element_size()
        largest_mask = max(largest_mask, numel)
        plan[base] = (shape, numel)
    budget = decode_budget(path, max_bytes)
    if total + largest_mask > budget:
        raise CheckpointError(
            f"{path}: decoding its sparse tensors needs {total + largest_mask} bytes, over "
            f"the budget of {budget} bytes for this file"
        )
    out: dict[str, torch.Tensor] = {}
    for name, t in raw.items():
        if name.endswith(_BITMAP):
            continue
        if not name.endswith(_VALUES):
            out[name] = t
            continue
        base = name[: -len(_VALUES)]
        shape, numel = plan[base]
        bits = raw[base + _BITMAP].numpy()
        nz = np.unpackbits(bits, count=numel).view(bool)
        count = int(np.count_nonzero(nz))
        if count != t.numel():
            raise CheckpointError(
                f"{path}: sparse tensor {base!r} has {t.numel()} values for {count} bitmap entries"
            )
        dense = torch.zeros(numel, dtype=t.dtype)
        dense[torch.from_numpy(nz)] = t
        out[base] = dense.reshape(shape)
    return out
