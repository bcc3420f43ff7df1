"""Build the integer graph of a model and check it against the PyTorch model.

Both exporters start here: :func:`build_and_check_graph` lowers the model (unless a graph is
given), chooses the int8 inputs every later check runs on (the first calibration inputs, or
random int8 inputs for a quantized model without ``calib``) and, with ``verify``, compares
the reference interpreter's dequantized outputs with the PyTorch model's.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgeslim.core.errors import ExportError, ShapeError
from edgeslim.export.int8 import example_of, ir, lower, reference

VERIFY_SAMPLES = 32  # calibration inputs run through every check


def main_output(out: Any) -> Any:
    """The tensor a model returns: itself, a ``ModelOutput``'s logits, or a 1-tuple's item."""
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)) and len(out) == 1:
        return out[0]
    return out


def build_and_check_graph(
    model: Any,
    calib: Any,
    graph: ir.Graph | None,
    verify: bool,
    tolerance: float,
    example: Any = None,
) -> tuple[ir.Graph, np.ndarray]:
    """The integer graph of ``model`` and its int8 check inputs (from ``calib``).

    A model quantized by ``edgeslim.quantize_`` needs no ``calib``: it is checked on random
    int8 inputs of the shape of ``example`` (an input batch; needed when the model has no
    ``input_shape``). With ``verify`` the graph's dequantized outputs must be within
    ``tolerance`` (relative L2 error) of the PyTorch model's on the check inputs.
    """
    import torch

    from edgeslim.quant.modules import is_quantized

    quantized = is_quantized(model)
    if calib is None and not quantized:
        raise ShapeError(
            "exporting a float model needs calibration inputs: pass calib= a batch (N, ...) "
            "such as data.calib(128) (they set the int8 ranges and check the exported file), "
            "or quantize it first (edgeslim.quantize_)"
        )
    if calib is not None:
        example = torch.as_tensor(calib)
    elif example is not None:
        example = torch.as_tensor(example)
    example = example_of(model, example)
    if graph is None:
        graph = lower(model, example.float(), name=type(model).__name__)
    if calib is None:  # random int8 inputs of the quantized model
        rng = np.random.default_rng(0)
        q = rng.integers(-128, 128, (VERIFY_SAMPLES, *graph[graph.input].shape[1:]))
        sample = reference.dequantize(graph, graph.input, q).astype(np.float32)
        if sample.ndim == 4:
            sample = sample.transpose(0, 3, 1, 2)  # NHWC -> NCHW
        if example.dim() == 3:  # (N, C, 1, L) -> (N, C, L)
            sample = sample[:, :, 0]
        sample = torch.from_numpy(np.ascontiguousarray(sample))
    else:
        sample = torch.as_tensor(calib, dtype=torch.float32)[:VERIFY_SAMPLES]
    q = reference.quantize_input(graph, sample.numpy())
    if verify:
        got = reference.dequantize(graph, graph.output, reference.run_batch(graph, q))
        model.eval()
        with torch.no_grad():
            want = main_output(model(sample)).double().numpy().reshape(got.shape)
        err = float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-12))
        if not err <= tolerance:
            raise ExportError(
                f"the int8 graph's outputs differ from the PyTorch model's by {err:.3f} "
                f"(relative L2 error, tolerance {tolerance}); nothing was written. Check the "
                "calibration data, or quantize the model (PTQ/QAT) before exporting"
            )
    return graph, q
