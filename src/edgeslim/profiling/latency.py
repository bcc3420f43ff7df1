"""Measured latency in PyTorch: the median wall-clock time of repeated forward passes.

Both functions time with :func:`edgeslim.core.timing.median_ms` (untimed warm-up, then the
median of the timed passes); ONNX Runtime's latency is in :mod:`.runtimes`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from edgeslim.core.hooks import eval_mode
from edgeslim.core.timing import check_timing, median_ms

__all__ = ["batch_latency_ms", "check_timing", "eval_mode", "measure_latency_ms"]


def measure_latency_ms(
    model: nn.Module, example: torch.Tensor, *, repeats: int = 30, warmup: int = 5
) -> float:
    """Median milliseconds of one forward pass on the first sample of ``example``.

    Runs ``warmup`` untimed passes, then ``repeats`` timed ones, in eval mode under
    ``torch.inference_mode``. ``example`` is a batch ``(B, ...)``; only ``example[:1]`` is used.
    """
    check_timing(repeats, warmup)
    return batch_latency_ms(model, example[:1], repeats=repeats, warmup=warmup)


def batch_latency_ms(
    model: nn.Module, example: Any, *, repeats: int = 30, warmup: int = 5
) -> float:
    """Median milliseconds of one forward pass on the whole batch ``example``.

    ``example`` is a tensor or a dict of keyword inputs (``model(**example)``). As
    :func:`measure_latency_ms`: ``warmup`` untimed passes, eval mode, ``torch.inference_mode``,
    CUDA synchronized after every pass when the inputs are on a GPU.
    """
    tensors = list(example.values()) if isinstance(example, dict) else [example]
    cuda = any(isinstance(t, torch.Tensor) and t.is_cuda for t in tensors)
    sync = torch.cuda.synchronize if cuda else None
    with eval_mode(model), torch.inference_mode():
        if isinstance(example, dict):
            return median_ms(lambda: model(**example), repeats, warmup, sync)
        return median_ms(lambda: model(example), repeats, warmup, sync)
