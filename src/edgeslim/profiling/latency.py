"""Measured latency in PyTorch: the median time of repeated forward passes, where the model is.

The example is moved to the model's device (inputs follow the model). On the CPU both
functions time with :func:`edgeslim.core.timing.median_ms` (untimed warm-up, then the median
of the timed passes); on a CUDA GPU with CUDA events (:func:`~edgeslim.core.timing.cuda_median_ms`);
on another accelerator with a backend ``torch.<type>.synchronize`` (MPS, XPU ...) with the
wall clock, synchronized after every pass. ONNX Runtime's latency is in :mod:`.runtimes`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from edgeslim.core.device import model_device, to_device
from edgeslim.core.hooks import eval_mode
from edgeslim.core.timing import check_timing, cuda_median_ms, median_ms

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

    ``example`` is a tensor or a dict of keyword inputs (``model(**example)``), moved to the
    model's device. As :func:`measure_latency_ms`: ``warmup`` untimed passes, eval mode,
    ``torch.inference_mode``; CUDA events on a CUDA GPU (see the module docstring).
    """
    device = model_device(model)
    example = to_device(example, device)

    def run() -> Any:
        return model(**example) if isinstance(example, dict) else model(example)

    with eval_mode(model), torch.inference_mode():
        if device.type == "cpu":
            return median_ms(run, repeats, warmup)
        if device.type == "cuda":
            return cuda_median_ms(run, repeats, warmup, device)
        backend = getattr(torch, device.type, None)
        return median_ms(run, repeats, warmup, getattr(backend, "synchronize", None))
