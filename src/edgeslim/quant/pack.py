"""The deployable file of a quantized model: integer weights packed at their bit width.

``weights.int.safetensors`` holds, per quantized layer ``L``:

- ``L.weight::packed`` uint8: the integer weights minus ``qmin`` (so non-negative),
  ``bits`` bits each, most significant bit first, ``ceil(numel * bits / 8)`` bytes
  (8-bit weights are stored as plain int8 ``L.weight::int8`` instead);
- ``L.weight::scale`` float32 (C_out,) and, when present, ``L.bias::int32`` (static
  activations) or ``L.bias`` float32;
- binary / ternary layers: ``L.weight::packed`` codes (+1 -> 1 / 0 for BWN, code + 1 for
  ternary) and ``L.weight::scale`` (BWN: per channel; TWN: alpha; TTQ: W_p, W_n);
- int8 embeddings: ``L.weight::int8`` and ``L.weight::scale`` per row;

plus every other tensor of the state dict (float layers, activation qparams, ...) as is.
The metadata records shapes, bit widths and offsets (JSON) so :func:`unpack_weights`
restores the integer tensors. The file's size is what the pipeline reports as the
stage's ``size_bytes``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from torch import nn

from edgeslim.core.errors import CheckpointError
from edgeslim.core.fileio import save_tensors
from edgeslim.quant.modules import QuantEmbedding, quant_layers
from edgeslim.quant.ternary import lowbit_layers

# buffers that the packed integer weights replace (rebuilt from them on load)
_DERIVED = ("weight_int8", "bias_int32", "multiplier", "shift", "act_limits", "weight_scale")


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack non-negative integers ``< 2**bits`` into bytes, MSB first (uint8 array)."""
    v = np.asarray(values, dtype=np.uint8).reshape(-1)
    planes = np.unpackbits(v[:, None], axis=1)[:, 8 - bits :]  # (n, bits)
    return np.packbits(planes.reshape(-1))


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: ``count`` integers (int64)."""
    planes = np.unpackbits(np.asarray(packed, np.uint8), count=count * bits).reshape(count, bits)
    weights = 1 << np.arange(bits - 1, -1, -1)
    return (planes.astype(np.int64) * weights).sum(axis=1)


def packed_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """The tensors and metadata of the packed file (see the module docstring)."""
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, object] = {}
    covered: set[str] = set()
    for name, layer in quant_layers(model).items():
        layer.freeze()
        wq = layer.weight_quant
        q = layer.weight_int8.numpy().astype(np.int64)
        if wq.bits == 8:
            tensors[f"{name}.weight::int8"] = layer.weight_int8.clone()
        else:
            packed = pack_bits(q - wq.qmin, wq.bits)
            tensors[f"{name}.weight::packed"] = torch.from_numpy(packed)
        tensors[f"{name}.weight::scale"] = layer.weight_scale.detach().float().clone()
        if layer.bias is not None:
            if layer.input_quant.dynamic:
                tensors[f"{name}.bias"] = layer.bias.detach().clone()
            else:
                tensors[f"{name}.bias::int32"] = layer.bias_int32.clone()
        layers[name] = {"kind": "int", "bits": wq.bits, "qmin": wq.qmin, "shape": list(q.shape)}
        covered |= {f"{name}.weight", f"{name}.bias"} | {f"{name}.{b}" for b in _DERIVED}
    for name, layer in lowbit_layers(model).items():
        codes, scales = layer.codes()
        bits = layer.code_bits
        c = codes.numpy().astype(np.int64)
        stored = (c > 0).astype(np.int64) if bits == 1 else c + 1
        tensors[f"{name}.weight::packed"] = torch.from_numpy(pack_bits(stored, bits))
        tensors[f"{name}.weight::scale"] = scales
        layers[name] = {"kind": layer.scheme, "bits": bits, "shape": list(c.shape)}
        covered |= {f"{name}.weight", f"{name}.wp", f"{name}.wn"}
    for name, mod in model.named_modules():
        if isinstance(mod, QuantEmbedding):
            tensors[f"{name}.weight::int8"] = mod.weight_int8.clone()
            tensors[f"{name}.weight::scale"] = mod.weight_scale.clone()
            layers[name] = {"kind": "embedding", "bits": 8, "shape": list(mod.weight_int8.shape)}
            covered |= {f"{name}.weight_int8", f"{name}.weight_scale"}
    for key, value in model.state_dict().items():
        if key not in covered and key not in tensors:
            tensors[key] = value.detach().clone()
    return {k: v.contiguous() for k, v in tensors.items()}, {"layers": layers}


def save_packed(model: nn.Module, path: str | os.PathLike) -> int:
    """Write the packed file atomically; return its size in bytes."""
    tensors, meta = packed_tensors(model)
    path = Path(path)
    save_tensors(tensors, path, metadata={"edgeslim": json.dumps(meta)})
    return path.stat().st_size


def unpack_weights(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The integer weight codes of every packed layer, ``{layer: int64 array}``."""
    try:
        with safe_open(str(path), framework="np") as f:
            meta = json.loads((f.metadata() or {}).get("edgeslim", "{}"))
            out = {}
            keys = set(f.keys())
            for name, info in meta.get("layers", {}).items():
                shape, bits = info["shape"], info["bits"]
                if f"{name}.weight::int8" in keys:
                    out[name] = f.get_tensor(f"{name}.weight::int8").astype(np.int64)
                    continue
                count = math.prod(shape)
                v = unpack_bits(f.get_tensor(f"{name}.weight::packed"), bits, count)
                if info["kind"] == "int":
                    v = v + info["qmin"]
                elif bits == 1:
                    v = 2 * v - 1
                else:
                    v = v - 1
                out[name] = v.reshape(shape)
    except (OSError, KeyError, json.JSONDecodeError, ValueError) as exc:
        raise CheckpointError(f"cannot read packed weights {path}: {exc}") from exc
    return out
