"""float32 ``.tflite``: the float model as TFLite builtin ops, run in LiteRT before it counts.

    export_tflite(model, "m.tflite", example=x, dtype="float32")

The model goes through the same front end as the int8 graph (:mod:`edgeslim.export.int8`:
``torch.fx`` trace, BatchNorm folded, ReLU / ReLU6 and zero padding fused, NCHW -> NHWC),
then :class:`_FloatBuilder` keeps float32 weights and biases instead of quantizing them and
:func:`edgeslim.export.tflite_format.serialize` writes float32 tensors without quantization
parameters: CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED, ADD, MUL, MAX / AVERAGE_POOL_2D,
RESHAPE, CONCATENATION, SOFTMAX, LOGISTIC, HARD_SWISH, PAD / PADV2. The layers it takes are
the int8 path's (:data:`edgeslim.export.int8.trace.SUPPORTED`); any other layer is a
:class:`LoweringError` naming it.

Why our own writer and not a converter: ``litert-torch`` (formerly ``ai-edge-torch``) runs
beside torch 2.13, but its ``litert-converter`` pins ``xdsl==0.28.0``, which pins
``typing-extensions<4.13``, so installing it downgrades pydantic (an edgeslim dependency)
and typing-extensions, and it brings ~750 MB (jax, jaxlib, torchao, litert-converter).

Verification (``verify=True``): the file runs in LiteRT (and in TFLite Micro where
``runtime`` asks for it) on the check inputs, and its outputs must agree with PyTorch's by
the ONNX export's fp32 rule: ``max |runtime - torch| <= 1e-4 + 1e-3 * max |torch|``.
Nothing is written when a check fails.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgeslim.core.errors import ExportError, LoweringError, ShapeError
from edgeslim.core.fileio import atomic_write_bytes
from edgeslim.export.int8 import build, example_of, fuse, ir, trace
from edgeslim.export.int8.lower_seq import SEQ_KINDS
from edgeslim.export.tflite_format import serialize

FLOAT_OPS = (
    ir.Conv2D,
    ir.FullyConnected,
    ir.Add,
    ir.Pool2D,
    ir.Reshape,
    ir.Concat,
    ir.Softmax,
    ir.Logistic,
    ir.HardSwish,
    ir.Mul,
)
CHECK_SAMPLES = 32  # inputs the written file is run on


class _NoQParams:
    """The float graph has no quantization: every activation's qparams are None."""

    def activation(self, value: str) -> None:
        return None

    def weight(self, op: Any, weight: np.ndarray, axis: int | None) -> None:
        return None


class _FloatBuilder(build._Builder):
    """The int8 builder's lowering (layouts, shapes, op choice) with float32 tensors."""

    def __init__(self) -> None:
        super().__init__(_NoQParams(), per_channel_fc=False)

    def act(self, name: str, shape: tuple[int, ...], qp: Any) -> str:
        name = self._unique(name)
        self.tensors[name] = ir.Tensor(name, tuple(shape), "float32", None, None)
        return name

    def same_qparams_as(self, name: str, src: str, shape: tuple[int, ...]) -> str:
        return self.act(name, shape, None)

    def _float_const(self, name: str, data: np.ndarray) -> str:
        name = self._unique(name)
        data = np.ascontiguousarray(data, np.float32)
        self.tensors[name] = ir.Tensor(name, tuple(data.shape), "float32", None, None, data)
        return name

    def _weights(self, o: trace.FloatOp, layout, axis: int | None, x: build._Value):
        if "weight_int" in o.attrs:  # unreachable: quantized models are refused up front
            raise LoweringError(f"{o.name}: a quantized layer has no float32 .tflite form")
        weight = self._float_const(f"{o.name}.weight", layout(o.attrs["weight"]))
        bias = self._float_const(f"{o.name}.bias", o.attrs["bias"])
        return weight, bias

    def _layer_input(self, o: trace.FloatOp) -> build._Value:
        return self._input(o)

    def _lower_quant(self, o: trace.FloatOp) -> None:
        self.values[o.value] = self._input(o)

    def _lower_cat(self, o: trace.FloatOp) -> None:
        xs = [self._input(o, i).tensor for i in range(len(o.inputs))]
        rank = len(o.shape)
        axis = {4: (0, 3, 1, 2), 2: (0, 1)}[rank][o.attrs["dim"] % rank]  # NCHW -> NHWC
        out = self.act(o.value, build._nhwc(o.shape), None)
        self.ops.append(ir.Concat(o.name, xs, out, axis=axis))
        self._output(o, out)

    def _logistic(self, o: trace.FloatOp, x: str) -> str:
        out = self.act(f"{o.value}_sigmoid", self.tensors[x].shape, None)
        self.ops.append(ir.Logistic(o.name, [x], out))
        return out

    def _lower_sigmoid(self, o: trace.FloatOp) -> None:
        self._output(o, self._logistic(o, self._input(o).tensor))

    def seq_dispatch(self, o: trace.FloatOp) -> bool:
        """The transformer ops (:mod:`.int8.lower_seq`) have no float32 form here yet."""
        ins = [self.values[n] for n in o.inputs if n in self.values]
        if o.kind in SEQ_KINDS or any(v.perm is not None or v.factor != 1.0 for v in ins):
            raise LoweringError(f"{o.kind} ({o.name!r}) has no float32 .tflite form yet")
        return False


def lower_float(model: nn.Module, example: torch.Tensor, *, name: str = "model") -> ir.Graph:
    """The float32 graph of ``model`` (NHWC tensors, float32 weights, no quantization).

    Raises :class:`LoweringError` naming every layer the graph cannot express.
    """
    from edgeslim.quant.modules import is_quantized

    if is_quantized(model):
        raise ExportError(
            f"{type(model).__name__} is quantized: a float32 .tflite needs the float model "
            "(export the quantized one with dtype='int8')"
        )
    if not isinstance(example, torch.Tensor) or example.dim() < 2 or example.shape[0] == 0:
        raise ShapeError("example must be a non-empty batch of inputs (N, ...)")
    try:
        gm = trace.trace(model, example.float())
        ops, input_value, output_value = trace.float_ops(gm)
        ops = fuse.fuse(ops)
    except LoweringError as exc:  # the float32 file takes the int8 graph's layers
        raise LoweringError(f"float32 .tflite of {type(model).__name__}: {exc}") from exc
    b = _FloatBuilder()
    input_shape = (1, *example.shape[1:])
    b.values[input_value] = build._Value(
        b.act("input", build._nhwc(input_shape), None), input_shape
    )
    for o in ops:
        b.lower(o)
    out = b.values[output_value].tensor
    graph = ir.Graph(b.tensors, b.ops, input=b.values[input_value].tensor, output=out, name=name)
    for op in graph.ops:
        if not isinstance(op, FLOAT_OPS):
            raise LoweringError(f"{op.kind} ({op.name!r}) has no float32 .tflite form yet")
    return graph


# --------------------------------------------------------------------------------------
# running the file
# --------------------------------------------------------------------------------------


def to_nhwc(x: np.ndarray) -> np.ndarray:
    """A PyTorch input batch in the file's layout: (N, C, H, W) -> (N, H, W, C), (N, C, L) ->
    (N, 1, L, C); (N, F) as it is."""
    x = np.asarray(x, np.float32)
    if x.ndim == 4:
        x = x.transpose(0, 2, 3, 1)
    elif x.ndim == 3:
        x = x.transpose(0, 2, 1)[:, None]
    return np.ascontiguousarray(x)


def from_nhwc(y: np.ndarray, torch_shape: tuple[int, ...]) -> np.ndarray:
    """The file's output in PyTorch's layout (the inverse of :func:`to_nhwc`)."""
    if len(torch_shape) == 4:
        return y.transpose(0, 3, 1, 2)
    if len(torch_shape) == 3:
        return y[:, 0].transpose(0, 2, 1)
    return y


def run_litert_float(data: bytes, x: np.ndarray, *, threads: int = 1, interp=None) -> np.ndarray:
    """Run float32 ``.tflite`` bytes in LiteRT on NHWC inputs ``x`` as one batch."""
    from edgeslim.export.tflite import litert_interpreter

    interp = interp or litert_interpreter(data, threads=threads)
    inp = interp.get_input_details()[0]
    x = np.ascontiguousarray(x, np.float32)
    if tuple(inp["shape"]) != x.shape:
        try:
            interp.resize_tensor_input(inp["index"], list(x.shape))
            interp.allocate_tensors()
        except (RuntimeError, ValueError) as exc:
            raise ExportError(f"LiteRT cannot run a batch of shape {x.shape}: {exc}") from exc
    interp.set_tensor(inp["index"], x)
    interp.invoke()
    return np.asarray(interp.get_tensor(interp.get_output_details()[0]["index"])).copy()


def run_tflm_float(data: bytes, x: np.ndarray) -> np.ndarray:
    """Run float32 ``.tflite`` bytes in TFLite Micro, one NHWC input at a time."""
    from edgeslim.export.tflite import tflm_interpreter

    interp = tflm_interpreter(data)
    outputs = []
    for row in np.asarray(x, np.float32):
        interp.set_input(row[None], 0)
        interp.invoke()
        outputs.append(np.asarray(interp.get_output(0), np.float32).copy())
    return np.concatenate(outputs)


def fp32_tolerance(ref: np.ndarray) -> float:
    """The fp32 rule of every edgeslim exporter: ``1e-4 + 1e-3 * max |torch|``."""
    return 1e-4 + 1e-3 * (float(np.max(np.abs(ref))) if ref.size else 0.0)


def check_float(got: np.ndarray, want: np.ndarray, runtime: str) -> float:
    """Raise :class:`ExportError` unless ``got`` is within :func:`fp32_tolerance` of
    PyTorch's ``want``; return max |got - want|."""
    if got.shape != want.shape:
        raise ExportError(
            f"{runtime}'s output shape {got.shape} differs from PyTorch's {want.shape}; "
            "the .tflite file was not written"
        )
    diff = float(np.max(np.abs(got - want))) if want.size else 0.0
    tol = fp32_tolerance(want)
    if not diff <= tol:
        raise ExportError(
            f"float32 .tflite in {runtime} disagrees with PyTorch: max |{runtime} - torch| = "
            f"{diff:.3g} > tolerance {tol:.3g}; the .tflite file was not written"
        )
    return diff


def export_tflite_float(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    calib: Any = None,
    example: Any = None,
    verify: bool = True,
    runtime: str = "auto",
) -> Path:
    """Write ``model`` as a float32 ``.tflite`` file at ``path`` (see the module docstring).

    The inputs: ``calib`` (a batch; its first :data:`CHECK_SAMPLES` are the check inputs), or
    ``example`` (a batch), or the model's ``input_shape`` (then seeded random inputs).
    ``runtime``: ``"auto"`` / ``"litert"`` run the file in LiteRT, ``"tflm"`` in TFLite
    Micro, ``"all"`` in both; a runtime that is not installed is an :class:`ExportError`
    (pass ``verify=False`` to write an unchecked file).
    """
    from edgeslim.export.int8.check import main_output
    from edgeslim.export.tflite import RUNTIMES

    if runtime not in RUNTIMES:
        raise ExportError(f"runtime must be one of {', '.join(RUNTIMES)}; got {runtime!r}")
    given = calib if calib is not None else example
    if isinstance(given, (tuple, list)) or isinstance(example_of(model, given), tuple):
        raise ExportError(
            "a float32 .tflite is written for a model with one input; export a model with "
            "several inputs with dtype='int8'"
        )
    sample = example_of(model, None if given is None else torch.as_tensor(given).float())
    if given is None:  # only an input_shape: seeded random inputs of that shape
        gen = torch.Generator().manual_seed(0)
        sample = torch.randn((CHECK_SAMPLES, *sample.shape[1:]), generator=gen)
    sample = sample[:CHECK_SAMPLES]
    graph = lower_float(model, sample, name=type(model).__name__)
    data = serialize(graph)
    if verify:
        model.eval()
        with torch.no_grad():
            want = main_output(model(sample)).float().numpy()
        x = to_nhwc(sample.numpy())
        if runtime in ("auto", "litert", "all"):
            got = from_nhwc(run_litert_float(data, x), want.shape)
            check_float(got, want, "LiteRT")
        if runtime in ("tflm", "all"):
            got = from_nhwc(run_tflm_float(data, x), want.shape)
            check_float(got, want, "TFLite Micro")
    return atomic_write_bytes(path, data)
