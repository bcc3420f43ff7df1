"""The ``folder:PATH`` source: an image folder, one sub-folder per class, read lazily with PIL.

Images are read one at a time, when a batch needs them (nothing is held in memory), converted
to ``channels``, resized to ``image_size`` when given, scaled to [0, 1] and normalised when
``mean`` / ``std`` are given (:class:`ImageOptions`). Bad folders are a ``DataError`` naming
the path.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from edgeslim.core.data.splits import (
    SPLIT_FRACTIONS,
    SPLIT_SEED,
    DatasetSplit,
    DataSplits,
    stratified_split,
)
from edgeslim.core.errors import DataError

IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".pgm", ".ppm"}
)


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


def folder_splits(root: Path, options: ImageOptions) -> DataSplits:
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
        idx = stratified_split(y, SPLIT_FRACTIONS, SPLIT_SEED)
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
