"""Streaming: compress a model bigger than memory, block by block from safetensors shards.

:func:`compress_sharded` builds the model on the ``meta`` device, reads the modules before
the blocks from the shards only to compute the inputs of block 0 and releases them, then
reads each block when its turn comes (:class:`ShardReader`, tensors assigned as they are),
compresses it with the engine's :func:`~.engine.compress_block_`, writes it to its own output
shard (with ``models/hf.py``'s writer, which never imports this package's engine) and
releases it before reading the next. Tensors outside the blocks are copied through.

With ``device=`` (e.g. ``"cuda"``) the shards are still read on the CPU, but each block is
moved to the device for its statistics and compression and back to the CPU to be written;
the embeddings run there to compute the inputs of block 0, and the activations between
blocks stay there. Only one block is ever on the device.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgeslim.core.device_check import check_device
from edgeslim.core.errors import CheckpointError, ConfigError
from edgeslim.core.models.hf import model_class_for, write_index, write_shard
from edgeslim.core.progress import console, enabled, progress_bar
from edgeslim.core.selection import FilterFn, layer_filter
from edgeslim.oneshot.blocks import Batch, calibration_batches, capture_block_inputs, find_blocks
from edgeslim.oneshot.engine import Plan, compress_block_
from edgeslim.oneshot.registry import algorithm_for


def _shard_index(directory: Path) -> dict[str, Path]:
    """Tensor name -> shard file, from ``model.safetensors.index.json`` or one file."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise CheckpointError(f"{index} is not a safetensors index: {exc}") from exc
        return {name: directory / file for name, file in weight_map.items()}
    single = directory / "model.safetensors"
    if not single.is_file():
        raise CheckpointError(
            f"{directory} has neither model.safetensors nor model.safetensors.index.json"
        )
    from safetensors import safe_open

    with safe_open(str(single), framework="pt") as f:
        return dict.fromkeys(f.keys(), single)


class ShardReader:
    """Reads named tensors from safetensors shards on demand (memory-mapped, one at a time)."""

    def __init__(self, directory: Path):
        self.where = _shard_index(directory)

    def get(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for name in names:
            if name not in self.where:
                raise CheckpointError(f"tensor {name!r} is in no shard")
            by_file.setdefault(self.where[name], []).append(name)
        out: dict[str, torch.Tensor] = {}
        for path, group in by_file.items():
            with safe_open(str(path), framework="pt") as f:
                for name in group:
                    out[name] = f.get_tensor(name)
        return out


@torch.no_grad()
def _materialize_(
    module: nn.Module,
    prefix: str,
    reader: ShardReader,
    fresh: dict[str, torch.Tensor],
    recurse: bool = True,
) -> None:
    """Give ``module`` (on the meta device) its tensors, read from the shards under ``prefix``
    and assigned as they are (no second copy). Buffers that are not in a checkpoint (rotary
    frequencies, position ids) come from ``fresh`` (local name -> tensor). With
    ``recurse=False`` only the module's own tensors, not its children's."""
    names = [k for k in module.state_dict() if recurse or "." not in k]
    missing = [prefix + k for k in names if prefix + k not in reader.where]
    if missing:
        raise CheckpointError(f"tensors {missing[:3]} are in no shard")
    loaded = reader.get(prefix + k for k in names)
    module.load_state_dict({k: loaded[prefix + k] for k in names}, assign=True, strict=recurse)
    for key, buf in list(module.named_buffers(recurse=recurse)):
        if buf.is_meta:
            if key not in fresh:
                raise CheckpointError(f"buffer {prefix}{key} is in no shard and cannot be rebuilt")
            owner, _, name = key.rpartition(".")
            module.get_submodule(owner)._buffers[name] = fresh[key].clone()


@torch.no_grad()
def _own_to_(module: nn.Module, device: torch.device) -> None:
    """Move ``module``'s own parameters and buffers (not its children's) to ``device``."""
    for key, param in module._parameters.items():
        if param is not None and param.device != device:
            module._parameters[key] = nn.Parameter(param.to(device), param.requires_grad)
    for key, buf in module._buffers.items():
        if buf is not None and buf.device != device:
            module._buffers[key] = buf.to(device)


def _under(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of ``tensors`` whose names start with ``prefix``, without it."""
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def release_memory() -> None:
    """Give freed memory back to the operating system (glibc's ``malloc_trim``; no-op elsewhere).

    glibc serves the large, equal-sized tensors of successive blocks from its heap once a big
    block was freed, and keeps that heap: without trimming, the resident size of a streaming
    run grows by about a block per block even though nothing is referenced any more.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def compress_sharded(
    source: str | os.PathLike,
    out: str | os.PathLike,
    cfg: Any,
    *,
    calib: torch.Tensor | Iterable[Batch],
    filter_fn: FilterFn | None = None,
    progress: bool | None = None,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Compress the transformers model saved as safetensors shards in ``source`` into ``out``.

    ``cfg`` is a one-shot config (:class:`~edgeslim.prune.Wanda`, ``SparseGPT``, ``GPTQ``,
    ``SmoothQuant``). Only the embeddings, one block at a time and the statistics of its layers
    are ever in memory: the model is built on the ``meta`` device, the modules before the
    blocks are read to compute the inputs of block 0 and released, then each block is read
    from the shards, compressed, written to its own shard in ``out`` and released. Tensors
    that are not in a block (embeddings, final norm, LM head) are copied through. ``out`` is a
    transformers directory (``config.json``, shards, index) that ``load_model("hf:OUT")``
    reads back. ``device`` (default the CPU) is where each block is compressed: blocks are read
    on the CPU, moved there for their compute and moved back to be written. Returns the
    algorithm's log entry per layer.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    algo, label = algorithm_for(cfg)
    target = check_device("cpu" if device is None else device, "device")
    source, out = Path(source), Path(out)
    if calib is None:
        raise ConfigError(f"{label} needs calibration data: pass calib=...")
    try:
        config = AutoConfig.from_pretrained(str(source))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{source} is not a transformers model directory: {exc}") from exc
    reader = ShardReader(source)
    cls = model_class_for(config, default=AutoModelForCausalLM)
    config.use_cache = False
    with torch.device("meta"):
        model = cls(config)
    found = find_blocks(model)
    if found is None:
        raise ConfigError(f"{type(model).__name__}: no list of transformer blocks found")
    prefix, blocks = found
    # a one-block instance on the CPU supplies the buffers that are not in the checkpoint
    tiny = {_layers_key(config): 1, "vocab_size": 8, "pad_token_id": None, "bos_token_id": None}
    small_cfg = type(config).from_dict({**config.to_dict(), **tiny, "eos_token_id": None})
    small = cls(small_cfg)
    persistent = set(small.state_dict())
    fresh = {k: v for k, v in small.named_buffers() if k not in persistent}
    del small

    in_block = [f"{prefix}.{i}" for i in range(len(blocks))]

    def outside(name: str) -> bool:
        return not any(name == b or name.startswith(b + ".") for b in in_block)

    # the modules outside the blocks except the LM head, which runs after them
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    before = [
        (name, m)
        for name, m in model.named_modules()
        if name and name != prefix and outside(name) and m is not head
    ]
    for name, module in before:
        _materialize_(module, f"{name}.", reader, _under(fresh, f"{name}."), recurse=False)
        _own_to_(module, target)
    keep = layer_filter(getattr(cfg, "exclude", []), filter_fn)
    batches = calibration_batches(calib, getattr(cfg, "batch_size", 8), target)
    out.mkdir(parents=True, exist_ok=True)
    rest = [k for k in reader.where if outside(k.rsplit(".", 1)[0])]
    n_files = len(blocks) + len(rest)  # one shard per block, one per tensor outside them
    weight_map: dict[str, str] = {}
    log: dict[str, Any] = {}
    with torch.no_grad():
        model.eval()
        inputs = capture_block_inputs(model, blocks[0], batches)
        for _, module in before:  # not needed any more: give their memory back
            module.to("meta")
        release_memory()
        console.print(Plan.of(blocks, inputs, algo).describe(f"{label} (streaming from {source})"))
        with progress_bar(disable=not enabled(progress)) as bar:
            task = bar.add_task(label, total=len(blocks))
            for index, block in enumerate(blocks):
                bar.update(task, description=f"{label} block {index + 1}/{len(blocks)}")
                name = in_block[index]
                _materialize_(block, f"{name}.", reader, _under(fresh, f"{prefix}.0."))
                block.to(target).eval()
                block_log, inputs = compress_block_(block, inputs, algo, name, keep)
                log.update(block_log)
                block.to("cpu")  # written from the CPU
                file = f"model-{index + 1:05d}-of-{n_files:05d}.safetensors"
                weight_map.update(dict.fromkeys(write_shard(block, out / file, f"{name}."), file))
                block.to("meta")  # release the block
                release_memory()
                bar.update(task, advance=1)
        for index, key in enumerate(rest, start=len(blocks) + 1):
            file = f"model-{index:05d}-of-{n_files:05d}.safetensors"
            weight_map.update(dict.fromkeys(write_shard(reader.get([key]), out / file), file))
    config.use_cache = True
    if not getattr(config, "architectures", None):
        config.architectures = [cls.__name__]
    config.save_pretrained(str(out))
    write_index(out, weight_map)
    return log


def _layers_key(config: Any) -> str:
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if hasattr(config, key):
            return key
    raise ConfigError(f"{type(config).__name__} names no layer count")
