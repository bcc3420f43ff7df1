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


def _place(digit: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """``digit`` (28, 28) translated by (dy, dx), zero fill."""
    out = np.zeros_like(digit)
    h, w = digit.shape
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    out[yd, xd] = digit[ys, xs]
    return out


def _compose(bg, digit, dy, dx, bar, rng, noise) -> np.ndarray:
    frame = np.maximum(bg, _place(digit, dy, dx))
    if bar is not None:  # (column, width): a grey vertical occluder
        col, width = bar
        lo, hi = max(0, col), min(frame.shape[1], col + width)
        if lo < hi:
            frame[:, lo:hi] = 0.5
    if noise:
        frame = frame + rng.normal(0, noise, frame.shape).astype(np.float32)
    return np.clip(frame, 0, 1)


def synthetic_video(split: Split, n_frames: int = 600, seed: int = 0, noise: float = 0.01) -> Video:
    """A deterministic video of ``split``'s digits (see the module docstring)."""
    if n_frames < 1:
        raise DataError(f"synthetic video: n_frames must be >= 1, got {n_frames}")
    rng = np.random.default_rng(seed)
    bg = _background(rng)
    digits = split.x[:, 0].numpy()
    frames, labels = [], []
    left, dy, dx, vy, vx, bar, bar_v = 0, 0, 0, 0, 0, None, 0
    idx = 0
    for _ in range(n_frames):
        if left == 0:  # a new digit
            idx = int(rng.integers(len(digits)))
            left = int(rng.integers(8, 31))
            dy, dx = (int(v) for v in rng.integers(-2, 3, 2))
        if rng.random() < 0.15:  # change direction, or pause
            vy, vx = (int(v) for v in rng.integers(-1, 2, 2))
        dy = int(np.clip(dy + vy, -MAX_SHIFT, MAX_SHIFT))
        dx = int(np.clip(dx + vx, -MAX_SHIFT, MAX_SHIFT))
        if bar is None and rng.random() < 0.03:  # an occluder enters from one side
            bar_v = int(rng.choice([-2, 2]))
            bar = (-4 if bar_v > 0 else 28, int(rng.integers(3, 6)))
        elif bar is not None:
            bar = (bar[0] + bar_v, bar[1])
            if bar[0] > 28 or bar[0] + bar[1] < 0:
                bar = None
        frames.append(_compose(bg, digits[idx], dy, dx, bar, rng, noise))
        labels.append(int(split.y[idx]))
        left -= 1
    x = torch.from_numpy(np.stack(frames)[:, None])
    return Video(x, torch.tensor(labels, dtype=torch.int64))


def render_digits(split: Split, seed: int = 0, noise: float = 0.01) -> Split:
    """Each digit of ``split`` once, as a frame of the synthetic video would show it."""
    rng = np.random.default_rng(seed)
    out = []
    for digit in split.x[:, 0].numpy():
        bg = _background(rng)
        dy, dx = (int(v) for v in rng.integers(-MAX_SHIFT, MAX_SHIFT + 1, 2))
        bar = (int(rng.integers(-4, 28)), int(rng.integers(3, 6))) if rng.random() < 0.15 else None
        out.append(_compose(bg, digit, dy, dx, bar, rng, noise))
    return Split(torch.from_numpy(np.stack(out)[:, None]), split.y.clone())


def video_splits(data: DataSplits | None = None, seed: int = 0) -> DataSplits:
    """MNIST rendered in the video's style: train / val / test from the same digit splits."""
    data = data or load_data("mnist")
    return DataSplits(
        "video-mnist",
        render_digits(data.train, seed),
        render_digits(data.val, seed + 1),
        render_digits(data.test, seed + 2),
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
