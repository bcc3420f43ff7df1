"""Pruning masks and shared weights that persist through training, saving and reloading.

A pruned parameter ``weight`` of a module gets a bool buffer ``weight_keep`` of the same
shape (True = kept). The parameter itself holds exact zeros where the mask is False, so the
model stays an ordinary ``nn.Module`` that any code can run. Training loops keep the zeros
with :func:`mask_grads_` (before ``optimizer.step()``) and :func:`apply_masks_` (after it);
:func:`edgeslim.fit` does both. The buffers travel in ``state_dict()``.

Weight sharing (:mod:`edgeslim.share.kmeans`) is the same kind of constraint. A shared
``weight`` gets an integer buffer ``weight_codes`` (0 = a zero weight, c >= 1 = the c-th
shared value) and a trainable parameter ``weight_centroids`` (k,); the weight itself stays
an ordinary parameter holding exactly ``centroids[codes - 1]`` (0 where the code is 0).
:func:`mask_grads_` sums each shared weight's gradient into its centroid (Han et al. 2016,
eq. 3) and drops the weight's own gradient, so the optimizer moves only the centroids;
:func:`apply_masks_` writes the centroids back into the weights.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from edgeslim.core.models.storage import CENTROIDS_SUFFIX, CODES_SUFFIX, MASK_SUFFIX


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
    codes = getattr(module, param_name + CODES_SUFFIX, None)
    if codes is not None:  # a shared weight pruned further: its code becomes 0
        codes.mul_(keep)


def get_mask(module: nn.Module, param_name: str) -> torch.Tensor | None:
    """The mask of ``module.<param_name>``, or None when it is not pruned."""
    return getattr(module, param_name + MASK_SUFFIX, None)


@torch.no_grad()
def apply_masks_(model: nn.Module) -> None:
    """Zero every pruned weight again (call after each optimizer step)."""
    for _, module, pname, keep in iter_masks(model):
        getattr(module, pname).mul_(keep)
    for _, module, pname, codes, centroids in iter_shared(model):
        getattr(module, pname).copy_(shared_values(codes, centroids))


@torch.no_grad()
def mask_grads_(model: nn.Module) -> None:
    """Zero the gradients of pruned weights (call before each optimizer step)."""
    for _, module, pname, keep in iter_masks(model):
        grad = getattr(module, pname).grad
        if grad is not None:
            grad.mul_(keep)
    for _, module, pname, codes, centroids in iter_shared(model):
        weight = getattr(module, pname)
        if weight.grad is None:
            continue
        sums = weight.grad.new_zeros(centroids.numel() + 1)  # slot 0: zeros
        sums.index_add_(0, codes.reshape(-1).long(), weight.grad.reshape(-1))
        grad = sums[1:].to(centroids.dtype)
        centroids.grad = grad if centroids.grad is None else centroids.grad + grad
        weight.grad = None


def add_mask_buffers_(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Create the mask and sharing tensors that ``state`` has and ``model`` lacks.

    Call before ``model.load_state_dict(state)``: masks and codes become buffers, centroids
    parameters, each shaped like its entry in ``state``.
    """
    modules = dict(model.named_modules())
    for key, value in state.items():
        if not key.endswith((MASK_SUFFIX, CODES_SUFFIX, CENTROIDS_SUFFIX)):
            continue
        mname, _, bname = key.rpartition(".")
        module = modules.get(mname)
        if module is None or hasattr(module, bname):
            continue
        if key.endswith(CENTROIDS_SUFFIX):
            module.register_parameter(bname, nn.Parameter(torch.zeros_like(value)))
        else:
            module.register_buffer(bname, torch.zeros_like(value))


def remove_masks_(model: nn.Module) -> None:
    """Drop the mask buffers (the zeros stay): the weights become free to train again."""
    for _, module, pname, _ in list(iter_masks(model)):
        delattr(module, pname + MASK_SUFFIX)


# --------------------------------------------------------------------------------------
# shared weights
# --------------------------------------------------------------------------------------


def iter_shared(
    model: nn.Module,
) -> Iterator[tuple[str, nn.Module, str, torch.Tensor, nn.Parameter]]:
    """Yield ``(module_name, module, param_name, codes, centroids)`` for every shared weight."""
    for mname, module in model.named_modules():
        for bname, codes in module.named_buffers(recurse=False):
            if bname.endswith(CODES_SUFFIX):
                pname = bname[: -len(CODES_SUFFIX)]
                centroids = getattr(module, pname + CENTROIDS_SUFFIX, None)
                if centroids is not None:
                    yield mname, module, pname, codes, centroids


def shared_values(codes: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """The weight that ``codes`` stand for: 0 for code 0, ``centroids[c - 1]`` for c >= 1."""
    table = torch.cat([centroids.detach().new_zeros(1), centroids.detach()])  # (k + 1,)
    return table[codes.long()]


@torch.no_grad()
def set_shared_(
    module: nn.Module, param_name: str, codes: torch.Tensor, centroids: torch.Tensor
) -> None:
    """Share ``module.<param_name>``: attach its codes and centroids and tie its values."""
    param = getattr(module, param_name)
    if codes.shape != param.shape:
        raise ValueError(f"codes shape {tuple(codes.shape)} != {param_name} {tuple(param.shape)}")
    name = param_name + CENTROIDS_SUFFIX
    centroids = centroids.detach().to(dtype=param.dtype, device=param.device).reshape(-1)
    if hasattr(module, name):
        delattr(module, name)
    module.register_parameter(name, nn.Parameter(centroids.clone()))
    codes = codes.detach().to(param.device)
    module.register_buffer(param_name + CODES_SUFFIX, codes.clone())
    param.copy_(shared_values(codes, centroids))


def remove_sharing_(model: nn.Module) -> None:
    """Drop codes and centroids (the weights keep their values and train freely again)."""
    for _, module, pname, _, _ in list(iter_shared(model)):
        delattr(module, pname + CODES_SUFFIX)
        delattr(module, pname + CENTROIDS_SUFFIX)
