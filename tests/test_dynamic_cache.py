"""Frame cache and frame sources: reuse when frames repeat, recompute when they change."""

import numpy as np
import pytest
import torch

from edgeslim import ConfigError, DataError, ShapeError
from edgeslim.core.data.video import load_frames, render_digits, synthetic_video
from edgeslim.core.models import zoo
from edgeslim.dynamic import FrameCache, FrameCachedModel, count_macs, skip_stats, stream_stats


def test_synthetic_video_is_deterministic(mnist):
    a = synthetic_video(mnist.test, 50, seed=3)
    b = synthetic_video(mnist.test, 50, seed=3)
    assert torch.equal(a.frames, b.frames) and torch.equal(a.labels, b.labels)
    assert a.frames.shape == (50, 1, 28, 28) and a.frames.min() >= 0 and a.frames.max() <= 1
    assert len(set(a.labels.tolist())) > 1  # the digit changes
    assert render_digits(mnist.val).x.shape == mnist.val.x.shape


def test_cache_reuses_repeats_and_recomputes_changes():
    model = zoo.create("lenet5").eval()
    cached = FrameCachedModel(model, FrameCache(threshold=0.01))
    frame = torch.rand(1, 1, 28, 28)
    full = count_macs(model, frame)
    first = count_macs(cached.step, frame)
    assert first == full
    repeat = count_macs(cached.step, frame)
    assert cached.last_stats["reused"] == 1.0
    assert repeat == full - count_macs(cached._full, frame)  # only the classifier ran
    with torch.no_grad():
        assert torch.allclose(cached.step(frame), model(frame), atol=1e-5)
    changed = frame.clone()
    changed[..., 20:, 20:] = torch.rand(1, 1, 8, 8)  # a corner changes
    with torch.no_grad():
        out = cached.step(changed)
        assert torch.allclose(out, model(changed), atol=1e-5)  # exact: no motion involved
    assert 0 < cached.last_stats["reused"] < 1
    different = torch.rand(1, 1, 28, 28)
    cached.step(different)
    assert cached.last_stats["reused"] < 0.2


def test_cache_follows_motion():
    model = zoo.create("lenet5").eval()
    cached = FrameCachedModel(model, FrameCache(threshold=0.01, search=2))
    frame = torch.zeros(1, 1, 28, 28)
    frame[..., 8:20, 8:20] = torch.rand(12, 12)
    cached.step(frame)
    moved = torch.roll(frame, shifts=(2, 0), dims=(2, 3))  # moved 2 px down
    cached.step(moved)
    assert cached.last_stats["reused"] > 0.5
    assert cached.last_stats["dirty_pixels"] < 0.1


def test_stream_and_skip_stats(mnist):
    model = zoo.create("lenet5").eval()
    video = synthetic_video(mnist.test, 30)
    row = stream_stats(model, video, FrameCache(threshold=0.05))
    assert 0 < row["reused_macs_share"] < 1 and row["macs"] < row["static_macs"]
    none = stream_stats(model, video, FrameCache(threshold=0.0, search=0))
    assert none["agreement"] == 1.0
    skip = skip_stats(model, video, 3)
    assert skip["macs"] == pytest.approx(row["static_macs"] / 3)


def test_frames_sources(tmp_path):
    frames = (np.random.default_rng(0).random((5, 28, 28)) * 255).astype(np.uint8)
    np.savez(tmp_path / "clip.npz", frames=frames, labels=np.arange(5))
    v = load_frames(f"frames:{tmp_path / 'clip.npz'}")
    assert v.frames.shape == (5, 1, 28, 28) and v.labels.tolist() == [0, 1, 2, 3, 4]
    d = tmp_path / "dir"
    d.mkdir()
    for i, f in enumerate(frames):
        np.save(d / f"{i:03d}.npy", f)
    (d / "labels.txt").write_text("1\n2\n3\n4\n5\n")
    v = load_frames(f"frames:{d}")
    assert torch.allclose(v.frames[:, 0], torch.from_numpy(frames / 255.0).float())
    from PIL import Image

    p = tmp_path / "png"
    p.mkdir()
    for i, f in enumerate(frames):
        Image.fromarray(f).save(p / f"{i:03d}.png")
    assert load_frames(f"frames:{p}").labels.tolist() == [-1] * 5


def test_cache_errors(tmp_path):
    with pytest.raises(DataError, match="unknown frame source"):
        load_frames("video.mp4")
    with pytest.raises(DataError, match="not a directory"):
        load_frames(f"frames:{tmp_path / 'missing.npz'}")
    np.savez(tmp_path / "bad.npz", x=np.zeros((2, 4, 4)))
    with pytest.raises(DataError, match="no 'frames'"):
        load_frames(f"frames:{tmp_path / 'bad.npz'}")
    np.savez(tmp_path / "lab.npz", frames=np.zeros((3, 4, 4)), labels=np.zeros(2, dtype=int))
    with pytest.raises(DataError, match="one per frame"):
        load_frames(f"frames:{tmp_path / 'lab.npz'}")
    model = zoo.create("lenet5")
    with pytest.raises(ConfigError, match="until"):
        FrameCachedModel(model, FrameCache(until="fc1"))
    with pytest.raises(ConfigError, match="does not start with a convolution"):
        FrameCachedModel(zoo.create("lenet300"), FrameCache())
    with pytest.raises(ShapeError, match="one frame"):
        FrameCachedModel(model, FrameCache()).step(torch.zeros(2, 1, 28, 28))
    with pytest.raises(ConfigError, match="threshold"):
        FrameCache(threshold=-1)


def test_larger_synthetic_video_and_unchanged_default(mnist):
    v = synthetic_video(mnist.test, 12, seed=1, size=64, scale=2)
    assert v.frames.shape == (12, 1, 64, 64)
    assert torch.equal(v.frames, synthetic_video(mnist.test, 12, seed=1, size=64, scale=2).frames)
    assert render_digits(mnist.val, size=64, scale=2).x.shape == (len(mnist.val.x), 1, 64, 64)
    with pytest.raises(DataError, match="cannot hold digits"):
        synthetic_video(mnist.test, 5, size=40, scale=2)


def test_cache_recomputes_a_box_through_padded_strided_convs():
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 5, stride=2, padding=2),
        torch.nn.ReLU(),
        torch.nn.Conv2d(4, 6, 3, padding=1),
        torch.nn.MaxPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(6 * 12 * 12, 3),
    ).eval()
    cached = FrameCachedModel(net, FrameCache(threshold=0.0, search=1))
    frame = torch.rand(1, 1, 48, 48)
    cached.step(frame)
    for y, x in ((0, 0), (20, 30), (40, 44)):  # a corner, the middle, the far edge
        changed = frame.clone()
        changed[..., y : y + 6, x : x + 4] = torch.rand(1, 1, 6, 4)
        cached.step(frame)
        macs = count_macs(cached.step, changed)  # the box around the change only
        with torch.no_grad():
            assert torch.allclose(cached.step(frame), net(frame), atol=1e-5)
            assert torch.allclose(cached.step(changed), net(changed), atol=1e-5)
        assert 0.4 < cached.last_stats["reused"] < 1 and macs < count_macs(net, frame) / 2
    assert count_macs(cached.step, changed) == count_macs(cached.rest, cached.cache[-1])


def test_cache_runs_uncroppable_pooling_whole():
    torch.manual_seed(1)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 3, 3, padding=1),
        torch.nn.MaxPool2d(3, stride=2, ceil_mode=True),  # no crop: run on the whole map
        torch.nn.Flatten(),
        torch.nn.Linear(3 * 12 * 12, 2),
    ).eval()
    cached = FrameCachedModel(net, FrameCache(threshold=0.0, search=0))
    frame = torch.rand(1, 1, 24, 24)  # ceil mode: 12x12 out, not 11x11
    changed = frame.clone()
    changed[..., 3:6, 3:6] = 0.5
    with torch.no_grad():
        cached.step(frame)
        assert torch.allclose(cached.step(changed), net(changed), atol=1e-5)
    assert not cached.stages[0].croppable and 0 < cached.last_stats["reused"] < 1


def _exhaustive_codes(prev: np.ndarray, cur: np.ndarray, cfg: FrameCache) -> np.ndarray:
    """The reference search: per block, every offset in order of |dy| + |dx| (ties in
    row-major order), the first whose mean |difference| is <= threshold; -1 if none. Blocks
    past the frame's edge only match shifted copies that lie inside it."""
    b, r = cfg.block, cfg.search
    c, h, w = cur.shape
    hb, wb = -(-h // b), -(-w // b)
    offsets = sorted(
        ((dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1)),
        key=lambda o: abs(o[0]) + abs(o[1]),
    )
    pad = np.full((c, hb * b + 2 * r, wb * b + 2 * r), np.nan)
    pad[:, r : r + h, r : r + w] = prev
    cp = np.zeros((c, hb * b, wb * b))
    cp[:, :h, :w] = cur
    code = np.full((hb, wb), -1)
    for i in range(hb):
        for j in range(wb):
            block = cp[:, i * b : (i + 1) * b, j * b : (j + 1) * b]
            for k, (dy, dx) in enumerate(offsets):
                y, x = r + i * b - dy, r + j * b - dx
                e = np.abs(pad[:, y : y + b, x : x + b] - block).mean()
                if e <= cfg.threshold:  # NaN: never
                    code[i, j] = k
                    break
    return code


@pytest.mark.parametrize("threshold", [0.0, 0.05])
def test_ring_search_finds_the_exhaustive_searchs_matches(threshold):
    torch.manual_seed(2)
    net = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3, padding=1), torch.nn.Flatten()).eval()
    cfg = FrameCache(threshold=threshold, search=2, block=4)
    cached = FrameCachedModel(net, cfg)
    rng = np.random.default_rng(0)
    prev = rng.random((2, 46, 42)).astype(np.float32)  # 46x42: partial edge blocks
    cur = prev.copy()
    cur[:, 2:14, 3:15] = np.roll(prev, (1, -2), (1, 2))[:, 2:14, 3:15]  # moved (1, -2)
    cur[:, 16:28, 10:22] = np.roll(prev, (-1, 1), (1, 2))[:, 16:28, 10:22]  # moved (-1, 1)
    cur[:, 20:30, :6] += rng.normal(0, 0.03, (2, 10, 6)).astype(np.float32)  # noise
    cur[:, :4, 20:] = rng.random((2, 4, 22))  # new content
    cur[:, 30:, 20:] = rng.random((2, 16, 22))
    few = prev.copy()  # one small moved patch: few blocks to search (no block-sum filter)
    few[:, 4:12, 4:12] = np.roll(prev, (2, 1), (1, 2))[:, 4:12, 4:12]
    cached.step(torch.from_numpy(prev)[None])
    for frame, searched in ((cur, "many"), (few, "few")):
        got = cached._codes(frame)
        want = _exhaustive_codes(prev, frame, cfg)
        assert np.array_equal(got, want)
        assert (4 * (want != 0).sum() >= want.size) == (searched == "many")  # both paths
    got = cached._codes(cur)
    moved = cached._geom.table[got[got > 0]]
    assert {(1, -2), (-1, 1)} <= {tuple(v) for v in moved.tolist()}
    assert (got == -1).any() and (got == 0).any()


def test_cache_recomputes_two_separate_changes_in_two_boxes():
    torch.manual_seed(3)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(4, 4, 3, padding=1),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 32 * 32, 3),
    ).eval()
    cached = FrameCachedModel(net, FrameCache(threshold=0.0, search=1))
    frame = torch.rand(1, 1, 64, 64)
    changed = frame.clone()
    changed[..., :, 2:6] = torch.rand(64, 4)  # a full-height strip on the left
    changed[..., 40:48, 50:58] = torch.rand(8, 8)  # a patch on the right
    boxes = []

    def recorded(plan):
        def run(sums, tile):
            out = plan(sums, tile)
            boxes.append(out[1])
            return out

        return run

    with torch.no_grad():
        cached.step(frame)
        for geo in cached._geom.stages:
            geo.plan = recorded(geo.plan)
        macs = count_macs(cached.step, changed)
        assert torch.allclose(cached.step(frame), net(frame), atol=1e-5)
        assert torch.allclose(cached.step(changed), net(changed), atol=1e-5)
    first = boxes[0]  # the first conv stage: strip and patch apart, rows of the patch only
    assert len(first) == 2
    (s_y0, s_y1, s_x0, s_x1, _), (p_y0, p_y1, p_x0, p_x1, _) = sorted(first, key=lambda b: b[2])
    assert (s_y0, s_y1) == (0, 32) and s_x1 <= 6 and p_x0 >= 22 and p_y1 - p_y0 <= 8
    one_box = 32 * (p_x1 - s_x0) * (1 * 4 * 9) * 4  # one bounding box: conv1 MACs, 2x2 pool
    assert macs < count_macs(net, frame) - one_box / 2


def test_paired_timing_alternates_in_blocks():
    from edgeslim.dynamic.cache import _paired_timing

    calls = []

    class Fake:
        def step(self, x):
            calls.append(("cache", int(x[0, 0])))

        def reset(self):
            calls.append(("reset", -1))

    frames = torch.arange(7.0).view(7, 1, 1)
    model = lambda x: calls.append(("static", int(x[0, 0])))  # noqa: E731
    t = _paired_timing(Fake(), model, frames, repeats=1, block=3)
    assert set(t) == {"cache", "static", "cache_p50", "static_p50"} and t["cache"] > 0
    timed = calls[calls.index(("reset", -1)) + 1 :]  # after the warm-up
    c, s = "cache", "static"
    want = [(c, 0), (c, 1), (c, 2), (s, 0), (s, 1), (s, 2)]
    want += [(s, 3), (s, 4), (s, 5), (c, 3), (c, 4), (c, 5), (c, 6), (s, 6)]
    assert timed == want
