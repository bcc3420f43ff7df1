"""Where a model lives, and moving a batch there whole.

    device = model_device(model)           # the device of its first parameter (or buffer)
    x, y = to_device((x, y), device)        # tensors inside tuples, lists and mappings

Nothing here is hard-wired to a kind of device: ``cpu``, ``cuda``, ``mps`` ... are whatever
torch says the model's tensors are on. Moving a tensor that is already there is free
(``Tensor.to`` returns the tensor itself), so the CPU path costs nothing.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (else first buffer); CPU for a stateless one."""
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    return torch.device("cpu")


def to_device(batch: Any, device: torch.device | str) -> Any:
    """``batch`` with every tensor in it on ``device``: a tensor, or tuples, lists and mappings
    (dicts, a tokenizer's ``BatchEncoding``) of them, nested; other leaves are kept as they are.

    Containers keep their type (a named tuple stays one, a ``BatchEncoding`` stays one when its
    type can be rebuilt from a dict, else a plain dict is returned).
    """
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        moved = {key: to_device(value, device) for key, value in batch.items()}
        try:
            return type(batch)(moved)
        except Exception:  # a mapping type that is not built from a dict
            return moved
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a named tuple
        return type(batch)(*(to_device(value, device) for value in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(value, device) for value in batch)
    return batch
