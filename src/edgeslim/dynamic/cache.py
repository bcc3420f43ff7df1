"""A cross-frame cache: reuse the early layers' results where the frame did not change.

Mengwei Xu, Mengze Zhu, Yunxin Liu, Felix Xiaozhu Lin, Xuanzhe Liu. "DeepCache: Principled
Cache for Mobile Deep Vision", MobiCom 2018. https://arxiv.org/abs/1712.01670

For each new frame, as in DeepCache:

1. **Block matching on the input**: the frame is cut into ``block x block`` blocks; each is
   searched in the previous frame within ``search`` pixels, nearest offsets first (as
   DeepCache's search starts from the zero vector). A block is reusable with the smallest
   motion vector whose mean absolute difference is at most ``threshold``. The search
   terminates early: every block is compared at zero motion first, and only the blocks
   left unmatched are searched further, ring by ring, after a filter on block sums (a
   lower bound of the difference); the same result as trying every offset.
2. **Propagation through the receptive fields**: for each convolution of the cached prefix,
   an output position is reused when every input pixel of its receptive field is reusable
   and moved by one motion vector; its value is the cached output at the position that
   vector (divided by the layer's stride, rounded) points to. Everything else is dirty.
3. **Recompute the rest**: dirty positions are grouped in ``tile x tile`` tiles; the
   bounding box of those tiles is convolved (one conv call on a crop of the layer's input)
   and pasted over the shifted cache. When the dirty tiles fall into bands of columns (or
   rows) with clean ones between them (a moving object and an occluder apart), each band
   gets its own box if that recomputes at least 10% fewer of the stage's positions; the
   reusable positions between the boxes then keep their (shifted) cached values. A stage
   is a conv with the element-wise and pooling layers up to the next conv; past the
   prefix, the network runs as usual.

The bookkeeping (matching, masks) runs on the block grid in numpy with index maps made once
per frame size, so that its cost stays well under the convolutions' (see
:class:`FrameCachedModel`): matching gathers blocks by flat index; the reuse masks of all
stages come from summed-area tables of the block codes.

The cached prefix is the model's longest leading chain of Conv2d / BatchNorm2d / ReLU /
ReLU6 / MaxPool2d / AvgPool2d (or up to ``until``). Rounded motion vectors and the matching
threshold make reuse approximate: ``threshold`` trades accuracy for compute.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from edgeslim.core.errors import ConfigError, ShapeError
from edgeslim.core.options import Options
from edgeslim.dynamic.segments import split, trace

__all__ = ["FrameCache", "FrameCachedModel", "add_frame_cache", "skip_stats", "stream_stats"]

_POINTWISE = (nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.Identity)
_POOL = (nn.MaxPool2d, nn.AvgPool2d)
# a stage's dirty positions are recomputed in several boxes instead of their bounding box
# when that saves at least this share of the stage's output positions
_SPLIT_GAIN = 0.1


class FrameCache(Options):
    """DeepCache settings."""

    block: int = Field(4, ge=1, description="block-matching block size (pixels)")
    search: int = Field(2, ge=0, le=8, description="motion search range (+- pixels)")
    threshold: float = Field(
        0.02, ge=0, description="mean |difference| under which a block matches"
    )
    tile: int = Field(2, ge=1, description="recomputed region granularity (output positions)")
    until: str | None = Field(None, description="last module of the cached prefix")


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


class _Layer:
    """One prefix layer with its receptive-field geometry (in input pixels)."""

    def __init__(self, module: nn.Module | None, fn, rf: int, stride: int, pad: int) -> None:
        self.module, self.fn, self.rf, self.stride, self.pad = module, fn, rf, stride, pad


def _prefix(model: nn.Module, until: str | None) -> tuple[list[_Layer], str]:
    """The cacheable leading chain of ``model`` and the name of its last module."""
    gm = trace(model, [], "FrameCache")
    modules = dict(model.named_modules())
    layers: list[_Layer] = []
    rf, stride, pad = 1, 1, 0
    last_name, prev, upto = None, None, 0
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            prev = node
            continue
        if node.all_input_nodes != [prev] or len(prev.users) != 1:
            break
        if node.op == "call_module":
            m = modules[node.target]
            if isinstance(m, nn.Conv2d):
                k, s, p, d = (_pair(v)[0] for v in (m.kernel_size, m.stride, m.padding, m.dilation))
                if (
                    _pair(m.kernel_size)[0] != _pair(m.kernel_size)[1]
                    or not isinstance(m.padding, tuple)
                    or m.padding_mode != "zeros"
                ):
                    break
                k_eff = d * (k - 1) + 1
                rf, pad, stride = rf + (k_eff - 1) * stride, pad + p * stride, stride * s
                layers.append(_Layer(m, None, rf, stride, pad))
            elif isinstance(m, _POOL):
                k, s, p = (
                    _pair(v)[0] for v in (m.kernel_size, m.stride or m.kernel_size, m.padding)
                )
                rf, pad, stride = rf + (k - 1) * stride, pad + p * stride, stride * s
                layers.append(_Layer(None, m, rf, stride, pad))
            elif isinstance(m, _POINTWISE):
                layers.append(_Layer(None, m, rf, stride, pad))
            else:
                break
        elif node.op == "call_function" and node.target in (torch.relu, F.relu):
            layers.append(_Layer(None, torch.relu, rf, stride, pad))
        else:
            break
        if node.op == "call_module":
            last_name, upto = node.target, len(layers)
        prev = node
        if until is not None and node.op == "call_module" and node.target == until:
            break
    if until is not None and last_name != until:
        raise ConfigError(
            f"FrameCache.until: {until!r} is not in the model's leading chain of cacheable "
            f"layers (conv, batch norm, ReLU, pooling); the chain ends at {last_name!r}"
        )
    layers = layers[:upto]
    if not any(layer.module is not None for layer in layers):
        raise ConfigError(
            f"FrameCache: {type(model).__name__} does not start with a convolution to cache"
        )
    return layers, last_name


class _Stage:
    """A conv of the prefix with the element-wise and pooling layers up to the next conv
    (the leading layers before the first conv form a stage without one): the unit the
    cache reuses or recomputes. Its output is cached; its geometry is its last windowed
    layer's.

    ``crop(x, box)`` computes the stage's output in a box of output positions from the
    part of ``x`` it needs (zero padding for the conv); pooling with padding, ceil mode or
    dilation is only run whole (``croppable`` false)."""

    def __init__(self) -> None:
        self.items: list[tuple[_Layer, int, int, int, int]] = []  # layer, k, s, p, d
        self.crop_fns: list = []  # per item: the function crop() runs (None: the conv)
        self.geometry = _Layer(None, None, 1, 1, 0)
        self.is_conv, self.croppable = False, True

    def add(self, la: _Layer) -> None:
        m = la.module if la.module is not None else la.fn
        if isinstance(m, nn.Conv2d):
            k, s, p, d = (_pair(v)[0] for v in (m.kernel_size, m.stride, m.padding, m.dilation))
            self.is_conv = True
        elif isinstance(m, _POOL):
            k, s, p = (_pair(v)[0] for v in (m.kernel_size, m.stride or m.kernel_size, m.padding))
            d = _pair(getattr(m, "dilation", 1))[0]
            self.croppable &= p == 0 and d == 1 and not m.ceil_mode
        else:
            k, s, p, d = 1, 1, 0, 1
        self.items.append((la, k, s, p, d))
        self.crop_fns.append(_crop_fn(m))
        if k > 1 or s > 1 or p:
            self.geometry = la

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for la, *_ in self.items:
            x = la.module(x) if la.module is not None else la.fn(x)
        return x

    def crop(self, x: torch.Tensor, y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
        """``self(x)[:, :, y0:y1, x0:x1]``, computing only that box."""
        for _, k, s, p, d in reversed(self.items):  # the input rows / columns needed
            span = d * (k - 1) + 1
            y0, y1, x0, x1 = (
                y0 * s - p,
                (y1 - 1) * s - p + span,
                x0 * s - p,
                (x1 - 1) * s - p + span,
            )
        h, w = x.shape[2:]
        crop = x[:, :, max(0, y0) : min(h, y1), max(0, x0) : min(w, x1)]
        pads = (max(0, -x0), max(0, x1 - w), max(0, -y0), max(0, y1 - h))
        if any(pads):  # only the conv pads (croppable pooling has none)
            crop = F.pad(crop, pads)
        for (la, _, s, _, d), fn in zip(self.items, self.crop_fns, strict=True):
            if fn is None:
                m = la.module
                crop = F.conv2d(crop, m.weight, m.bias, s, 0, d, m.groups)
            else:
                crop = fn(crop)
        return crop


def _crop_fn(m):
    """What :meth:`_Stage.crop` runs for layer ``m``: None for a conv (run without its
    padding), the plain function for ReLU and unpadded pooling (no module call per crop:
    the same kernels, less Python), else ``m`` itself."""
    if isinstance(m, nn.Conv2d):
        return None
    if isinstance(m, nn.ReLU):
        return torch.relu
    plain = isinstance(m, nn.MaxPool2d) and _pair(m.padding) == (0, 0) and not m.ceil_mode
    if plain and _pair(m.dilation) == (1, 1) and not m.return_indices:
        k, s = m.kernel_size, m.stride or m.kernel_size
        return lambda t: torch.max_pool2d(t, k, s)  # croppable: no padding, dilation, ceil
    return m


def _stages(layers: list[_Layer]) -> list[_Stage]:
    stages: list[_Stage] = []
    for la in layers:
        if la.module is not None or not stages:
            stages.append(_Stage())
        stages[-1].add(la)
    return stages


class _ConvGeometry:
    """For one stage of the prefix at a fixed frame size: which input blocks each output
    row / column sees, and the cache shift of each motion vector at its stride."""

    def __init__(self, layer: _Layer, out_hw, hw, block: int, table: np.ndarray) -> None:
        self.ho, self.wo = out_hw
        k, s, p = layer.rf, layer.stride, layer.pad
        # distinct block ranges of the receptive fields along each axis, and which one
        # each output row (column) has: positions that see the same blocks share a verdict
        self.rows, self.row_of = self._ranges(self.ho, hw[0], k, s, p, block)
        self.cols, self.col_of = self._ranges(self.wo, hw[1], k, s, p, block)
        # the cache position a reused output comes from, per motion vector
        self.fy = np.round(table[:, 0] / s).astype(np.int64)
        self.fx = np.round(table[:, 1] / s).astype(np.int64)
        self.ar_h, self.ar_w = np.arange(self.ho)[:, None], np.arange(self.wo)[None, :]
        self.row_count = np.bincount(self.row_of).astype(np.int64)  # outputs per range
        self.col_count = np.bincount(self.col_of).astype(np.int64)
        # the outputs of a range are contiguous (the ranges grow with the output index):
        # range i holds rows [row_start[i], row_end[i])
        self.row_end = np.cumsum(self.row_count)
        self.row_start = self.row_end - self.row_count
        self.col_end = np.cumsum(self.col_count)
        self.col_start = self.col_end - self.col_count
        # whether a motion vector moves the cache at this stride
        self.moves = (self.fy != 0) | (self.fx != 0)
        # the ranges' first and past-the-end blocks, and blocks per receptive field
        self.r0, self.r1 = self.rows[0::2], self.rows[1::2]
        self.c0, self.c1 = self.cols[0::2], self.cols[1::2]
        self.n = (self.r1 - self.r0)[:, None] * (self.c1 - self.c0)[None, :]

    @staticmethod
    def _ranges(n_out: int, size: int, k: int, s: int, p: int, block: int):
        """``(bounds, which)``: the distinct block ranges ``[first, last]`` the receptive
        fields of the outputs cover along one axis, as ``reduceat`` bounds
        ``[first0, last0 + 1, first1, ...]``, and the range of each output."""
        lo = np.clip(np.arange(n_out) * s - p, 0, size - 1)
        hi = np.clip(np.arange(n_out) * s - p + k - 1, 0, size - 1)
        blocks = np.stack([lo // block, hi // block + 1], 1)
        pairs, which = np.unique(blocks, axis=0, return_inverse=True)
        return pairs.reshape(-1), which.reshape(-1)

    def plan(self, sums: np.ndarray, tile: int):
        """``(matched, boxes, src)`` for this frame's block codes, given as their
        summed-area tables ``sums`` (see :func:`_code_sums`).

        A position is reusable when every block of its receptive field matched with one
        motion vector (and the shifted source lies inside the map). ``matched``: how many
        positions are; ``boxes``: ``[(y0, y1, x0, x1, area), ...]``, disjoint boxes of
        ``tile``-aligned tiles holding the others (see :meth:`_boxes`; empty: all
        reusable); ``src``: the flat cache index of every position (None when no reused
        position outside the boxes moved: the cache is used as it is). All on the grid of
        distinct receptive fields."""
        # per receptive field: dirty blocks, sum and sum of squares of the codes (four
        # corners of the summed-area tables); all codes equal iff n * sum(c^2) == sum(c)^2
        a = sums.take(self.r1, 1) - sums.take(self.r0, 1)
        a = a.take(self.c1, 2) - a.take(self.c0, 2)
        ok = (a[0] == 0) & (a[2] * self.n == a[1] * a[1])
        lo = np.where(ok, a[1] // self.n, 0)  # the motion vector where reusable
        matched = int(self.row_count @ ok @ self.col_count)
        moving = ok & self.moves[lo]
        good_r, good_c = ok.all(1), ok.all(0)
        if good_r.all():  # nothing to recompute
            if not moving.any():
                return matched, [], None
        else:
            boxes = self._boxes(ok, good_r, good_c, tile)
            if not moving.any():
                return matched, boxes, None
            # ranges with an output outside every box
            covered = np.zeros_like(ok)
            for y0, y1, x0, x1, _ in boxes:
                rows = (self.row_start >= y0) & (self.row_end <= y1)
                cols = (self.col_start >= x0) & (self.col_end <= x1)
                covered |= rows[:, None] & cols[None, :]
            if not (moving & ~covered).any():
                return matched, boxes, None
        # reused positions moved outside the box: shift them (and check the sources)
        ok = ok.take(self.row_of, 0).take(self.col_of, 1)
        fy = self.fy[lo].take(self.row_of, 0).take(self.col_of, 1)
        fx = self.fx[lo].take(self.row_of, 0).take(self.col_of, 1)
        rows, cols = self.ar_h - fy, self.ar_w - fx
        ok &= (rows >= 0) & (rows < self.ho) & (cols >= 0) & (cols < self.wo)
        box = self._box(~ok.all(1), ~ok.all(0), tile)
        src = rows.clip(0, self.ho - 1) * self.wo + cols.clip(0, self.wo - 1)
        return int(ok.sum()), [] if box is None else [box], src.reshape(-1)

    def _span(self, start, end, first: int, last: int, n: int, tile: int) -> tuple[int, int]:
        """Output positions ``[a, b)`` of ranges ``first..last``, widened to whole tiles."""
        return int(start[first]) // tile * tile, min(n, -(-int(end[last]) // tile) * tile)

    def _boxes(self, ok: np.ndarray, good_r, good_c, tile: int) -> list[tuple]:
        """The boxes (``(y0, y1, x0, x1, area)``, output positions, whole tiles) that
        cover every position not ``ok``: one bounding box, or one per run of dirty columns
        (else rows) with its own extent across, when that saves at least
        ``_SPLIT_GAIN`` of the map (an extra crop costs about a fixed time)."""
        r_first, r_last = int(good_r.argmin()), len(good_r) - 1 - int(good_r[::-1].argmin())
        c_first, c_last = int(good_c.argmin()), len(good_c) - 1 - int(good_c[::-1].argmin())
        y0, y1 = self._span(self.row_start, self.row_end, r_first, r_last, self.ho, tile)
        x0, x1 = self._span(self.col_start, self.col_end, c_first, c_last, self.wo, tile)
        single = [(y0, y1, x0, x1, (y1 - y0) * (x1 - x0))]
        gain = _SPLIT_GAIN * self.ho * self.wo
        if single[0][4] <= gain or not (
            good_c[c_first:c_last].any() or good_r[r_first:r_last].any()
        ):  # too small to save enough, or no clean row / column across it
            return single
        boxes = []
        if good_c[c_first:c_last].any():  # bands of columns, each with the rows dirty in it
            for first, last in _runs(~good_c[c_first : c_last + 1]):
                first, last = first + c_first, last + c_first
                a, b = self._span(self.col_start, self.col_end, first, last, self.wo, tile)
                rows = np.flatnonzero(~ok[:, first : last + 1].all(1))
                c, d = self._span(self.row_start, self.row_end, rows[0], rows[-1], self.ho, tile)
                boxes.append((c, d, a, b, (d - c) * (b - a)))
            overlap = any(p[3] > q[2] for p, q in itertools.pairwise(boxes))
        else:  # bands of rows, each with the columns dirty in it
            for first, last in _runs(~good_r[r_first : r_last + 1]):
                first, last = first + r_first, last + r_first
                a, b = self._span(self.row_start, self.row_end, first, last, self.ho, tile)
                cols = np.flatnonzero(~ok[first : last + 1].all(0))
                c, d = self._span(self.col_start, self.col_end, cols[0], cols[-1], self.wo, tile)
                boxes.append((a, b, c, d, (d - c) * (b - a)))
            overlap = any(p[1] > q[0] for p, q in itertools.pairwise(boxes))
        saved = single[0][4] - sum(box[4] for box in boxes)
        if overlap or saved < gain:
            return single
        return boxes

    def _box(self, bad_rows, bad_cols, tile: int):
        """The bounding box of the bad output rows x columns, in whole tiles."""
        bad_rows, bad_cols = np.flatnonzero(bad_rows), np.flatnonzero(bad_cols)
        if bad_rows.size == 0:
            return None
        t = tile
        y0, y1 = bad_rows[0] // t * t, min(self.ho, (bad_rows[-1] // t + 1) * t)
        x0, x1 = bad_cols[0] // t * t, min(self.wo, (bad_cols[-1] // t + 1) * t)
        return int(y0), int(y1), int(x0), int(x1), int((y1 - y0) * (x1 - x0))


def _runs(bad: np.ndarray) -> list[tuple[int, int]]:
    """The runs ``(first, last)`` of True in a short 1-D bool array."""
    runs, start = [], None
    for i, v in enumerate(bad.tolist()):
        if v and start is None:
            start = i
        elif not v and start is not None:
            runs.append((start, i - 1))
            start = None
    if start is not None:
        runs.append((start, len(bad) - 1))
    return runs


def _code_sums(code: np.ndarray) -> np.ndarray:
    """Summed-area tables (3, H + 1, W + 1) of a block code grid (H, W): of its dirty
    blocks (code -1), of the codes and of their squares (any window's sums: four corners)."""
    q = np.stack([code < 0, code, code * code])
    out = np.zeros((3, code.shape[0] + 1, code.shape[1] + 1), dtype=np.int64)
    np.cumsum(q, 1, out=out[:, 1:, 1:])
    np.cumsum(out[:, 1:, 1:], 2, out=out[:, 1:, 1:])
    return out


class _Geometry:
    """Everything about a frame size that does not change from frame to frame."""

    def __init__(self, cfg: FrameCache, stages: list[_Stage], feats, shape) -> None:
        _, c, h, w = shape
        b, r = cfg.block, cfg.search
        self.c, self.h, self.w, self.hb, self.wb = c, h, w, math.ceil(h / b), math.ceil(w / b)
        self.hp, self.wp = self.hb * b, self.wb * b
        offsets = sorted(
            ((dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1)),
            key=lambda o: abs(o[0]) + abs(o[1]),
        )  # zero motion first: it wins ties
        self.table = np.array(offsets, dtype=np.int64)
        # the search's rings: runs of the order above, each searched only for the blocks
        # the smaller motions left unmatched (|dy| + |dx| <= 2, then the rest)
        cut = int(np.searchsorted(np.abs(self.table).sum(1), 3))
        self.rings = [(lo, hi) for lo, hi in ((1, cut), (cut, len(offsets))) if lo < hi]
        self.b, self.scale = b, float(b * b * c)  # a block's error: sum, not mean
        self.stages = [
            _ConvGeometry(st.geometry, f.shape[2:], (h, w), b, self.table)
            for st, f in zip(stages, feats, strict=True)
        ]
        inside = np.zeros((self.hp, self.wp))
        inside[:h, :w] = 1
        self.block_pixels = inside.reshape(self.hb, b, self.wb, b).sum((1, 3))
        # zero motion: per-block sums of |difference| as A @ d @ B (A, B: block indicators);
        # blocks that reach past the frame (H or W not a multiple of block) are marked
        self.rows_to_blocks = (np.arange(h)[None, :] // b == np.arange(self.hb)[:, None]).astype(
            np.float32
        )
        self.cols_to_blocks = (np.arange(w)[:, None] // b == np.arange(self.wb)[None, :]).astype(
            np.float32
        )
        partial = (self.block_pixels < b * b).reshape(-1)
        self.partial = partial if partial.any() else None
        # the search gathers blocks by flat index: per block (flat index) and offset the
        # top-left corner in the padded previous frame, plus a block's pattern of offsets
        hpad, wpad = self.hp + 2 * r, self.wp + 2 * r
        by, bx = np.divmod(np.arange(self.hb * self.wb), self.wb)
        wy = by[:, None] * b + (r - self.table[:, 0])[None, :]
        wx = bx[:, None] * b + (r - self.table[:, 1])[None, :]
        self.prev_at = wy * wpad + wx
        self.prev_pattern = self._pattern(c, b, hpad, wpad)
        self.block_at = by * b * self.wp + bx * b
        self.cur_pattern = self._pattern(c, b, self.hp, self.wp)
        self.ones = np.ones(c * b * b, dtype=np.float32)
        # the filter: a summed-area table of the previous frame (float64, zero outside it),
        # the flat indices of each shifted block's four corners in it, and which shifted
        # blocks lie inside the frame (the others hold NaN: never match)
        self.sat = np.zeros((hpad + 1, wpad + 1))
        self.sat_in = self.sat[1 + r : 1 + r + h, 1 + r : 1 + r + w]
        ys, xs = (wy, wy + b), (wx, wx + b)
        self.corners = np.stack([y * (wpad + 1) + x for y in ys for x in xs])
        self.inside = (wy >= r) & (wy + b <= r + h) & (wx >= r) & (wx + b <= r + w)
        self.slack = 1e-4 * self.scale  # float rounding: never filter out a match
        # the previous frame, NaN around it (a shift out of the frame never matches), and
        # the current one zero-padded to whole blocks; two buffers swapped every frame
        self.prev = np.full((c, self.hp + 2 * r, self.wp + 2 * r), np.nan, dtype=np.float32)
        self.next = self.prev.copy()
        self.prev_frame = self.prev[:, r : r + h, r : r + w]
        self.cur = np.zeros((c, self.hp, self.wp), dtype=np.float32)

    @staticmethod
    def _pattern(c: int, b: int, h: int, w: int) -> np.ndarray:
        """Flat offsets of a ``b x b`` block's pixels (all channels) in a (c, h, w) array."""
        return (
            np.arange(c)[:, None, None] * (h * w)
            + np.arange(b)[None, :, None] * w
            + np.arange(b)[None, None, :]
        ).reshape(-1)

    def store(self, frame: np.ndarray, r: int) -> None:
        """Make ``frame`` (C, H, W) the previous frame of the next step."""
        self.prev, self.next = self.next, self.prev
        self.prev_frame = self.prev[:, r : r + self.h, r : r + self.w]
        self.prev_frame[...] = frame


class FrameCachedModel(nn.Module):
    """``model`` with a DeepCache-style cache for a stream of frames at batch 1.

    ``step(frame)`` returns the logits of one frame ``(1, C, H, W)`` and updates the cache;
    ``reset()`` forgets it. ``last_stats`` tells what the last step reused.

    The bookkeeping is sized for speed: block matching and the reuse masks are computed on
    the block grid in numpy (tiny arrays, about a microsecond per operation) with index maps
    made once per frame size; per stage, the cache is shifted by one gather (none when no
    reused position moved) and the dirty positions are recomputed by one conv call on the
    bounding box of their tiles (or one per band of dirty columns / rows, see the module
    docstring). A frame that matches the previous one everywhere without motion runs no
    prefix layer at all.
    """

    def __init__(self, model: nn.Module, cfg: FrameCache) -> None:
        super().__init__()
        self.cfg = cfg
        self.layers, last = _prefix(model, cfg.until)
        self.model = model
        # the model past the prefix: cut after the prefix's last module call
        self.rest = split(model, [last], where="FrameCache")[1] if last else model
        self.convs = nn.ModuleList([la.module for la in self.layers if la.module is not None])
        self.stages = _stages(self.layers)
        self.reset()

    def reset(self) -> None:
        """Forget the cached frame and features."""
        self.prev: torch.Tensor | None = None
        self.cache: list[torch.Tensor] = []  # every stage's output
        self.last_stats: dict[str, float] = {}
        self._geom: _Geometry | None = None

    # -- block matching ------------------------------------------------------------

    def _codes(self, cur: np.ndarray) -> np.ndarray:
        """Per block of ``cur`` (C, H, W): the index of its motion vector in the search
        order (0: no motion), or -1 where no offset matched.

        Early-terminating, as DeepCache's search from the zero vector: every block is first
        compared with the same block of the previous frame (on a static background almost
        all match there); only the others are searched, ring by ring of growing motion
        (:attr:`_Geometry.rings`), each ring only for the blocks no smaller motion matched.
        Each ring compares the blocks with their shifted copies, gathered by flat index from
        the previous frame (no copy of the frame per offset). The result is the exhaustive
        search's: the first offset in the search order that matches."""
        g, bound = self._geom, self.cfg.threshold * self._geom.scale
        g.cur[:, : g.h, : g.w] = cur
        # zero motion, every block: |difference| summed per block by two small matmuls
        d = np.abs(g.prev_frame - cur)
        err = (g.rows_to_blocks @ (d[0] if g.c == 1 else d.sum(0)) @ g.cols_to_blocks).ravel()
        if g.partial is not None:  # blocks over the frame's edge match only when moved
            err[g.partial] = np.inf
        code = np.zeros(g.hb * g.wb, dtype=np.int64)
        left = np.flatnonzero(~(err <= bound))
        if left.size == 0:
            return code.reshape(g.hb, g.wb)
        code[left] = -1
        cur_blocks = g.cur.take(g.block_at[left, None] + g.cur_pattern)  # (n, C b b)
        maybe = None
        if 4 * left.size >= g.hb * g.wb:
            # many blocks to search (a scene change, a moving camera): a filter first,
            # |sum(shifted block) - sum(block)| <= sum |difference| from a summed-area table
            # of the previous frame; only the offsets it lets through (and inside the frame)
            # are compared pixel by pixel. Not worth its fixed cost for a few blocks.
            flat = g.prev_frame[0] if g.c == 1 else g.prev_frame.sum(0)
            np.cumsum(flat, 0, dtype=np.float64, out=g.sat_in)
            np.cumsum(g.sat_in, 1, out=g.sat_in)
            corner = g.sat.take(g.corners[:, left])  # (4, n, offsets)
            sums = g.rows_to_blocks @ (cur[0] if g.c == 1 else cur.sum(0)) @ g.cols_to_blocks
            gap = np.abs(corner[3] - corner[1] - corner[2] + corner[0] - sums.ravel()[left, None])
            maybe = g.inside[left] & (gap <= bound + g.slack)
        for lo, hi in g.rings:
            # each remaining block at each offset of the ring (the filter let through),
            # gathered from the padded previous frame (NaN outside it: never matches)
            if maybe is None:
                shifted = g.prev.take(g.prev_at[left, lo:hi, None] + g.prev_pattern)
                np.subtract(shifted, cur_blocks[:, None], out=shifted)
                match = np.abs(shifted, out=shifted) @ g.ones <= bound
            else:
                bi, oi = np.nonzero(maybe[:, lo:hi])
                shifted = g.prev.take(g.prev_at[left[bi], lo + oi][:, None] + g.prev_pattern)
                np.subtract(shifted, cur_blocks[bi], out=shifted)
                match = np.zeros((len(left), hi - lo), dtype=bool)
                match[bi, oi] = np.abs(shifted, out=shifted) @ g.ones <= bound
            hit = match.any(1)
            code[left[hit]] = lo + match[hit].argmax(1)
            if hit.all():
                break
            left, cur_blocks = left[~hit], cur_blocks[~hit]
            if maybe is not None:
                maybe = maybe[~hit]
        return code.reshape(g.hb, g.wb)

    # -- one frame -------------------------------------------------------------------

    def _full(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        outs = []
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return x, outs

    def step(self, frame: torch.Tensor) -> torch.Tensor:
        """Logits for one frame (1, C, H, W), reusing what the cache allows."""
        if frame.dim() != 4 or frame.shape[0] != 1:
            raise ShapeError(
                f"FrameCachedModel.step: one frame (1, C, H, W), got {tuple(frame.shape)}"
            )
        with torch.no_grad():
            cur = frame[0].detach().cpu().numpy()
            if self.prev is None or self.prev.shape != frame.shape:
                x, outs = self._full(frame)
                self._geom = _Geometry(self.cfg, self.stages, outs, frame.shape)
                self.last_stats = {"reused": 0.0}
            else:
                x, outs = self._cached(frame, cur)
            self._geom.store(cur, self.cfg.search)
            self.prev, self.cache = frame, outs
            return self.rest(x)

    def _cached(self, frame: torch.Tensor, cur: np.ndarray):
        g = self._geom
        code = self._codes(cur)
        dirty = float((g.block_pixels * (code < 0)).sum()) / (g.h * g.w)
        if not code.any():  # every block matched without motion: nothing to compute
            self.last_stats = {"reused": 1.0, "recomputed": 0.0, "dirty_pixels": dirty}
            return self.cache[-1], self.cache
        if (code < 0).all():
            x, outs = self._full(frame)
            self.last_stats = {"reused": 0.0, "recomputed": 1.0, "dirty_pixels": dirty}
            return x, outs
        x, outs = frame, []
        sums = _code_sums(code)
        reused = recomputed = total = 0  # over the convs' outputs
        for stage, geo, old in zip(self.stages, g.stages, self.cache, strict=True):
            n_ok, boxes, src = geo.plan(sums, self.cfg.tile)
            size = geo.ho * geo.wo
            if boxes and not stage.croppable:
                boxes = [(0, geo.ho, 0, geo.wo, size)]
            done = sum(box[4] for box in boxes)
            if n_ok == 0 or done >= 0.9 * size:
                out = stage(x)  # (almost) all dirty: the plain layer is cheaper
                done = size
            else:
                # the cache shifted by the motion vectors (one gather), or as it is
                out = old if src is None else old.flatten(2)[:, :, torch.from_numpy(src)]
                out = out.view_as(old)
                for y0, y1, x0, x1, _ in boxes:
                    out[:, :, y0:y1, x0:x1] = stage.crop(x, y0, y1, x0, x1)
            if stage.is_conv:
                reused, total, recomputed = reused + n_ok, total + size, recomputed + done
            outs.append(out)
            x = out
        self.last_stats = {
            "reused": reused / max(1, total),
            "recomputed": recomputed / max(1, total),
            "dirty_pixels": dirty,
        }
        return x, outs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Frames in order ``(T, C, H, W)``: each one a step; logits ``(T, classes)``."""
        return torch.cat([self.step(x[i : i + 1]) for i in range(x.shape[0])])


def add_frame_cache(model: nn.Module, cfg: FrameCache) -> FrameCachedModel:
    """``model`` wrapped with a DeepCache-style cache (the verb; the model is shared)."""
    return FrameCachedModel(model, cfg)


def _paired_timing(
    cached: FrameCachedModel, model: nn.Module, frames, repeats: int, block: int = 1
) -> dict:
    """Milliseconds per frame of the cache and of recomputing every frame, interleaved.

    Each pass plays the stream once from an empty cache, in blocks of ``block`` frames: for
    every block both run all its frames, one after the other, in an order that alternates
    from block to block (A, B, B, A, ...), so load on a shared machine hits both alike.
    ``block=1`` alternates frame by frame: each runs right after the other and finds the
    CPU caches full of the other's data; a larger block times each on a run of frames, as
    it runs when deployed alone. Per pass: the mean over the frames (what a stream costs)
    and the median frame; reported: the median over the passes of each."""
    import statistics
    import time

    passes: dict[str, list[float]] = {k: [] for k in ("cache", "static", "cache_p50", "static_p50")}
    with torch.no_grad():
        for i in range(min(20, len(frames))):  # warm-up
            cached.step(frames[i : i + 1])
            model(frames[i : i + 1])
        for _ in range(repeats):
            cached.reset()
            times: dict[str, list[float]] = {"cache": [], "static": []}
            for b, first in enumerate(range(0, len(frames), block)):
                rows = range(first, min(first + block, len(frames)))
                order = (("cache", cached.step), ("static", model))
                for name, fn in order if b % 2 == 0 else order[::-1]:
                    for i in rows:
                        x = frames[i : i + 1]
                        start = time.perf_counter()
                        fn(x)
                        times[name].append(time.perf_counter() - start)
            for name, ts in times.items():
                passes[name].append(1e3 * statistics.fmean(ts))
                passes[f"{name}_p50"].append(1e3 * statistics.median(ts))
    return {k: statistics.median(v) for k, v in passes.items()}


def stream_stats(
    model: nn.Module,
    video,
    cfg: FrameCache,
    *,
    timing: bool = False,
    repeats: int = 5,
    block: int = 1,
) -> dict:
    """Run ``video`` (a :class:`~edgeslim.core.data.video.Video`) through ``model`` with and
    without the cache: average MACs per frame, share of the MACs reused, accuracy (frames
    with a label), agreement with recomputing every frame, and with ``timing`` the
    milliseconds per frame of both (batch 1, as the frames arrive, interleaved in blocks of
    ``block`` frames -- 1: frame by frame -- over ``repeats`` passes: ``latency_ms`` /
    ``static_latency_ms`` are the median over passes of the mean per frame, ``*_p50_ms`` of
    the median frame)."""
    from torch.utils.flop_counter import FlopCounterMode

    from edgeslim.dynamic.segments import count_macs

    model.eval()
    cached = FrameCachedModel(model, cfg)
    frames, labels = video.frames, video.labels
    static_macs = count_macs(model, frames[:1])
    macs = 0
    reused = []
    outs = []
    for i in range(len(frames)):
        with FlopCounterMode(display=False) as counter:
            outs.append(cached.step(frames[i : i + 1]))
        macs += counter.get_total_flops() // 2
        reused.append(cached.last_stats.get("reused", 0.0))
    out = torch.cat(outs)
    with torch.no_grad():
        ref = torch.cat([model(frames[i : i + 500]) for i in range(0, len(frames), 500)])
    known = labels >= 0
    row = {
        "static_macs": static_macs,
        "macs": macs / len(frames),
        "reused_macs_share": 1 - macs / (static_macs * len(frames)),
        "reused_positions": sum(reused) / len(reused),
        "accuracy": _acc(out, labels, known),
        "static_accuracy": _acc(ref, labels, known),
        "agreement": float((out.argmax(1) == ref.argmax(1)).float().mean()),
    }
    if timing:
        t = _paired_timing(cached, model, frames, repeats, block)
        row["latency_ms"], row["static_latency_ms"] = t["cache"], t["static"]
        row["latency_p50_ms"], row["static_latency_p50_ms"] = t["cache_p50"], t["static_p50"]
    return row


def _acc(logits: torch.Tensor, labels: torch.Tensor, known: torch.Tensor) -> float | None:
    if not bool(known.any()):
        return None
    return float((logits.argmax(1)[known] == labels[known]).float().mean())


def skip_stats(model: nn.Module, video, every: int) -> dict:
    """Frame skipping: run the model on every ``every``-th frame and repeat its prediction
    for the frames in between; average MACs per frame and accuracy."""
    from edgeslim.dynamic.segments import count_macs

    if every < 1:
        raise ConfigError(f"skip_stats: every must be >= 1, got {every}")
    model.eval()
    frames, labels = video.frames, video.labels
    with torch.no_grad():
        ran = model(frames[::every])
    out = ran.repeat_interleave(every, 0)[: len(frames)]
    return {
        "every": every,
        "macs": count_macs(model, frames[:1]) / every,
        "accuracy": _acc(out, labels, labels >= 0),
    }
