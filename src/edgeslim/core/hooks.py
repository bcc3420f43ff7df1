"""One calibration loop for every technique that looks at activations.

Observers (quantization), Wanda/SparseGPT statistics, response-reconstruction low-rank and
sensitivity probes all need the same thing: run a few batches of calibration inputs through
the model in eval mode, without gradients, and let a callback see what chosen layers
receive and produce. That loop lives here, once::

    def see(name, module, inputs, output):      # inputs: the positional args, a tuple
        stats[name] += inputs[0].pow(2).sum(0)

    run_calibration(model, calib, layers={"fc1": model.fc1}, callback=see)

``calib`` is a tensor of inputs ``(N, ...)`` (e.g. ``DataSplits.calib(256)``) or any iterable
of input batches; a batch that is a tuple is passed as ``model(*batch)``, a dict as
``model(**batch)``. Hooks are always removed, the model's training flags are restored and its
weights are not changed (unless the callback changes them).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from edgeslim.core.errors import ShapeError


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode; restore each one's own training flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in flags:
            module.training = training


Callback = Callable[[str, nn.Module, tuple[Any, ...], Any], None]


def output_tensors(out: Any) -> Iterator[torch.Tensor]:
    """Every tensor in a model output (tensor, tuple, dict, ModelOutput)."""
    if isinstance(out, torch.Tensor):
        yield out
    elif isinstance(out, dict):
        for v in out.values():
            yield from output_tensors(v)
    elif isinstance(out, (tuple, list)):
        for v in out:
            yield from output_tensors(v)


def iter_batches(calib: torch.Tensor | Iterable[Any], batch_size: int = 64) -> Iterator[Any]:
    """Batches of ``calib``: slices of a tensor ``(N, ...)``, or the items of an iterable."""
    if isinstance(calib, torch.Tensor):
        if calib.dim() == 0 or calib.shape[0] == 0:
            raise ShapeError(
                f"calibration data must be a non-empty batch (N, ...), got {tuple(calib.shape)}"
            )
        for i in range(0, calib.shape[0], batch_size):
            yield calib[i : i + batch_size]
    else:
        yield from calib


@contextmanager
def forward_hooks(modules: dict[str, nn.Module], callback: Callback) -> Iterator[None]:
    """Call ``callback(name, module, inputs, output)`` after each forward of each module."""
    handles = []
    try:
        for name, module in modules.items():

            def hook(mod: nn.Module, inputs: tuple[Any, ...], output: Any, _name=name) -> None:
                callback(_name, mod, inputs, output)

            handles.append(module.register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


def run_calibration(
    model: nn.Module,
    calib: torch.Tensor | Iterable[Any],
    layers: dict[str, nn.Module],
    callback: Callback,
    *,
    batch_size: int = 64,
) -> int:
    """Run ``calib`` through ``model`` (eval mode, no grad) with ``callback`` on ``layers``.

    Returns the number of batches run. A batch the model cannot run raises
    :class:`ShapeError` naming the batch's shape.
    """
    count = 0
    with eval_mode(model), torch.no_grad(), forward_hooks(layers, callback):
        for batch in iter_batches(calib, batch_size):
            try:
                if isinstance(batch, tuple):  # several inputs: model(*batch)
                    model(*batch)
                elif isinstance(batch, dict):  # keyword inputs (transformers): model(**batch)
                    model(**batch)
                else:
                    model(batch)
            except RuntimeError as exc:
                shape = tuple(batch.shape) if isinstance(batch, torch.Tensor) else type(batch)
                first = str(exc).strip().splitlines()[0]
                raise ShapeError(
                    f"{type(model).__name__} cannot run calibration batch {count} of shape "
                    f"{shape}: {first}"
                ) from exc
            count += 1
    return count
