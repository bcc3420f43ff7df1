"""Pruning masks that persist through training, saving and reloading.

A pruned parameter ``weight`` of a module gets a bool buffer ``weight_keep`` of the same
shape (True = kept). The parameter itself holds exact zeros where the mask is False, so the
model stays an ordinary ``nn.Module`` that any code can run. Training loops keep the zeros
with :func:`mask_grads_` (before ``optimizer.step()``) and :func:`apply_masks_` (after it);
:func:`edgeslim.fit` does both. The buffers travel in ``state_dict()``.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from .models.storage import MASK_SUFFIX


def iter_masks(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, torch.Tensor]]:
    """Yield ``(module_name, module, param_name, keep)`` for every masked parameter."""
    for mname, module in model.named_modules():
        for bname, keep in module.named_buffers(recurse=False):
            if bname.endswith(MASK_SUFFIX):
                yield mname, module, bname[: -len(MASK_SUFFIX)], keep


@torch.no_grad()
def set_mask_(module: nn.Module, param_name: str, keep: torch.Tensor) -> None:
    """Attach (or replace) the mask of ``module.<param_name>`` and zero the pruned entries."""
    param = getattr(module, param_name)
    if keep.shape != param.shape:
        raise ValueError(f"mask shape {tuple(keep.shape)} != {param_name} {tuple(param.shape)}")
    keep = keep.to(dtype=torch.bool, device=param.device)
    buffer = param_name + MASK_SUFFIX
    if hasattr(module, buffer):
        getattr(module, buffer).copy_(keep)
    else:
        module.register_buffer(buffer, keep.clone())
    param.mul_(keep)


def get_mask(module: nn.Module, param_name: str) -> torch.Tensor | None:
    """The mask of ``module.<param_name>``, or None when it is not pruned."""
    return getattr(module, param_name + MASK_SUFFIX, None)


@torch.no_grad()
def apply_masks_(model: nn.Module) -> None:
    """Zero every pruned weight again (call after each optimizer step)."""
    for _, module, pname, keep in iter_masks(model):
        getattr(module, pname).mul_(keep)


@torch.no_grad()
def mask_grads_(model: nn.Module) -> None:
    """Zero the gradients of pruned weights (call before each optimizer step)."""
    for _, module, pname, keep in iter_masks(model):
        grad = getattr(module, pname).grad
        if grad is not None:
            grad.mul_(keep)


def add_mask_buffers_(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Create the mask buffers that ``state`` has and ``model`` lacks, before load_state_dict."""
    modules = dict(model.named_modules())
    for key, value in state.items():
        if not key.endswith(MASK_SUFFIX):
            continue
        mname, _, bname = key.rpartition(".")
        module = modules.get(mname)
        if module is not None and not hasattr(module, bname):
            module.register_buffer(bname, torch.ones_like(value, dtype=torch.bool))


def remove_masks_(model: nn.Module) -> None:
    """Drop the mask buffers (the zeros stay): the weights become free to train again."""
    for _, module, pname, _ in list(iter_masks(model)):
        delattr(module, pname + MASK_SUFFIX)
