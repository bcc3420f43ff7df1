"""The linear view: which modules are linear layers, and their weights always as (out, in).

Linear layers are ``nn.Linear`` and transformers' ``Conv1D`` (GPT-2's, with the weight stored
transposed, ``(in, out)``); :func:`weight_matrix` always gives ``(out, in)`` and
:func:`set_weight_matrix_` writes such a matrix back in the layer's own layout.
"""

from __future__ import annotations

import torch
from torch import nn

from edgeslim.core.selection import FilterFn


def is_linear(module: nn.Module) -> bool:
    """``nn.Linear`` or transformers' ``Conv1D`` (a linear layer with a transposed weight)."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _transposed(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"  # weight (in, out)


@torch.no_grad()
def conv1d_to_linear_(model: nn.Module) -> list[str]:
    """Replace every transformers ``Conv1D`` in ``model`` by the equivalent ``nn.Linear``
    (weight transposed to ``(out, in)``, same bias, dtype, device and ``requires_grad``) in
    place; returns the names replaced. The outputs stay the same up to float rounding
    (``addmm`` and ``linear`` may sum in another order). Tools that only know ``nn.Linear``
    (a dependency graph for structured pruning) can then handle GPT-2's linear layers.
    """
    replaced = []
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if not _transposed(child):
                continue
            w, b = child.weight, child.bias
            lin = nn.Linear(w.shape[0], w.shape[1], bias=b is not None, device=w.device)
            lin = lin.to(w.dtype)
            lin.weight.copy_(w.t())
            lin.weight.requires_grad_(w.requires_grad)
            if b is not None:
                lin.bias.copy_(b)
                lin.bias.requires_grad_(b.requires_grad)
            lin.train(child.training)
            setattr(parent, child_name, lin)
            replaced.append(f"{parent_name}.{child_name}" if parent_name else child_name)
    return replaced


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


def weight_in(module: nn.Module) -> int:
    """Input features of a linear layer."""
    return module.weight.shape[0 if _transposed(module) else 1]


def linear_layers(root: nn.Module, prefix: str, keep: FilterFn) -> dict[str, nn.Module]:
    """The linear layers under ``root`` that ``keep`` accepts, by full name (``prefix.NAME``)."""
    layers = {}
    for name, module in root.named_modules():
        full = f"{prefix}.{name}" if prefix and name else (prefix or name)
        if is_linear(module) and keep(module, full):
            layers[full] = module
    return layers


def tied_weights(model: nn.Module) -> dict[str, list[str]]:
    """Modules whose ``weight`` is the very tensor another module holds too (tied weights,
    like GPT-2's ``lm_head`` and ``transformer.wte``): module name -> the other owners'
    parameter names. A technique that changes such a weight would silently change the other
    module as well."""
    owners: dict[int, list[tuple[str, str]]] = {}
    for mname, module in model.named_modules(remove_duplicate=False):
        for pname, p in module.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append((mname, f"{mname}.{pname}" if mname else pname))
    out: dict[str, list[str]] = {}
    for mname, module in model.named_modules():
        w = getattr(module, "weight", None)
        if isinstance(w, torch.Tensor):
            others = [full for owner, full in owners.get(id(w), []) if owner != mname]
            if others:
                out[mname] = sorted(set(others))
    return out


def skip_tied(layers: dict[str, nn.Module], model: nn.Module, what: str) -> dict[str, nn.Module]:
    """``layers`` without those whose weight is tied to another module's (warning that each
    is left as it is, since ``what`` would change the other module too)."""
    import warnings

    tied = tied_weights(model)
    for name in [n for n in layers if n in tied]:
        warnings.warn(
            f"{what}: {name or 'the model'} left unchanged: its weight is tied to "
            f"{', '.join(tied[name])} (changing it would change that too)",
            stacklevel=3,
        )
        del layers[name]
    return layers
