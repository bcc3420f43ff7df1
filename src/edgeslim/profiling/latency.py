"""Measured latency: the median wall-clock time of repeated batch-1 forward passes."""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from edgeslim.core.errors import ConfigError
from edgeslim.core.hooks import eval_mode


def check_timing(repeats: int, warmup: int) -> None:
    """Raise :class:`ConfigError` unless ``repeats >= 1`` and ``warmup >= 0``."""
    if repeats < 1:
        raise ConfigError(f"latency repeats must be >= 1, got {repeats}")
    if warmup < 0:
        raise ConfigError(f"latency warmup must be >= 0, got {warmup}")


def measure_latency_ms(
    model: nn.Module, example: torch.Tensor, *, repeats: int = 30, warmup: int = 5
) -> float:
    """Median milliseconds of one forward pass on the first sample of ``example``.

    Runs ``warmup`` untimed passes, then ``repeats`` timed ones, in eval mode under
    ``torch.inference_mode``. ``example`` is a batch ``(B, ...)``; only ``example[:1]`` is used.
    """
    check_timing(repeats, warmup)
    x = example[:1]
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    times: list[float] = []
    with eval_mode(model), torch.inference_mode():
        for _ in range(warmup):
            model(x)
        sync()
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            sync()
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3
