"""Layer-by-layer calibration engine: one-shot compression of big models in bounded memory.

One-shot methods for transformers (Wanda, SparseGPT, GPTQ, SmoothQuant) need statistics of
each linear layer's *inputs* on a little calibration data. Running the whole model with hooks
on every layer would hold every layer's statistics (a Hessian of ``in x in`` floats each) and
all activations at once. Instead, as in the GPTQ/SparseGPT reference code, the model is
processed one transformer block at a time::

    inputs of block 0  <- run the calibration batches up to block 0, then stop
    for each block i:
        run block i on its inputs with hooks          -> statistics of its linear layers
        compress block i from those statistics        (the algorithm's job)
        run the compressed block i on the same inputs -> inputs of block i + 1

so the peak memory is about one block, its statistics and the activations of the calibration
set at one depth. Errors of block i are seen by block i + 1 (sequential, as in the papers).
:func:`compress_sharded` goes one step further for models that do not fit in memory: it
builds the model on the ``meta`` device, reads each block's weights from safetensors shards
when its turn comes and writes the compressed block out before reading the next.

Blocks are found without architecture tables: the ``nn.ModuleList`` of identical modules
holding the most parameters (BERT ``encoder.layer``, GPT-2 ``transformer.h``, OPT
``model.decoder.layers``, Llama ``model.layers``). A model without one (an MLP) is treated
as a single block. Linear layers are ``nn.Linear`` and transformers' ``Conv1D`` (GPT-2's,
with the weight stored transposed); :func:`weight_matrix` always gives ``(out, in)``.

An algorithm plugs in as a :class:`OneShotAlgorithm`: which statistics to collect for a
layer (:class:`InputNorms`, :class:`Hessian`, :class:`InputAbsMax`) and how to compress a
block given them.
"""

from __future__ import annotations

import contextlib
import ctypes
import fnmatch
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from edgeslim.core.errors import CheckpointError, ConfigError, ShapeError
from edgeslim.core.hooks import eval_mode, forward_hooks, iter_batches
from edgeslim.core.progress import console, enabled, progress_bar

FilterFn = Callable[[nn.Module, str], bool]
Batch = Any  # a tensor of input ids / features, or a dict of keyword arguments
BlockInputs = list[tuple[tuple[Any, ...], dict[str, Any]]]  # (args, kwargs) per batch


# --------------------------------------------------------------------------------------
# linear layers: nn.Linear and transformers' Conv1D, always seen as W (out, in)
# --------------------------------------------------------------------------------------


def is_linear(module: nn.Module) -> bool:
    """``nn.Linear`` or transformers' ``Conv1D`` (a linear layer with a transposed weight)."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _transposed(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"  # weight (in, out)


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """A float32 copy of the layer's weight as ``(out, in)``."""
    w = module.weight.detach()
    return (
        (w.t() if _transposed(module) else w).float().clone(memory_format=torch.contiguous_format)
    )


@torch.no_grad()
def set_weight_matrix_(module: nn.Module, w: torch.Tensor) -> None:
    """Write ``w`` ``(out, in)`` back into the layer's weight (its dtype and layout)."""
    target = module.weight
    target.copy_((w.t() if _transposed(module) else w).to(target.dtype))


def to_param_layout(module: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """A tensor shaped like ``W (out, in)`` in the layout of the layer's own weight."""
    return t.t().contiguous() if _transposed(module) else t


# --------------------------------------------------------------------------------------
# statistics of a layer's inputs
# --------------------------------------------------------------------------------------


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.detach().reshape(-1, x.shape[-1]).float()  # (tokens, in)


class InputNorms:
    """Sum of squares of each input feature over all tokens: ||X_j||^2 (Wanda)."""

    def __init__(self, in_features: int):
        self.sq = torch.zeros(in_features, dtype=torch.float64)  # (in,)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        rows = _rows(x)  # (tokens, in)
        self.sq += rows.pow(2).sum(0).double()
        self.tokens += rows.shape[0]

    @staticmethod
    def nbytes(in_features: int) -> int:
        return 8 * in_features


class Hessian:
    """H = 2/n X^T X over all n calibration tokens (SparseGPT, GPTQ), summed in float64."""

    def __init__(self, in_features: int):
        self.xtx = torch.zeros(in_features, in_features, dtype=torch.float64)  # (in, in)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        rows = _rows(x)  # (tokens, in)
        self.xtx += (rows.t() @ rows).double()  # float32 product, float64 running sum
        self.tokens += rows.shape[0]

    @property
    def h(self) -> torch.Tensor:
        return (2.0 / max(1, self.tokens)) * self.xtx  # (in, in)

    @staticmethod
    def nbytes(in_features: int) -> int:
        return 8 * in_features * in_features


class InputAbsMax:
    """Largest |x_j| of each input feature over all tokens (SmoothQuant, static act scales)."""

    def __init__(self, in_features: int):
        self.absmax = torch.zeros(in_features)  # (in,)

    def add(self, x: torch.Tensor) -> None:
        self.absmax = torch.maximum(self.absmax, _rows(x).abs().amax(0))

    @staticmethod
    def nbytes(in_features: int) -> int:
        return 4 * in_features


def damped_inverse_cholesky(h: torch.Tensor, w: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp I)^-1, as in the SparseGPT/GPTQ reference code.

    ``h`` (in, in) float64; ``w`` (out, in) is changed in place: inputs that were always zero
    ("dead", H_jj = 0) get H_jj = 1 and their weights 0. ``damp = percdamp * mean(diag H)``.
    """
    h = h.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    damp = percdamp * torch.mean(torch.diag(h))
    h += damp * torch.eye(h.shape[0], dtype=h.dtype)
    try:
        lower = torch.linalg.cholesky(h)
    except RuntimeError as exc:
        raise ConfigError(
            f"the calibration Hessian is not positive definite even with percdamp={percdamp}: "
            "use more calibration data or a larger percdamp"
        ) from exc
    hinv = torch.cholesky_inverse(lower)
    return torch.linalg.cholesky(hinv, upper=True)


# --------------------------------------------------------------------------------------
# the algorithm interface
# --------------------------------------------------------------------------------------


class Stats(Protocol):
    def add(self, x: torch.Tensor) -> None: ...


class OneShotAlgorithm(Protocol):
    """What an algorithm tells the engine."""

    stats_type: type  # InputNorms, Hessian or InputAbsMax: one per linear layer

    def compress_block(
        self, block: nn.Module, layers: dict[str, nn.Module], stats: dict[str, Any]
    ) -> dict[str, Any]:
        """Compress ``layers`` (full name -> module, all inside ``block``) in place;
        return a log entry per layer."""
        ...


def layer_filter(exclude: list[str], filter_fn: FilterFn | None) -> FilterFn:
    """A filter that keeps layers that ``filter_fn`` accepts and no ``exclude`` glob matches."""

    def keep(module: nn.Module, name: str) -> bool:
        if any(fnmatch.fnmatchcase(name, p) for p in exclude):
            return False
        return filter_fn is None or filter_fn(module, name)

    return keep


# --------------------------------------------------------------------------------------
# finding blocks and their inputs
# --------------------------------------------------------------------------------------


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The ``nn.ModuleList`` of identical blocks holding the most parameters, with its name."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(b) for b in module}) != 1:
            continue
        if not any(is_linear(m) for m in module[0].modules()):
            continue
        size = sum(p.numel() for p in module.parameters())
        if best is None or size > best[0]:
            best = (size, name, module)
    return None if best is None else (best[1], best[2])


def _call(model: nn.Module, batch: Batch) -> Any:
    return model(**batch) if isinstance(batch, dict) else model(batch)


def _first(out: Any) -> torch.Tensor:
    """The hidden states a block returns (a tensor, or the first item of a tuple)."""
    return out[0] if isinstance(out, (tuple, list)) else out


class _Stop(Exception):
    """Raised by the hook on block 0 once its inputs are recorded."""


def capture_block_inputs(model: nn.Module, first: nn.Module, batches: list[Batch]) -> BlockInputs:
    """Run each batch through ``model`` up to ``first`` and record its (args, kwargs)."""
    captured: BlockInputs = []

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        captured.append((args, kwargs))
        raise _Stop

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for index, batch in enumerate(batches):
            try:
                _call(model, batch)
            except _Stop:
                continue
            except (RuntimeError, TypeError, IndexError) as exc:
                shape = tuple(batch.shape) if isinstance(batch, torch.Tensor) else type(batch)
                first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                raise ShapeError(
                    f"{type(model).__name__} cannot run calibration batch {index} ({shape}): "
                    f"{first_line}"
                ) from exc
            raise ShapeError(f"calibration batch {index} never reached the first block")
    finally:
        handle.remove()
    return captured


def _with_hidden(args: tuple[Any, ...], hidden: torch.Tensor) -> tuple[Any, ...]:
    return (hidden, *args[1:])


# --------------------------------------------------------------------------------------
# the engine
# --------------------------------------------------------------------------------------


@dataclass
class Plan:
    """What :func:`compress_layerwise` will hold in memory at once (bytes), before starting."""

    blocks: int
    block_bytes: int  # the largest block's parameters
    activation_bytes: int  # block inputs + outputs of the whole calibration set
    stats_bytes: int  # statistics of the largest block's linear layers
    tokens: int

    @classmethod
    def of(cls, blocks: Any, inputs: BlockInputs, algo: OneShotAlgorithm) -> Plan:
        """The plan for ``blocks`` (sizes read from the modules, even on the meta device)."""
        tokens, act = _tokens(inputs)
        return cls(
            blocks=len(blocks),
            block_bytes=max(_param_bytes(b) for b in blocks),
            activation_bytes=2 * act,
            stats_bytes=max(_stats_bytes(b, algo.stats_type) for b in blocks),
            tokens=tokens,
        )

    @property
    def peak_bytes(self) -> int:
        return self.block_bytes + self.activation_bytes + self.stats_bytes

    def describe(self, label: str) -> str:
        mb = 1 / 2**20
        return (
            f"{label}: {self.blocks} block(s), {self.tokens:,} calibration tokens; "
            f"memory estimate ≈ {self.peak_bytes * mb:,.1f} MiB = block "
            f"{self.block_bytes * mb:,.1f} + activations {self.activation_bytes * mb:,.1f} + "
            f"statistics {self.stats_bytes * mb:,.1f} (plus what is outside the blocks)"
        )


def _block_layers(block: nn.Module, prefix: str, keep: FilterFn) -> dict[str, nn.Module]:
    layers = {}
    for name, module in block.named_modules():
        full = f"{prefix}.{name}" if prefix and name else (prefix or name)
        if is_linear(module) and keep(module, full):
            layers[full] = module
    return layers


def _stats_bytes(block: nn.Module, stats_type: type) -> int:
    return sum(stats_type.nbytes(weight_in(m)) for m in block.modules() if is_linear(m))


def weight_in(module: nn.Module) -> int:
    """Input features of a linear layer."""
    return module.weight.shape[0 if _transposed(module) else 1]


def _tokens(inputs: BlockInputs) -> tuple[int, int]:
    """(tokens, bytes) of the hidden states in ``inputs``."""
    tokens = nbytes = 0
    for args, _ in inputs:
        h = args[0]
        tokens += h.numel() // h.shape[-1]
        nbytes += h.numel() * h.element_size()
    return tokens, nbytes


def compress_block_(
    block: nn.Module,
    inputs: BlockInputs,
    algo: OneShotAlgorithm,
    prefix: str,
    keep: FilterFn,
) -> tuple[dict[str, Any], BlockInputs]:
    """Statistics -> compression -> outputs for one block; returns (log, next inputs)."""
    layers = _block_layers(block, prefix, keep)
    stats = {name: algo.stats_type(weight_in(m)) for name, m in layers.items()}

    def see(name: str, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        stats[name].add(args[0])

    if layers:
        with forward_hooks(layers, see):
            for args, kwargs in inputs:
                block(*args, **kwargs)
        log = algo.compress_block(block, layers, stats)
    else:
        log = {}
    stats.clear()  # free the statistics before the next block
    outputs = [(_with_hidden(args, _first(block(*args, **kw))), kw) for args, kw in inputs]
    return log, outputs


def calibration_batches(calib: torch.Tensor | Iterable[Batch], batch_size: int) -> list[Batch]:
    """The calibration set as a list of batches (tensor slices or the given items)."""
    batches = list(iter_batches(calib, batch_size))
    if not batches:
        raise ShapeError("calibration data is empty: give at least one batch")
    return batches


def compress_layerwise(
    model: nn.Module,
    calib: torch.Tensor | Iterable[Batch],
    algo: OneShotAlgorithm,
    *,
    filter_fn: FilterFn | None = None,
    exclude: list[str] | None = None,
    batch_size: int = 8,
    label: str = "one-shot",
    progress: bool | None = None,
) -> dict[str, Any]:
    """Compress every linear layer of ``model`` in place, one block at a time.

    ``calib`` is a tensor of inputs ``(N, ...)`` (token ids for a language model) or an
    iterable of batches (tensors, or dicts of keyword arguments such as ``input_ids`` and
    ``attention_mask``). Prints a memory estimate first and shows progress per block.
    Returns the algorithm's log entry per layer name.
    """
    if calib is None:
        raise ConfigError(f"{label} needs calibration data: pass calib=...")
    keep = layer_filter(exclude or [], filter_fn)
    found = find_blocks(model)
    prefix, blocks = found if found is not None else ("", [model])
    batches = calibration_batches(calib, batch_size)
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    if use_cache is not None:
        config.use_cache = False  # no key/value caches during calibration
    log: dict[str, Any] = {}
    try:
        with eval_mode(model), torch.no_grad():
            if found is None:
                inputs: BlockInputs = [((b,), {}) for b in batches]
            else:
                inputs = capture_block_inputs(model, blocks[0], batches)
            console.print(Plan.of(blocks, inputs, algo).describe(label))
            with progress_bar(disable=not enabled(progress)) as bar:
                task = bar.add_task(label, total=len(blocks))
                for index, block in enumerate(blocks):
                    bar.update(task, description=f"{label} block {index + 1}/{len(blocks)}")
                    name = f"{prefix}.{index}" if found is not None else ""
                    block_log, inputs = compress_block_(block, inputs, algo, name, keep)
                    log.update(block_log)
                    bar.update(task, advance=1)
    finally:
        if use_cache is not None:
            config.use_cache = use_cache
    if not log:
        raise ConfigError(f"{label}: no linear layer was selected in {type(model).__name__}")
    return log


def _param_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


# --------------------------------------------------------------------------------------
# streaming: a model bigger than memory, read and written block by block from shards
# --------------------------------------------------------------------------------------


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


def algorithm_for(cfg: Any) -> tuple[OneShotAlgorithm, str]:
    """The engine-side algorithm of a one-shot config (Wanda, SparseGPT, GPTQ, SmoothQuant)."""
    from edgeslim.prune.sparsegpt import SparseGPT, SparseGPTAlgorithm
    from edgeslim.prune.wanda import Wanda, WandaAlgorithm
    from edgeslim.quant.gptq import GPTQ, GPTQAlgorithm
    from edgeslim.quant.smoothquant import SmoothQuant, SmoothQuantAlgorithm

    table = {
        Wanda: WandaAlgorithm,
        SparseGPT: SparseGPTAlgorithm,
        GPTQ: GPTQAlgorithm,
        SmoothQuant: SmoothQuantAlgorithm,
    }
    if type(cfg) not in table:
        known = ", ".join(c.__name__ for c in table)
        raise ConfigError(f"{type(cfg).__name__} is not a one-shot method; known: {known}")
    return table[type(cfg)](cfg), cfg.label


def one_shot_(
    model: nn.Module,
    cfg: Any,
    *,
    calib: Any = None,
    filter_fn: FilterFn | None = None,
    progress: bool | None = None,
) -> dict[str, Any]:
    """The ``prune_`` / ``quantize_`` handler of the one-shot configs (Wanda, SparseGPT, GPTQ,
    SmoothQuant): compress the linear layers of ``model`` in place, block by block.

    ``calib``: calibration inputs (token ids ``(N, seq)``, or a list of batches / dicts of
    keyword arguments). Returns the algorithm's log entry per layer (sparsity, weight MSE ...).
    """
    algo, label = algorithm_for(cfg)
    return compress_layerwise(
        model,
        calib,
        algo,
        filter_fn=filter_fn,
        exclude=cfg.exclude,
        batch_size=cfg.batch_size,
        label=label,
        progress=progress,
    )


def compress_sharded(
    source: str | os.PathLike,
    out: str | os.PathLike,
    cfg: Any,
    *,
    calib: torch.Tensor | Iterable[Batch],
    filter_fn: FilterFn | None = None,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Compress the transformers model saved as safetensors shards in ``source`` into ``out``.

    ``cfg`` is a one-shot config (:class:`~edgeslim.prune.Wanda`, ``SparseGPT``, ``GPTQ``,
    ``SmoothQuant``). Only the embeddings, one block at a time and the statistics of its layers
    are ever in memory: the model is built on the ``meta`` device, the modules before the
    blocks are read to compute the inputs of block 0 and released, then each block is read
    from the shards, compressed, written to its own shard in ``out`` and released. Tensors
    that are not in a block (embeddings, final norm, LM head) are copied through. ``out`` is a
    transformers directory (``config.json``, shards, index) that ``load_model("hf:OUT")``
    reads back. Returns the algorithm's log entry per layer.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from edgeslim.core.models.hf import model_class_for, write_index, write_shard

    algo, label = algorithm_for(cfg)
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
    keep = layer_filter(getattr(cfg, "exclude", []), filter_fn)
    batches = calibration_batches(calib, getattr(cfg, "batch_size", 8))
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
                block.eval()
                block_log, inputs = compress_block_(block, inputs, algo, name, keep)
                log.update(block_log)
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
