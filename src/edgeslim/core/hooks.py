"""One calibration loop for every technique that looks at activations.

Observers (quantization), Wanda/SparseGPT statistics, response-reconstruction low-rank and
sensitivity probes all need the same thing: run a few batches of calibration inputs through
the model in eval mode, without gradients, and let a callback see what chosen layers
receive and produce. That loop lives here, once::

    def see(name, module, inputs, output):      # inputs: the positional args, a tuple
        stats[name] += inputs[0].pow(2).sum(0)

    run_calibration(model, calib, layers={"fc1": model.fc1}, callback=see)

``calib`` is calibration data in any form users hold it (:func:`iter_batches`): a tensor of
inputs ``(N, ...)``, a list of tensors, a tokenizer's output (one batch of keyword inputs), a
list of such mappings, a torch ``Dataset`` / ``DataLoader``, or a ``DataSplits``; a batch that
is a tuple is passed as ``model(*batch)``, a dict as ``model(**batch)``. Hooks are always
removed, the model's training flags are restored and its weights are not changed (unless the
callback changes them). Batches run where the model is: each one is moved to the model's
device (:func:`edgeslim.core.device.model_device`) as it is drawn, so calibration data may
live on the CPU (or anywhere) while the model runs on a GPU.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from edgeslim.core.data.datasets import DataSplits
from edgeslim.core.device import model_device, to_device
from edgeslim.core.errors import CalibrationError, ShapeError


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


@contextmanager
def no_kv_cache(model: nn.Module) -> Iterator[nn.Module]:
    """A transformers model with ``config.use_cache`` off (restored afterwards): its forward
    then returns logits / hidden states only, no key/value cache object, which graph
    capture (``torch.export``, a dependency graph) cannot follow and which is no part of
    what the model computes. Models without such a flag are left as they are."""
    configs = [c for c in _configs(model) if getattr(c, "use_cache", None) is True]
    for c in configs:
        c.use_cache = False
    try:
        yield model
    finally:
        for c in configs:
            c.use_cache = True


def _configs(model: nn.Module) -> list[Any]:
    found = {id(c): c for m in model.modules() if (c := getattr(m, "config", None)) is not None}
    return list(found.values())


@contextmanager
def eager_attention(model: nn.Module) -> Iterator[list[Any]]:
    """A transformers model whose attention runs transformers' "eager" path (explicit
    matmul, softmax, matmul) instead of ``scaled_dot_product_attention``, restored
    afterwards; yields the configs it changed (empty: nothing to change). The same function,
    written in ops that every exporter decomposes (``torch.onnx``'s decomposition of SDPA
    with a mask fails on Swin's windowed attention)."""
    changed = [
        (c, c._attn_implementation)
        for c in _configs(model)
        if getattr(c, "_attn_implementation", "eager") not in (None, "eager")
    ]
    for c, _ in changed:
        c._attn_implementation = "eager"
    try:
        yield [c for c, _ in changed]
    finally:
        for c, old in changed:
            c._attn_implementation = old


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


CALIB_FORMS = (
    "a tensor (N, ...); a list or tuple of tensors (one batch each); a mapping of keyword "
    "inputs such as a tokenizer's output (one batch); a list of mappings; a torch Dataset or "
    "DataLoader (items x or (x, y)); a DataSplits (its calibration set)"
)
DATASPLITS_CALIB = 256  # inputs drawn from a DataSplits' training split


def iter_batches(
    calib: Any, batch_size: int = 64, *, device: torch.device | str | None = None
) -> Iterator[Any]:
    """The batches of calibration data ``calib``, in any form users hold it (``CALIB_FORMS``).

    Each batch is a tensor (``model(x)``), a tuple of tensors (``model(*x)``) or a dict of
    keyword inputs (``model(**x)``). Anything else is a :class:`CalibrationError` naming the
    type it got and the forms it takes. With ``device`` every batch is moved there (one batch
    at a time, as it is drawn; a no-op for tensors already there).
    """
    if device is None:
        yield from _batches(calib, batch_size)
    else:
        for batch in _batches(calib, batch_size):
            yield to_device(batch, device)


def _batches(calib: Any, batch_size: int) -> Iterator[Any]:
    """:func:`iter_batches` without moving anything."""
    if isinstance(calib, torch.Tensor):
        if calib.dim() == 0 or calib.shape[0] == 0:
            raise ShapeError(
                f"calibration data must be a non-empty batch (N, ...), got {tuple(calib.shape)}"
            )
        for i in range(0, calib.shape[0], batch_size):
            yield calib[i : i + batch_size]
    elif isinstance(calib, Mapping):  # a tokenizer's BatchEncoding, {"input_ids": ...}: one batch
        yield _keyword_batch(calib, "calibration mapping")
    elif isinstance(calib, DataSplits):
        yield from _batches(calib.calib(min(DATASPLITS_CALIB, len(calib.train))), batch_size)
    elif isinstance(calib, DataLoader):
        for k, item in enumerate(calib):
            yield _batch(_input_of(item), f"DataLoader batch {k}")
    elif isinstance(calib, Dataset) and hasattr(calib, "__len__"):
        items = [_input_of(calib[k]) for k in range(len(calib))]  # type: ignore[arg-type]
        if not items:
            raise ShapeError("calibration Dataset is empty")
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            yield _collate(chunk, f"Dataset items {start}..{start + len(chunk) - 1}")
    elif isinstance(calib, (list, tuple)) or (
        isinstance(calib, Iterable) and not isinstance(calib, (str, bytes))
    ):
        count = 0
        for k, item in enumerate(calib):
            count += 1
            yield _batch(item, f"calibration item {k}")
        if count == 0:
            raise ShapeError("calibration data is empty")
    else:
        raise CalibrationError(
            f"calibration data of type {type(calib).__name__} is not supported; give {CALIB_FORMS}"
        )


def _input_of(item: Any) -> Any:
    """The input of a dataset item: ``x`` of ``(x, y)`` or ``(x,)``, else the item."""
    if (
        isinstance(item, (tuple, list))
        and len(item) in (1, 2)
        and isinstance(item[0], torch.Tensor)
    ):
        return item[0]
    return item


def _keyword_batch(batch: Mapping, where: str) -> dict[str, Any]:
    bad = [k for k, v in batch.items() if not isinstance(k, str)]
    if bad:
        raise CalibrationError(f"{where}: keys must be argument names, got {bad[:3]}")
    return dict(batch)


def _batch(item: Any, where: str) -> Any:
    """One batch as the model takes it (a tensor, a tuple of inputs, or keyword inputs)."""
    if isinstance(item, torch.Tensor):
        return item
    if isinstance(item, Mapping):
        return _keyword_batch(item, where)
    if isinstance(item, (tuple, list)) and item and all(isinstance(t, torch.Tensor) for t in item):
        return tuple(item)
    raise CalibrationError(
        f"{where} is a {type(item).__name__}; a batch must be a tensor, a tuple of tensors or "
        f"a mapping of keyword inputs (calibration data takes {CALIB_FORMS})"
    )


def _collate(items: list[Any], where: str) -> Any:
    """Stack dataset items (tensors, or mappings of tensors) into one batch."""
    first = items[0]
    try:
        if isinstance(first, torch.Tensor):
            return torch.stack(items)
        if isinstance(first, Mapping):
            return {k: torch.stack([item[k] for item in items]) for k in first}
    except (RuntimeError, KeyError, TypeError) as exc:
        raise CalibrationError(f"{where}: cannot stack the items into a batch: {exc}") from exc
    raise CalibrationError(
        f"{where}: a Dataset item is a {type(first).__name__}; expected a tensor, (x, y) or a "
        "mapping of tensors"
    )


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

    Returns the number of batches run. Each batch is moved to the model's device first. A
    batch the model cannot run raises :class:`ShapeError` naming the batch's shape.
    """
    count = 0
    device = model_device(model)
    with eval_mode(model), torch.no_grad(), forward_hooks(layers, callback):
        for batch in iter_batches(calib, batch_size, device=device):
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
