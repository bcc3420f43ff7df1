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
from edgeslim.export.int8.trace import as_inputs

VERIFY_SAMPLES = 32  # calibration inputs run through every check


def main_output(out: Any) -> Any:
    """The tensor a model returns: itself, a ``ModelOutput``'s logits, or a 1-tuple's item."""
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)) and len(out) == 1:
        return out[0]
    return out


def model_outputs(out: Any) -> list[Any]:
    """Every tensor a model returns, in the order the int8 graph's outputs have: a tensor,
    the items of a tuple or list, a dict's values, a ``ModelOutput``'s logits."""
    if hasattr(out, "logits"):
        return [out.logits]
    if isinstance(out, dict):
        return [out["logits"]] if "logits" in out else list(out.values())
    if isinstance(out, (tuple, list)):
        return list(out)
    return [out]


def build_and_check_graph(
    model: Any,
    calib: Any,
    graph: ir.Graph | None,
    verify: bool,
    tolerance: float,
    example: Any = None,
) -> tuple[ir.Graph, Any]:
    """The integer graph of ``model`` and its int8 check inputs (from ``calib``).

    ``calib`` / ``example`` are a batch ``(N, ...)``, or for a model with several inputs a
    tuple of batches (one per input); the check inputs are then a tuple of int8 arrays too.
    A model quantized by ``edgeslim.quantize_`` needs no ``calib``: it is checked on random
    int8 inputs of the shape of ``example`` (an input batch; needed when the model has no
    ``input_shape``). With ``verify`` each of the graph's dequantized outputs must be within
    ``tolerance`` (relative L2 error) of the PyTorch model's on the check inputs.
    """
    import torch

    from edgeslim.quant.modules import is_quantized

    quantized = is_quantized(model)
    if calib is None and not quantized:
        raise ShapeError(
            "exporting a float model needs calibration inputs: pass calib= a batch (N, ...) "
            "such as data.calib(128) (they set the int8 ranges and check the exported file), "
            "a tuple of batches for a model with several inputs, or quantize it first "
            "(edgeslim.quantize_)"
        )
    given = calib if calib is not None else example
    if given is not None:
        given = tuple(torch.as_tensor(x) for x in as_inputs(given))
    xs = as_inputs(example_of(model, given))
    if graph is None:
        graph = lower(model, _one_or_tuple(tuple(x.float() for x in xs)), name=type(model).__name__)
    if len(xs) != len(graph.inputs):
        raise ShapeError(
            f"{graph.name} has {len(graph.inputs)} inputs; calib / example give {len(xs)}"
        )
    if calib is None:  # random int8 inputs of the quantized model
        rng = np.random.default_rng(0)
        samples = []
        for name, x in zip(graph.inputs, xs, strict=True):
            q = rng.integers(-128, 128, (VERIFY_SAMPLES, *graph[name].shape[1:]))
            sample = reference.dequantize(graph, name, q).astype(np.float32)
            if sample.ndim == 4:
                sample = sample.transpose(0, 3, 1, 2)  # NHWC -> NCHW
            if x.dim() == 3:  # (N, C, 1, L) -> (N, C, L)
                sample = sample[:, :, 0]
            samples.append(torch.from_numpy(np.ascontiguousarray(sample)))
    else:
        samples = [x.to(torch.float32)[:VERIFY_SAMPLES] for x in xs]
    q = reference.quantize_input(graph, _one_or_tuple(tuple(s.numpy() for s in samples)))
    if verify:
        gots = reference.run_outputs(graph, q)
        model.eval()
        with torch.no_grad():
            wants = model_outputs(model(*samples))
        if len(wants) != len(gots):
            raise ExportError(
                f"{graph.name} returns {len(wants)} tensors, the int8 graph has {len(gots)} "
                "outputs; nothing was written"
            )
        for k, (name, got, want) in enumerate(zip(graph.outputs, gots, wants, strict=True)):
            got = reference.dequantize(graph, name, got)
            want = want.double().numpy().reshape(got.shape)
            err = float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-12))
            if not err <= tolerance:
                which = f"output {k}" if len(gots) > 1 else "outputs"
                raise ExportError(
                    f"the int8 graph's {which} differ from the PyTorch model's by {err:.3f} "
                    f"(relative L2 error, tolerance {tolerance}); nothing was written. Check "
                    "the calibration data, or quantize the model (PTQ/QAT) before exporting"
                )
    return graph, q


def _one_or_tuple(xs: tuple) -> Any:
    return xs[0] if len(xs) == 1 else xs
