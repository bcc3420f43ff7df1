"""A model as a sequence of blocks, and the calibration inputs that reach the first one.

Blocks are found without architecture tables: the ``nn.ModuleList`` of identical modules
holding the most parameters (BERT ``encoder.layer``, GPT-2 ``transformer.h``, OPT
``model.decoder.layers``, Llama ``model.layers``). A model without one (an MLP) is treated
as a single block by the engine. The inputs of block 0 (positional and keyword: hidden
states, attention mask, rotary embeddings ...) are recorded by a pre-hook that stops the
forward pass there.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from edgeslim.core.errors import ShapeError
from edgeslim.core.hooks import iter_batches
from edgeslim.core.linear import is_linear

Batch = Any  # a tensor of input ids / features, or a dict of keyword arguments
BlockInputs = list[tuple[tuple[Any, ...], dict[str, Any]]]  # (args, kwargs) per batch


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


def calibration_batches(
    calib: torch.Tensor | Iterable[Batch],
    batch_size: int,
    device: torch.device | str | None = None,
) -> list[Batch]:
    """The calibration set as a list of batches (tensor slices or the given items), moved to
    ``device`` when given (the model's: inputs follow the model)."""
    batches = list(iter_batches(calib, batch_size, device=device))
    if not batches:
        raise ShapeError("calibration data is empty: give at least one batch")
    return batches


def _call(model: nn.Module, batch: Batch) -> Any:
    return model(**batch) if isinstance(batch, dict) else model(batch)


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


def _first(out: Any) -> torch.Tensor:
    """The hidden states a block returns (a tensor, or the first item of a tuple)."""
    return out[0] if isinstance(out, (tuple, list)) else out


def next_inputs(block: nn.Module, inputs: BlockInputs) -> BlockInputs:
    """Run ``block`` on each of its inputs: the inputs of the next block (same kwargs)."""
    return [((_first(block(*args, **kw)), *args[1:]), kw) for args, kw in inputs]
