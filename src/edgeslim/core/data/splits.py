"""Train / val / test splits: in memory (:class:`Split`) or streamed (:class:`DatasetSplit`).

A :class:`Split` holds tensors; a :class:`DatasetSplit` reads a torch ``Dataset`` through a
``DataLoader`` (``num_workers`` worker processes, batches in the order the training loop draws
from its own seeded generator). Both give ``batches(...)``, ``x`` / ``y`` (a :class:`Column`
for a streamed split: indexing reads just those items) and ``subset``. :class:`DataSplits`
holds the three and what a task knows about itself (classes, metric, reference model).
:func:`stratified_split` splits every source the same way, by a fixed seed.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset

from edgeslim.core.errors import ConfigError, DataError

SPLIT_SEED = 20151008  # fixed: the same split on every machine, every run
SPLIT_FRACTIONS = (0.7, 0.1, 0.2)


@dataclass
class Split:
    """One split in memory: inputs ``x`` (N, C, H, W) float32 and labels ``y`` (N,) int64."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, n: int | None) -> Split:
        """The first ``n`` examples (all when ``n`` is None)."""
        return self if n is None or n >= len(self) else Split(self.x[:n], self.y[:n])

    def batches(
        self, batch_size: int, order: torch.Tensor | None = None, *, seed: int = 0
    ) -> Iterator[tuple[Any, Any]]:
        """``(x, y)`` batches of ``batch_size`` in ``order`` (indices; default: as stored)."""
        for i in range(0, len(self), batch_size):
            if order is None:
                yield self.x[i : i + batch_size], self.y[i : i + batch_size]
            else:
                idx = order[i : i + batch_size]
                yield self.x[idx], self.y[idx]

    def map_inputs(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Split:
        """The split with ``fn`` applied to the whole input tensor."""
        return Split(fn(self.x), self.y)


def collate_items(items: list[Any], where: str) -> tuple[Any, Any]:
    """Stack dataset items ``(x, y)`` into one batch ``(x, y)``; bad items are a DataError."""
    from torch.utils.data import default_collate

    for item in items:
        if not isinstance(item, Sequence) or isinstance(item, (str, bytes)) or len(item) != 2:
            raise DataError(
                f"{where}: a dataset item is a {type(item).__name__}; items must be pairs "
                "(x, y) of an input and its target"
            )
    try:
        x, y = default_collate(items)
    except (RuntimeError, TypeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise DataError(f"{where}: cannot stack the items into a batch: {first}") from exc
    return x, y


class DatasetSplit:
    """One split read lazily from a map-style torch ``Dataset`` of ``(x, y)`` items.

    ``where`` names the source in errors (``folder:PATH``, ``py:module:factory``);
    ``num_workers`` worker processes load the batches (0: in this process).
    """

    def __init__(self, dataset: Any, where: str, num_workers: int = 0) -> None:
        if isinstance(dataset, IterableDataset) or not (
            hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")
        ):
            raise DataError(
                f"{where}: a split must be a map-style torch Dataset (with __len__ and "
                f"__getitem__), got {type(dataset).__name__}; an IterableDataset cannot be "
                "shuffled or split"
            )
        self.dataset = dataset
        self.where = where
        self.num_workers = num_workers

    def __len__(self) -> int:
        return len(self.dataset)

    def __repr__(self) -> str:
        return f"DatasetSplit({self.where}, {len(self)} items)"

    @property
    def x(self) -> Column:
        """The inputs, read on indexing (``split.x[:8]``, ``split.x[idx]``)."""
        return Column(self, 0)

    @property
    def y(self) -> Column:
        """The targets, read on indexing."""
        return Column(self, 1)

    def _like(self, dataset: Any) -> DatasetSplit:
        return DatasetSplit(dataset, self.where, self.num_workers)

    def subset(self, n: int | None) -> DatasetSplit:
        """The first ``n`` examples (all when ``n`` is None)."""
        return self if n is None or n >= len(self) else self._like(Subset(self.dataset, range(n)))

    def with_workers(self, num_workers: int) -> DatasetSplit:
        split = self._like(self.dataset)
        split.num_workers = num_workers
        return split

    def map_inputs(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> DatasetSplit:
        """The split with ``fn`` applied to each input (as a batch of one), when read."""
        return self._like(MappedInputs(self.dataset, fn))

    def loader(self, batches: list[list[int]], *, seed: int = 0) -> DataLoader:
        """A ``DataLoader`` yielding ``(x, y)`` for each list of indices in ``batches``.

        Its own generator (seeded by ``seed``) seeds the workers, so iterating it never draws
        from torch's global random state (training stays reproducible)."""
        return DataLoader(
            self.dataset,
            batch_sampler=batches,
            num_workers=self.num_workers,
            collate_fn=functools.partial(collate_items, where=self.where),
            generator=torch.Generator().manual_seed(seed),
        )

    def batches(
        self, batch_size: int, order: torch.Tensor | None = None, *, seed: int = 0
    ) -> Iterator[tuple[Any, Any]]:
        """``(x, y)`` batches of ``batch_size`` in ``order`` (indices; default: as stored),
        read through a ``DataLoader``."""
        n = len(self)
        indices = order.tolist() if order is not None else list(range(n))
        chunks = [indices[i : i + batch_size] for i in range(0, n, batch_size)]
        yield from self.loader(chunks, seed=seed)

    def take(self, indices: list[int]) -> tuple[Any, Any]:
        """The items ``indices`` as one batch ``(x, y)``."""
        if not indices:
            raise DataError(f"{self.where}: no items selected")
        return next(iter(self.loader([list(indices)])))


class Column:
    """The inputs (or targets) of a :class:`DatasetSplit`, read when indexed.

    ``column[i]`` is one item's; a slice, a list or a tensor of indices gives them stacked
    into a batch. ``shape`` and ``dtype`` come from the first item.
    """

    def __init__(self, split: DatasetSplit, k: int) -> None:
        self._split, self._k = split, k

    def __len__(self) -> int:
        return len(self._split)

    def __getitem__(self, key: Any) -> Any:
        n = len(self)
        if isinstance(key, (int, np.integer)) or (isinstance(key, torch.Tensor) and key.dim() == 0):
            i = int(key)
            if not -n <= i < n:
                raise IndexError(f"index {i} out of range for {n} items")
            return self._split.take([i % n])[self._k][0]
        if isinstance(key, slice):
            indices = list(range(*key.indices(n)))
        elif isinstance(key, torch.Tensor):
            indices = [int(i) for i in key.reshape(-1).tolist()]
        else:
            indices = [int(i) for i in key]
        if not indices:
            first = torch.as_tensor(self[0])
            return first.new_empty((0, *first.shape))
        return self._split.take(indices)[self._k]

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self), *torch.as_tensor(self[0]).shape))

    @property
    def dtype(self) -> torch.dtype:
        return torch.as_tensor(self[0]).dtype

    def __repr__(self) -> str:
        return f"Column({self._split.where}, {'xy'[self._k]}, {len(self)} items)"


class MappedInputs(Dataset):
    """``dataset`` with ``fn`` applied to each item's input (as a batch of one)."""

    def __init__(self, dataset: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.dataset, self.fn = dataset, fn

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[Any, Any]:
        x, y = self.dataset[i]
        return self.fn(torch.as_tensor(x)[None])[0], y


AnySplit = Split | DatasetSplit


@dataclass
class DataSplits:
    """A dataset split into train / val / test, with a calibration subset helper.

    ``metric`` names how models are scored on it (:mod:`edgeslim.core.metrics`; the default
    ``top1`` is accuracy) and decides the training loss (squared error for ``mse``);
    ``reference`` is the model whose outputs ``cosine`` compares with; ``classes`` are the
    class names when the source has them (``folder:``).
    """

    name: str
    train: AnySplit
    val: AnySplit
    test: AnySplit
    num_classes: int | None
    metric: str = "top1"
    classes: list[str] | None = None
    reference: Any = field(default=None, repr=False)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example, without the batch dimension."""
        return tuple(self.train.x.shape[1:])

    @property
    def streams(self) -> bool:
        """True when a split is read lazily from a ``Dataset`` (not held in memory)."""
        return any(isinstance(s, DatasetSplit) for s in (self.train, self.val, self.test))

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
        return dataclasses.replace(self, train=self.train.subset(train))

    def with_workers(self, num_workers: int) -> DataSplits:
        """A copy whose streamed splits load batches in ``num_workers`` worker processes."""
        if num_workers < 0:
            raise DataError(f"num_workers must be >= 0, got {num_workers}")
        splits = {
            k: s.with_workers(num_workers) if isinstance(s, DatasetSplit) else s
            for k, s in (("train", self.train), ("val", self.val), ("test", self.test))
        }
        return dataclasses.replace(self, **splits)

    def with_metric(self, metric: str | None, reference: Any = None) -> DataSplits:
        """A copy scored by ``metric`` (None: keep this one), compared with ``reference``."""
        from edgeslim.core.metrics import check_name

        try:
            name = self.metric if metric is None else check_name(metric)
        except ConfigError as exc:
            raise DataError(str(exc)) from None
        return dataclasses.replace(self, metric=name, reference=reference)


def stratified_split(y: np.ndarray, fractions: tuple[float, float, float], seed: int):
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
