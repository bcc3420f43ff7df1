"""One wall-clock timer: the median of repeated calls, after untimed warm-up calls.

    ms = median_ms(lambda: model(x), repeats=30, warmup=5)

Every latency edgeslim reports (PyTorch forward passes, ONNX Runtime sessions) is measured
with it, so they all mean the same thing. On a CUDA GPU, :func:`cuda_median_ms` is the same
statistic timed by CUDA events (the GPU's own clock, no host-side jitter).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

from edgeslim.core.errors import ConfigError


def check_timing(repeats: int, warmup: int) -> None:
    """Raise :class:`ConfigError` unless ``repeats >= 1`` and ``warmup >= 0``."""
    if repeats < 1:
        raise ConfigError(f"latency repeats must be >= 1, got {repeats}")
    if warmup < 0:
        raise ConfigError(f"latency warmup must be >= 0, got {warmup}")


def median_ms(
    fn: Callable[[], Any],
    repeats: int,
    warmup: int,
    sync: Callable[[], Any] | None = None,
) -> float:
    """Median milliseconds of one ``fn()`` over ``repeats`` timed calls after ``warmup``.

    The ``warmup`` calls are not timed. ``sync`` (e.g. ``torch.cuda.synchronize``), when
    given, is called once after the warm-up and inside every timed call, after ``fn()``, so
    asynchronous work is counted where it is issued.
    """
    check_timing(repeats, warmup)
    for _ in range(warmup):
        fn()
    if sync is not None:
        sync()
    times: list[float] = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def cuda_median_ms(fn: Callable[[], Any], repeats: int, warmup: int, device: Any = None) -> float:
    """:func:`median_ms` on a CUDA device, timed with CUDA events.

    Each timed call is bracketed by two events recorded on the current stream of ``device``
    and the device is synchronized before reading them, so the time is what the GPU spent
    from the first kernel ``fn`` queued to the last (``fn``'s host-side work included when it
    delays the queue). The ``warmup`` calls are not timed.
    """
    import torch

    check_timing(repeats, warmup)
    with torch.cuda.device(device):
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()
        times: list[float] = []
        for _ in range(repeats):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))  # milliseconds
    return statistics.median(times)
