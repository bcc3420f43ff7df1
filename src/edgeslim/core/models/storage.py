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
from edgeslim.core.fileio import save_tensors

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


def load_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a dense or sparse weight file back into a dense state dict."""
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
    try:
        shapes: dict[str, list[int]] = json.loads(meta.get("shapes", "{}"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: corrupt 'shapes' metadata: {exc}") from exc
    return decode_sparse(raw, shapes, path)


def decode_sparse(
    raw: dict[str, torch.Tensor], shapes: dict[str, list[int]], path: str | os.PathLike
) -> dict[str, torch.Tensor]:
    """Undo :func:`encode_sparse`: dense tensors by name (``path`` names the file in errors)."""
    out: dict[str, torch.Tensor] = {}
    for name, t in raw.items():
        if name.endswith(_BITMAP):
            continue
        if name.endswith(_VALUES):
            base = name[: -len(_VALUES)]
            if base not in shapes or base + _BITMAP not in raw:
                raise CheckpointError(f"{path}: sparse tensor {base!r} lacks its shape or bitmap")
            shape = shapes[base]
            numel = math.prod(shape)
            bits = raw[base + _BITMAP].numpy()
            nz = np.unpackbits(bits, count=numel).astype(bool) if numel else np.zeros(0, bool)
            if int(nz.sum()) != t.numel():
                raise CheckpointError(
                    f"{path}: sparse tensor {base!r} has {t.numel()} values for "
                    f"{int(nz.sum())} bitmap entries"
                )
            dense = torch.zeros(numel, dtype=t.dtype)
            dense[torch.from_numpy(nz)] = t
            out[base] = dense.reshape(shape)
        else:
            out[name] = t
    return out
