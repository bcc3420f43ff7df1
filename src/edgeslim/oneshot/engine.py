"""The block-by-block engine: statistics -> compression -> outputs, one block at a time.

For each block, hooks gather the statistics of its linear layers on the block's calibration
inputs, the algorithm compresses the layers one by one (:func:`compress_layers`, the one
per-layer loop of every algorithm), and the *compressed* block's outputs become the next
block's inputs. :class:`Plan` is the memory estimate printed before starting.
:func:`one_shot_` is the ``prune_`` / ``quantize_`` handler of the one-shot configs.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from edgeslim.core.device import model_device
from edgeslim.core.errors import ConfigError
from edgeslim.core.hooks import eval_mode, forward_hooks
from edgeslim.core.linear import is_linear, linear_layers, weight_in
from edgeslim.core.progress import console, enabled, progress_bar
from edgeslim.core.registry import Context
from edgeslim.core.selection import FilterFn, layer_filter
from edgeslim.oneshot.blocks import (
    Batch,
    BlockInputs,
    calibration_batches,
    capture_block_inputs,
    find_blocks,
    next_inputs,
)
from edgeslim.oneshot.registry import OneShotAlgorithm, algorithm_for


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


def _param_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _stats_bytes(block: nn.Module, stats_type: type) -> int:
    return sum(stats_type.nbytes(weight_in(m)) for m in block.modules() if is_linear(m))


def _tokens(inputs: BlockInputs) -> tuple[int, int]:
    """(tokens, bytes) of the hidden states in ``inputs``."""
    tokens = nbytes = 0
    for args, _ in inputs:
        h = args[0]
        tokens += h.numel() // h.shape[-1]
        nbytes += h.numel() * h.element_size()
    return tokens, nbytes


def compress_layers(
    algo: OneShotAlgorithm,
    block: nn.Module,
    layers: dict[str, nn.Module],
    stats: dict[str, Any],
) -> dict[str, Any]:
    """The algorithm's block step, then each layer compressed in turn; its log per layer."""
    algo.prepare_block(block, layers, stats)
    return {name: algo.compress_layer(name, module, stats[name]) for name, module in layers.items()}


def compress_block_(
    block: nn.Module,
    inputs: BlockInputs,
    algo: OneShotAlgorithm,
    prefix: str,
    keep: FilterFn,
) -> tuple[dict[str, Any], BlockInputs]:
    """Statistics -> compression -> outputs for one block; returns (log, next inputs).

    ``inputs`` must be on the block's device; each layer's statistics are allocated on the
    device of that layer's weight.
    """
    layers = linear_layers(block, prefix, keep)
    stats = {
        name: algo.stats_type(weight_in(m), device=m.weight.device) for name, m in layers.items()
    }

    def see(name: str, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        stats[name].add(args[0])

    if layers:
        with forward_hooks(layers, see):
            for args, kwargs in inputs:
                block(*args, **kwargs)
        log = compress_layers(algo, block, layers, stats)
    else:
        log = {}
    stats.clear()  # free the statistics before the next block
    return log, next_inputs(block, inputs)


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
    ``attention_mask``), on any device: the batches are moved to the model's device, where
    the statistics and the compression run too. Prints a memory estimate first and shows
    progress per block. Returns the algorithm's log entry per layer name.
    """
    if calib is None:
        raise ConfigError(f"{label} needs calibration data: pass calib=...")
    keep = layer_filter(exclude or [], filter_fn)
    found = find_blocks(model)
    prefix, blocks = found if found is not None else ("", [model])
    batches = calibration_batches(calib, batch_size, model_device(model))
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


ONE_SHOT_TAKES = ("calib", "filter_fn", "progress")  # what one_shot_ reads of its Context


def one_shot_(model: nn.Module, cfg: Any, ctx: Context) -> dict[str, Any]:
    """The ``prune_`` / ``quantize_`` handler of the one-shot configs (Wanda, SparseGPT, GPTQ,
    SmoothQuant): compress the linear layers of ``model`` in place, block by block.

    ``calib``: calibration inputs (token ids ``(N, seq)``, or a list of batches / dicts of
    keyword arguments). Returns the algorithm's log entry per layer (sparsity, weight MSE ...).
    """
    calib, filter_fn, progress = ctx.calib, ctx.filter_fn, ctx.progress
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
