"""Where a model runs, and moving its inputs there: inputs follow the model, never the reverse.

    device = model_device(model)           # the device of its first parameter (or buffer)
    batch = to_device(batch, device)       # tensors, tuples, lists, dicts, BatchEncoding ...

On the CPU, moving a CPU tensor is a no-op (``Tensor.to`` returns the tensor itself).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter, else its first buffer, else the CPU."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def to_device(batch: Any, device: torch.device | str) -> Any:
    """``batch`` with every tensor in it moved to ``device``.

    Tensors, tuples, lists and mappings (dicts, a tokenizer's ``BatchEncoding``) are walked;
    a mapping comes back as a plain ``dict``; anything else is returned unchanged.
    """
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple):
        return tuple(to_device(v, device) for v in batch)
    if isinstance(batch, list):
        return [to_device(v, device) for v in batch]
    return batch
