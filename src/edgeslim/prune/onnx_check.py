"""Export a pruned model to ONNX, run it in ONNX Runtime, compare with PyTorch, time it.

A small stand-in used by the pruning tests and benchmarks to show that physically pruned
models export and run (and run faster) in ONNX Runtime. It uses ``torch.onnx.export``'s
TorchScript exporter (``dynamo=False``: no extra dependencies, handles transformers' models
with keyword inputs) and is meant to be swapped for :func:`edgeslim.export_onnx` once that
exists.
"""

from __future__ import annotations

import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgeslim.core.errors import EdgeslimError
from edgeslim.core.fileio import atomic_path
from edgeslim.core.hooks import eval_mode
from edgeslim.prune.groups import output_tensors


def _outputs(out: Any) -> list[torch.Tensor]:
    return list(output_tensors(out))


class Positional(nn.Module):
    """``model`` called with keyword inputs ``names`` given positionally (for the exporter)."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.model = model
        self.names = names

    def forward(self, *tensors: torch.Tensor) -> Any:
        return self.model(**dict(zip(self.names, tensors, strict=True)))


def export_and_check(
    model: nn.Module, example: Any, path: str | Path, *, rtol: float = 1e-3, threads: int = 1
) -> tuple[Any, float]:
    """Write ``model`` to ``path`` as ONNX (batch dimension dynamic), load it in ONNX Runtime
    and compare its outputs with PyTorch's on ``example`` (a tensor or a dict of keyword
    inputs). Returns ``(session, max_abs_diff)``; raises :class:`EdgeslimError` when the
    outputs differ by more than ``rtol`` of their largest magnitude.
    """
    import onnxruntime as ort

    names = list(example) if isinstance(example, dict) else ["input"]
    args = tuple(example.values()) if isinstance(example, dict) else (example,)
    if isinstance(example, dict):
        model = Positional(model, names)
    with eval_mode(model), torch.no_grad():
        reference = _outputs(model(*args))
        out_names = [f"output_{i}" for i in range(len(reference))]
        axes = {n: {0: "batch"} for n in [*names, *out_names]}
        with atomic_path(Path(path)) as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                args,
                str(tmp),
                input_names=names,
                output_names=out_names,
                dynamic_axes=axes,
                opset_version=17,
                dynamo=False,
            )
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    got = session.run(None, feeds(example))
    diff = 0.0
    for ref, out in zip(reference, got, strict=False):
        ref_np = ref.numpy()
        if ref_np.shape != out.shape:
            raise EdgeslimError(
                f"{path}: ONNX Runtime output {out.shape} != PyTorch {ref_np.shape}"
            )
        diff = max(diff, float(np.abs(ref_np - out).max()))
        if diff > rtol * max(1e-6, float(np.abs(ref_np).max())):
            raise EdgeslimError(f"{path}: ONNX Runtime differs from PyTorch by {diff:.3g}")
    return session, diff


def feeds(example: Any) -> dict[str, np.ndarray]:
    """ONNX Runtime inputs for ``example`` (a tensor, or a dict of keyword inputs)."""
    if isinstance(example, dict):
        return {k: v.numpy() for k, v in example.items()}
    return {"input": example.numpy()}


def median_ms(run: Any, repeats: int = 50, warmup: int = 5) -> float:
    """Median wall-clock milliseconds of ``run()`` over ``repeats`` calls after ``warmup``."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def ort_latency_ms(session: Any, example: Any, repeats: int = 50, warmup: int = 5) -> float:
    """Median ms of one ONNX Runtime run on the whole batch ``example``."""
    inputs = feeds(example)
    return median_ms(lambda: session.run(None, inputs), repeats, warmup)


def torch_latency_ms(model: nn.Module, example: Any, repeats: int = 50, warmup: int = 5) -> float:
    """Median ms of one PyTorch forward on the whole batch ``example`` (inference mode)."""
    with eval_mode(model), torch.inference_mode():
        if isinstance(example, dict):
            return median_ms(lambda: model(**example), repeats, warmup)
        return median_ms(lambda: model(example), repeats, warmup)
