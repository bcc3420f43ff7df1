"""A cross-frame cache: reuse the early layers' results where the frame did not change.

Mengwei Xu, Mengze Zhu, Yunxin Liu, Felix Xiaozhu Lin, Xuanzhe Liu. "DeepCache: Principled
Cache for Mobile Deep Vision", MobiCom 2018. https://arxiv.org/abs/1712.01670

For each new frame, as in DeepCache:

1. **Block matching on the input**: the frame is cut into ``block x block`` blocks; each is
   searched in the previous frame within ``search`` pixels, nearest offsets first (as
   DeepCache's search starts from the zero vector). A block is reusable with the smallest
   motion vector whose mean absolute difference is at most ``threshold``.
2. **Propagation through the receptive fields**: for each convolution of the cached prefix,
   an output position is reused when every input pixel of its receptive field is reusable
   and moved by one motion vector; its value is the cached output at the position that
   vector (divided by the layer's stride, rounded) points to. Everything else is dirty.
3. **Recompute the rest**: dirty positions are grouped in ``tile x tile`` tiles; only those
   tiles are convolved (their input patches gathered from the layer's zero-padded input,
   one batched conv), and pasted over the reused map. Cheap element-wise layers and pooling
   run on the whole map. Past the prefix, the network runs as usual.

The cached prefix is the model's longest leading chain of Conv2d / BatchNorm2d / ReLU /
ReLU6 / MaxPool2d / AvgPool2d (or up to ``until``). Rounded motion vectors and the matching
threshold make reuse approximate: ``threshold`` trades accuracy for compute.
"""

from __future__ import annotations

import math

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
                if _pair(m.kernel_size)[0] != _pair(m.kernel_size)[1] or not isinstance(
                    m.padding, tuple
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


class FrameCachedModel(nn.Module):
    """``model`` with a DeepCache-style cache for a stream of frames at batch 1.

    ``step(frame)`` returns the logits of one frame ``(1, C, H, W)`` and updates the cache;
    ``reset()`` forgets it. ``last_stats`` tells what the last step reused.
    """

    def __init__(self, model: nn.Module, cfg: FrameCache) -> None:
        super().__init__()
        self.cfg = cfg
        self.layers, last = _prefix(model, cfg.until)
        self.model = model
        # the model past the prefix: cut after the prefix's last module call
        self.rest = split(model, [last], where="FrameCache")[1] if last else model
        self.convs = nn.ModuleList([la.module for la in self.layers if la.module is not None])
        self.reset()

    def reset(self) -> None:
        """Forget the cached frame and features."""
        self.prev: torch.Tensor | None = None
        self.cache: list[torch.Tensor] = []
        self.last_stats: dict[str, float] = {}

    # -- block matching ------------------------------------------------------------

    def _offsets(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Search offsets nearest first, as indices into the unfolded windows, and (dy, dx)."""
        if getattr(self, "_order", None) is None:
            r = self.cfg.search
            offsets = sorted(
                ((dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1)),
                key=lambda o: abs(o[0]) + abs(o[1]),
            )  # zero motion first: it wins ties
            n = 2 * r + 1  # window (i, j) of prev holds the content moved by (r - i, r - j)
            self._order = torch.tensor([(r - dy) * n + (r - dx) for dy, dx in offsets])
            self._table = torch.tensor(offsets)
        return self._order, self._table

    def match(self, cur: torch.Tensor, prev: torch.Tensor):
        """Per pixel: ``(dirty (H, W) bool, motion dy (H, W), motion dx (H, W))``."""
        b, r = self.cfg.block, self.cfg.search
        _, c, h, w = cur.shape
        hb, wb = math.ceil(h / b), math.ceil(w / b)
        ph, pw = hb * b - h, wb * b - w
        order, table = self._offsets()
        cp = F.pad(cur, (0, pw, 0, ph))
        p = F.pad(prev, (r, r + pw, r, r + ph), value=float("nan"))
        # every shifted copy of prev at once, as a view: (C, 2r+1, 2r+1, H', W')
        # content moved by (dy, dx): cur[y, x] ~ prev[y - dy, x - dx]
        windows = p[0].unfold(1, hb * b, 1).unfold(2, wb * b, 1)
        diff = (windows - cp[0, :, None, None]).abs().sum(0).flatten(0, 1)  # (offsets, H', W')
        err = F.avg_pool2d(diff[order], b) / c  # (offsets, hb, wb), nearest offset first
        # as DeepCache's search from the zero vector: the smallest motion that matches wins
        # (the best match of a flat or noisy block is often a meaningless shift)
        match = err.nan_to_num(math.inf) <= self.cfg.threshold  # (offsets, hb, wb)
        ok = match.any(0)
        which = match.to(torch.uint8).argmax(0)  # first matching offset: offsets are sorted
        maps = torch.stack([(~ok).long(), table[which, 0], table[which, 1]])
        maps = maps.repeat_interleave(b, 1).repeat_interleave(b, 2)[:, :h, :w]
        return maps[0].bool(), maps[1], maps[2]

    # -- one frame -------------------------------------------------------------------

    def _full(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        feats = []
        for layer in self.layers:
            x = layer.module(x) if layer.module is not None else layer.fn(x)
            if layer.module is not None:
                feats.append(x)
        return x, feats

    def _reuse_mask(self, layer: _Layer, out_hw, dirty, my, mx):
        """Reusable output positions of a conv and their source positions in the cache."""
        ho, wo = out_hw
        k, s, p = layer.rf, layer.stride, layer.pad
        h, w = dirty.shape
        need_h, need_w = (ho - 1) * s + k, (wo - 1) * s + k
        pads = (p, max(0, need_w - w - p), p, max(0, need_h - h - p))

        maps = torch.stack([dirty.float() * 1e9, my.float(), mx.float(), -my.float(), -mx.float()])
        maps = F.pad(maps[None], pads, value=-1e9)[:, :, :need_h, :need_w]
        pooled = F.max_pool2d(maps, k, s)[0]  # (5, Ho, Wo): max of each map
        bad = pooled[0] > 0
        hi_y, hi_x, lo_y, lo_x = pooled[1], pooled[2], -pooled[3], -pooled[4]
        uniform = (hi_y == lo_y) & (hi_x == lo_x)
        fy, fx_ = torch.round(hi_y / s).long(), torch.round(hi_x / s).long()
        rows = torch.arange(ho)[:, None] - fy
        cols = torch.arange(wo)[None, :] - fx_
        inside = (rows >= 0) & (rows < ho) & (cols >= 0) & (cols < wo)
        reuse = ~bad & uniform & inside
        return reuse, rows.clamp(0, ho - 1), cols.clamp(0, wo - 1)

    def _conv_tiles(self, conv: nn.Conv2d, x: torch.Tensor, out: torch.Tensor, dirty: torch.Tensor):
        """Recompute ``out`` (1, C, Ho, Wo) at the tiles of ``dirty`` (Ho, Wo) from ``x``."""
        t = self.cfg.tile
        ho, wo = dirty.shape
        th, tw = math.ceil(ho / t), math.ceil(wo / t)
        tiles = F.pad(dirty[None, None].float(), (0, tw * t - wo, 0, th * t - ho))
        tiles = F.max_pool2d(tiles, t)[0, 0] > 0  # (th, tw)
        n = int(tiles.sum())
        if n == 0:
            return 0
        if n >= 0.75 * th * tw:  # mostly dirty: the plain conv is cheaper
            out.copy_(conv(x))
            return th * tw
        s, d = _pair(conv.stride)[0], _pair(conv.dilation)[0]
        p, k = _pair(conv.padding)[0], _pair(conv.kernel_size)[0]
        span = (t - 1) * s + d * (k - 1) + 1
        need_h, need_w = (th * t - 1) * s + d * (k - 1) + 1, (tw * t - 1) * s + d * (k - 1) + 1
        xp = F.pad(x, (p, max(0, need_w - x.shape[3] - p), p, max(0, need_h - x.shape[2] - p)))
        xp = xp[:, :, :need_h, :need_w]
        ty, tx = tiles.nonzero(as_tuple=True)
        cols = F.unfold(xp, span, stride=t * s)[0]  # (C * span * span, th * tw)
        patches = cols[:, ty * tw + tx].T.reshape(n, x.shape[1], span, span)
        y = F.conv2d(patches, conv.weight, conv.bias, s, 0, d, conv.groups)  # (n, C, t, t)
        c = out.shape[1]
        grid = out.new_zeros((c, th * t, tw * t))
        grid[:, :ho, :wo] = out[0]
        grid.view(c, th, t, tw, t).permute(1, 3, 0, 2, 4)[ty, tx] = y
        out[0] = grid[:, :ho, :wo]
        return n

    def step(self, frame: torch.Tensor) -> torch.Tensor:
        """Logits for one frame (1, C, H, W), reusing what the cache allows."""
        if frame.dim() != 4 or frame.shape[0] != 1:
            raise ShapeError(
                f"FrameCachedModel.step: one frame (1, C, H, W), got {tuple(frame.shape)}"
            )
        with torch.no_grad():
            if self.prev is None or self.prev.shape != frame.shape:
                x, feats = self._full(frame)
                self.last_stats = {"reused": 0.0}
            else:
                x, feats = self._cached(frame)
            self.prev, self.cache = frame.clone(), feats
            return self.rest(x)

    def _cached(self, frame: torch.Tensor):
        dirty, my, mx = self.match(frame, self.prev)
        x, feats, k = frame, [], 0
        reused = total = 0
        for layer in self.layers:
            if layer.module is None:
                x = layer.fn(x)
                continue
            old = self.cache[k]
            reuse, rows, cols = self._reuse_mask(layer, old.shape[2:], dirty, my, mx)
            out = old[:, :, rows, cols] * reuse  # shifted cache where reusable, 0 elsewhere
            self._conv_tiles(layer.module, x, out, ~reuse)
            reused += int(reuse.sum())
            total += reuse.numel()
            feats.append(out)
            x, k = out, k + 1
        self.last_stats = {
            "reused": reused / max(1, total),
            "dirty_pixels": float(dirty.float().mean()),
        }
        return x, feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Frames in order ``(T, C, H, W)``: each one a step; logits ``(T, classes)``."""
        return torch.cat([self.step(x[i : i + 1]) for i in range(x.shape[0])])


def add_frame_cache(model: nn.Module, cfg: FrameCache) -> FrameCachedModel:
    """``model`` wrapped with a DeepCache-style cache (the verb; the model is shared)."""
    return FrameCachedModel(model, cfg)


def _timed_stream(fn, frames: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Outputs of ``fn`` on each frame in order, and the median milliseconds per frame."""
    import statistics
    import time

    outs, times = [], []
    with torch.no_grad():
        for i in range(frames.shape[0]):
            start = time.perf_counter()
            outs.append(fn(frames[i : i + 1]))
            times.append(time.perf_counter() - start)
    return torch.cat(outs), statistics.median(times) * 1e3


def stream_stats(model: nn.Module, video, cfg: FrameCache, *, timing: bool = False) -> dict:
    """Run ``video`` (a :class:`~edgeslim.core.data.video.Video`) through ``model`` with and
    without the cache: average MACs per frame, share of the MACs reused, accuracy (frames
    with a label), agreement with recomputing every frame, and with ``timing`` the median
    milliseconds per frame of both (batch 1, as the frames arrive)."""
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
        cached.reset()
        row["latency_ms"] = _timed_stream(cached.step, frames)[1]
        row["static_latency_ms"] = _timed_stream(model, frames)[1]
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
