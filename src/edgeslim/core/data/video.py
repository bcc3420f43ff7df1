"""Frame sequences: a deterministic synthetic video of MNIST digits, and users' own frames.

- ``synthetic:SPLIT`` (``SPLIT`` = train / val / test, default test): a video built from the
  bundled MNIST digits of that split -- a textured static background, one digit at a time
  that drifts (a random walk of at most 1 pixel per frame, with pauses), is sometimes
  crossed by a grey occluding bar, and is replaced by another digit every 8-30 frames; mild
  sensor noise on every frame. Labels: the digit shown in each frame. Same seed, same video.
- ``frames:PATH``: a user's frames, with optional labels:

  * a directory of ``.npy`` or ``.png`` files, one frame each, played in file-name order;
    optional ``labels.txt`` (one integer per line, per frame) or ``labels.npy``;
  * an ``.npz`` file with ``frames`` (T, H, W) or (T, C, H, W) and optional ``labels`` (T,).

  uint8 frames (and PNGs) are scaled to [0, 1]; (H, W) frames get a channel axis.

:func:`render_digits` renders every digit of a split once, in the video's style (random
position, occluder, background), to train and test a classifier for the video.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edgeslim.core.data.datasets import DataSplits, Split, load_data
from edgeslim.core.errors import DataError

MAX_SHIFT = 4  # pixels the digit may drift from the centre


@dataclass
class Video:
    """Frames ``(T, C, H, W)`` float32 and per-frame labels ``(T,)`` int64 (-1: unknown)."""

    frames: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.frames)


def _background(rng: np.random.Generator, size: int = 28) -> np.ndarray:
    """A static texture in [0, 0.3]: two gratings and smoothed noise."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    f1, f2 = rng.uniform(0.15, 0.45, 2)
    a1, a2 = rng.uniform(0, np.pi, 2)
    g = np.sin(f1 * (xx * np.cos(a1) + yy * np.sin(a1))) + np.sin(f2 * (xx * np.cos(a2) - yy))
    noise = rng.uniform(0, 1, (size // 4 + 1, size // 4 + 1))
    noise = np.kron(noise, np.ones((4, 4)))[:size, :size]
    tex = 0.5 + 0.25 * g + 0.3 * (noise - 0.5)
    return (0.3 * np.clip(tex, 0, 1)).astype(np.float32)


def _place(digit: np.ndarray, dy: int, dx: int, size: int | None = None) -> np.ndarray:
    """``digit`` (h, h) centred on a ``size`` canvas (default h) and translated by (dy, dx),
    zero fill."""
    h = digit.shape[0]
    size = size or h
    out = np.zeros((size, size), dtype=digit.dtype)
    top, left = (size - h) // 2 + dy, (size - h) // 2 + dx
    y0, y1, x0, x1 = max(0, top), min(size, top + h), max(0, left), min(size, left + h)
    if y0 < y1 and x0 < x1:
        out[y0:y1, x0:x1] = digit[y0 - top : y1 - top, x0 - left : x1 - left]
    return out


def _compose(bg, digit, dy, dx, bar, rng, noise) -> np.ndarray:
    frame = np.maximum(bg, _place(digit, dy, dx, bg.shape[0]))
    if bar is not None:  # (column, width): a grey vertical occluder
        col, width = bar
        lo, hi = max(0, col), min(frame.shape[1], col + width)
        if lo < hi:
            frame[:, lo:hi] = 0.5
    if noise:
        frame = frame + rng.normal(0, noise, frame.shape).astype(np.float32)
    return np.clip(frame, 0, 1)


def _layout(size: int, scale: int) -> int:
    """The largest drift of the digit from the centre for a ``size`` frame of digits
    enlarged ``scale`` times (``MAX_SHIFT`` for 28x28 digits on 28x28 frames)."""
    if scale < 1 or size < 28 * scale:
        raise DataError(
            f"synthetic video: frames of {size}x{size} pixels cannot hold digits enlarged "
            f"{scale}x (28*scale = {28 * scale} pixels); use size >= 28*scale, scale >= 1"
        )
    return MAX_SHIFT if size == 28 * scale else (size - 28 * scale) // 2


def _digits(split: Split, scale: int) -> np.ndarray:
    digits = split.x[:, 0].numpy()
    if scale > 1:  # nearest-neighbour enlargement
        digits = digits.repeat(scale, 1).repeat(scale, 2)
    return digits


def synthetic_video(
    split: Split,
    n_frames: int = 600,
    seed: int = 0,
    noise: float = 0.01,
    *,
    size: int = 28,
    scale: int = 1,
) -> Video:
    """A deterministic video of ``split``'s digits (see the module docstring).

    ``size``: frame side in pixels; ``scale``: digits enlarged that many times (nearest
    neighbour). On frames larger than the digit it drifts up to ``(size - 28*scale) // 2``
    pixels from the centre, at most 1 pixel per frame, over a static background: a larger
    scene with more unchanged pixels, as a camera sees it. The defaults give the 28x28 video.
    """
    if n_frames < 1:
        raise DataError(f"synthetic video: n_frames must be >= 1, got {n_frames}")
    max_shift = _layout(size, scale)
    rng = np.random.default_rng(seed)
    bg = _background(rng, size)
    digits = _digits(split, scale)
    frames, labels = [], []
    left, dy, dx, vy, vx, bar, bar_v = 0, 0, 0, 0, 0, None, 0
    idx = 0
    for _ in range(n_frames):
        if left == 0:  # a new digit
            idx = int(rng.integers(len(digits)))
            left = int(rng.integers(8, 31))
            dy, dx = (int(v) * (max_shift // MAX_SHIFT) for v in rng.integers(-2, 3, 2))
        if rng.random() < 0.15:  # change direction, or pause
            vy, vx = (int(v) for v in rng.integers(-1, 2, 2))
        dy = int(np.clip(dy + vy, -max_shift, max_shift))
        dx = int(np.clip(dx + vx, -max_shift, max_shift))
        if bar is None and rng.random() < 0.03:  # an occluder enters from one side
            bar_v = int(rng.choice([-2, 2]))
            bar = (-4 * scale if bar_v > 0 else size, int(rng.integers(3, 6)) * scale)
        elif bar is not None:
            bar = (bar[0] + bar_v, bar[1])
            if bar[0] > size or bar[0] + bar[1] < 0:
                bar = None
        frames.append(_compose(bg, digits[idx], dy, dx, bar, rng, noise))
        labels.append(int(split.y[idx]))
        left -= 1
    x = torch.from_numpy(np.stack(frames)[:, None])
    return Video(x, torch.tensor(labels, dtype=torch.int64))


def render_digits(
    split: Split, seed: int = 0, noise: float = 0.01, *, size: int = 28, scale: int = 1
) -> Split:
    """Each digit of ``split`` once, as a frame of the synthetic video would show it
    (``size``, ``scale``: as :func:`synthetic_video`)."""
    max_shift = _layout(size, scale)
    rng = np.random.default_rng(seed)
    out = []
    for digit in _digits(split, scale):
        bg = _background(rng, size)
        dy, dx = (int(v) for v in rng.integers(-max_shift, max_shift + 1, 2))
        bar = (
            (int(rng.integers(-4 * scale, size)), int(rng.integers(3, 6)) * scale)
            if rng.random() < 0.15
            else None
        )
        out.append(_compose(bg, digit, dy, dx, bar, rng, noise))
    return Split(torch.from_numpy(np.stack(out)[:, None]), split.y.clone())


def video_splits(
    data: DataSplits | None = None, seed: int = 0, *, size: int = 28, scale: int = 1
) -> DataSplits:
    """MNIST rendered in the video's style: train / val / test from the same digit splits."""
    data = data or load_data("mnist")
    kw = {"size": size, "scale": scale}
    return DataSplits(
        "video-mnist" if (size, scale) == (28, 1) else f"video-mnist-{size}x{scale}",
        render_digits(data.train, seed, **kw),
        render_digits(data.val, seed + 1, **kw),
        render_digits(data.test, seed + 2, **kw),
        data.num_classes,
    )


def load_frames(source: str | os.PathLike, n_frames: int = 600, seed: int = 0) -> Video:
    """``synthetic[:SPLIT]`` or ``frames:PATH`` (see the module docstring)."""
    text = os.fspath(source)
    if text == "synthetic" or text.startswith("synthetic:"):
        part = text.partition(":")[2] or "test"
        if part not in ("train", "val", "test"):
            raise DataError(f"{text!r}: the split must be train, val or test")
        return synthetic_video(getattr(load_data("mnist"), part), n_frames, seed)
    if not text.startswith("frames:"):
        raise DataError(
            f"unknown frame source {text!r}: expected 'synthetic[:SPLIT]' or 'frames:PATH'"
        )
    path = Path(text[len("frames:") :])
    if path.is_dir():
        frames, labels = _from_directory(path)
    elif path.suffix == ".npz" and path.is_file():
        frames, labels = _from_npz(path)
    else:
        raise DataError(f"{path}: not a directory of frames or an .npz file")
    return _video(frames, labels, path)


def _from_directory(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    files = sorted(p for p in path.iterdir() if p.suffix in (".npy", ".png") and p.stem != "labels")
    if not files:
        raise DataError(f"{path}: no .npy or .png frames in the directory")
    if len({p.suffix for p in files}) > 1:
        raise DataError(f"{path}: mixes .npy and .png frames; use one kind")
    if files[0].suffix == ".npy":
        frames = [np.load(p, allow_pickle=False) for p in files]
    else:
        from PIL import Image

        frames = [np.asarray(Image.open(p).convert("L")) for p in files]
    shapes = {f.shape for f in frames}
    if len(shapes) != 1:
        raise DataError(f"{path}: frames have different shapes {sorted(shapes)}")
    labels = None
    if (path / "labels.npy").is_file():
        labels = np.load(path / "labels.npy", allow_pickle=False)
    elif (path / "labels.txt").is_file():
        try:
            labels = np.array([int(t) for t in (path / "labels.txt").read_text().split()])
        except ValueError as exc:
            raise DataError(
                f"{path / 'labels.txt'}: one integer per line expected: {exc}"
            ) from None
    return np.stack(frames), labels


def _from_npz(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    try:
        with np.load(path, allow_pickle=False) as f:
            if "frames" not in f.files:
                raise DataError(f"{path}: no 'frames' array (found {sorted(f.files)})")
            return f["frames"], (f["labels"] if "labels" in f.files else None)
    except (ValueError, OSError) as exc:
        raise DataError(f"cannot read {path} as .npz: {exc}") from exc


def _video(frames: np.ndarray, labels: np.ndarray | None, where: Path) -> Video:
    if frames.ndim == 3:
        frames = frames[:, None]
    if frames.ndim != 4:
        raise DataError(f"{where}: frames must be (T, H, W) or (T, C, H, W), got {frames.shape}")
    x = frames.astype(np.float32) / 255.0 if frames.dtype == np.uint8 else frames.astype(np.float32)
    if labels is None:
        y = np.full(len(x), -1)
    else:
        y = np.asarray(labels)
        if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer):
            raise DataError(
                f"{where}: labels must be {len(x)} integers (one per frame), "
                f"got {y.dtype} {y.shape}"
            )
    return Video(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y.astype(np.int64)))
