"""Measured latency in ONNX Runtime: the model exported in memory, checked, then timed.

    session = ort_session(model, example)          # raises if ORT disagrees with PyTorch
    ms = ort_latency_ms(session, example, repeats=50)

The model is written by ``torch.onnx.export``'s TorchScript exporter (``dynamo=False``: no
extra dependencies, and it handles transformers' models called with keyword inputs) into
memory, batch dimension dynamic, opset 17; nothing is written to disk. ``example`` is a
tensor (input ``"input"``) or a dict of keyword inputs (one ONNX input per key). This is for
measuring a model and checking that it runs in ONNX Runtime; the deployable file, with its
own verification and int8 support, is :func:`edgeslim.export.onnx.export_onnx`'s.
"""

from __future__ import annotations

import io
import warnings
from typing import Any

import numpy as np
import torch
from torch import nn

from edgeslim.core.device import model_device, to_device
from edgeslim.core.errors import EdgeslimError
from edgeslim.core.hooks import eval_mode, output_tensors
from edgeslim.core.timing import median_ms

__all__ = ["Positional", "feeds", "ort_latency_ms", "ort_outputs", "ort_session"]


class Positional(nn.Module):
    """``model`` called with keyword inputs ``names`` given positionally (for the exporter)."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.model = model
        self.names = names

    def forward(self, *tensors: torch.Tensor) -> Any:
        return self.model(**dict(zip(self.names, tensors, strict=True)))


def feeds(example: Any) -> dict[str, np.ndarray]:
    """ONNX Runtime inputs for ``example`` (a tensor, or a dict of keyword inputs)."""
    if isinstance(example, dict):
        return {k: v.cpu().numpy() for k, v in example.items()}
    return {"input": example.cpu().numpy()}


def ort_session(model: nn.Module, example: Any, *, threads: int = 1, rtol: float = 1e-3) -> Any:
    """An ONNX Runtime CPU session running ``model``, checked against PyTorch on ``example``.

    ``threads`` intra-op threads (one inter-op thread). Raises :class:`EdgeslimError` when an
    output's shape differs or the outputs differ by more than ``rtol`` of their largest
    magnitude.
    """
    import onnxruntime as ort

    names = list(example) if isinstance(example, dict) else ["input"]
    args = tuple(example.values()) if isinstance(example, dict) else (example,)
    args = to_device(args, model_device(model))  # PyTorch's reference runs where the model is
    if isinstance(example, dict):
        model = Positional(model, names)
    buffer = io.BytesIO()
    with eval_mode(model), torch.no_grad():
        reference = list(output_tensors(model(*args)))
        out_names = [f"output_{i}" for i in range(len(reference))]
        axes = {n: {0: "batch"} for n in [*names, *out_names]}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                args,
                buffer,
                input_names=names,
                output_names=out_names,
                dynamic_axes=axes,
                opset_version=17,
                dynamo=False,
            )
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])
    what = type(model.model if isinstance(model, Positional) else model).__name__
    got = ort_outputs(session, example)
    diff = 0.0
    for ref, out in zip(reference, got, strict=False):
        ref_np = ref.cpu().numpy()
        if ref_np.shape != out.shape:
            raise EdgeslimError(
                f"{what}: ONNX Runtime output {out.shape} != PyTorch {ref_np.shape}"
            )
        diff = max(diff, float(np.abs(ref_np - out).max()))
        if diff > rtol * max(1e-6, float(np.abs(ref_np).max())):
            raise EdgeslimError(f"{what}: ONNX Runtime differs from PyTorch by {diff:.3g}")
    return session


def ort_outputs(session: Any, example: Any) -> list[np.ndarray]:
    """Every output of ``session`` run on ``example``, in the model's output order."""
    return session.run(None, feeds(example))


def ort_latency_ms(session: Any, example: Any, *, repeats: int = 50, warmup: int = 5) -> float:
    """Median ms of one ONNX Runtime run on the whole batch ``example``."""
    inputs = feeds(example)
    return median_ms(lambda: session.run(None, inputs), repeats, warmup)
