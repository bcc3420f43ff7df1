"""ONNX export, fp32 or int8 QDQ, verified in ONNX Runtime before it counts as done.

    result = export_onnx(model, "m.onnx", example)          # raises ExportError on mismatch

How: ``torch.onnx.export(..., dynamo=True)`` (torch.export + onnxscript). A float model
exports as is. A model quantized by :mod:`edgeslim.quant` is switched to ``"export"`` mode,
in which every quantized tensor goes through ``quantized_decomposed`` quantize/dequantize
ops that the exporter writes as ONNX ``QuantizeLinear`` / ``DequantizeLinear``; weights are
int8 initializers feeding a per-channel ``DequantizeLinear``. That is the QDQ format ONNX
Runtime's graph optimizer fuses into integer kernels (``QLinearConv``, ``QLinearMatMul``,
``QGemm``, ``QLinearAdd``, ``QLinearGlobalAveragePool``, ``MatMulIntegerToFloat``, ...);
:func:`integer_ops` reads the optimized graph ORT writes to tell which ones it made.

Verification runs the file in ONNX Runtime on ``example`` and compares with PyTorch:

- fp32: ``max |ort - torch| <= 1e-4 + 1e-3 * max |torch|``;
- int8, against the model's exact integer simulation: the output is int8 with scale ``s``
  (graph mode) -> at most ``2 s`` apart (ONNX rounds ties to even where edgeslim rounds them
  away from zero, and ORT requantizes with a float multiplier, so a value may move by one
  step per layer, which later layers mostly absorb); float outputs (module mode, e.g.
  transformers) -> ``max |ort - torch| <= 0.05 * max |torch|``.

The file is written under a temporary name, verified, and only then renamed onto ``path``.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ExportError
from ..fileio import atomic_path

# the ONNX exporter builds its op table once: the quantized_decomposed ops must exist first
from ..quant import modules as _quant_modules  # noqa: F401

INTEGER_OPS = (
    "QLinearConv",
    "QLinearMatMul",
    "QGemm",
    "QLinearAdd",
    "QLinearGlobalAveragePool",
    "QLinearAveragePool",
    "MatMulInteger",
    "MatMulIntegerToFloat",
    "DynamicQuantizeMatMul",
    "ConvInteger",
)


@dataclass
class ExportResult:
    """What :func:`export_onnx` wrote and how well ONNX Runtime agrees with PyTorch."""

    path: Path
    size_bytes: int
    quantized: bool
    max_abs_diff: float | None = None
    tolerance: float | None = None
    integer_ops: dict[str, int] = field(default_factory=dict)


def _inputs(example: Any) -> tuple[torch.Tensor, ...]:
    if isinstance(example, torch.Tensor):
        return (example,)
    if isinstance(example, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in example):
        return tuple(example)
    raise ExportError(
        f"example must be a tensor or a tuple of tensors, got {type(example).__name__}"
    )


def _first_output(out: Any) -> torch.Tensor:
    while isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise ExportError(f"the model's first output must be a tensor, got {type(out).__name__}")
    return out


@contextmanager
def _export_mode(model: nn.Module, quantized: bool):
    from ..quant.modules import QuantModule, set_mode

    modes = {m: m.mode for m in model.modules() if isinstance(m, QuantModule)}
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    if quantized:
        set_mode(model, "export")
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.mode = mode
        for m, training in flags:
            m.training = training


def _reference_mode(model: nn.Module) -> None:
    """Quantized models are compared in their exact integer simulation."""
    from ..quant.modules import set_mode

    set_mode(model, "exact")


def _output_step(model: nn.Module) -> float | None:
    """The scale of the model's final int8 output, if its last op is an activation quantizer."""
    from ..quant.modules import ActQuant

    if not isinstance(model, torch.fx.GraphModule):
        return None
    out = next(n for n in model.graph.nodes if n.op == "output")
    arg = out.args[0]
    while isinstance(arg, (tuple, list)):
        arg = arg[0]
    if isinstance(arg, torch.fx.Node) and arg.op == "call_module":
        mod = model.get_submodule(arg.target)
        if isinstance(mod, ActQuant):
            return float(mod.qparams().scale[0])
    return None


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    example: Any,
    *,
    verify: bool = True,
    dynamic_batch: bool = True,
    input_names: list[str] | None = None,
) -> ExportResult:
    """Write ``model`` as ONNX to ``path``; with ``verify``, check it in ONNX Runtime first.

    ``example`` is an input batch (a tensor or a tuple of tensors). A model quantized by
    ``edgeslim.quant`` becomes an int8 QDQ graph. Raises :class:`ExportError` when export
    fails or ORT's output is further from PyTorch's than the tolerance (module docstring);
    then nothing is written at ``path``.
    """
    from ..quant.modules import is_quantized

    inputs = _inputs(example)
    quantized = is_quantized(model)
    path = Path(path)
    names = input_names or [f"input_{i}" if i else "input" for i in range(len(inputs))]
    dyn = tuple({0: torch.export.Dim("batch", min=1)} for _ in inputs) if dynamic_batch else None
    with atomic_path(path) as tmp:
        with _export_mode(model, quantized), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                program = torch.onnx.export(
                    model,
                    inputs,
                    dynamo=True,
                    dynamic_shapes=dyn,
                    input_names=names,
                    verbose=False,
                    report=False,
                )
            except Exception as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                raise ExportError(
                    f"torch.onnx.export failed for {type(model).__name__}: "
                    f"{type(exc).__name__}: {first}"
                ) from exc
            program.save(str(tmp))
        _strip_debug_info(tmp)
        result = ExportResult(path, tmp.stat().st_size, quantized)
        if verify:
            _verify(model, tmp, inputs, names, quantized, result)
            result.integer_ops = integer_ops(tmp) if quantized else {}
    return result


def _strip_debug_info(path: Path) -> None:
    """Drop the exporter's per-node debug metadata (stack traces, FX node text): it can be
    half of a small model's file and no runtime reads it."""
    import onnx

    model = onnx.load(str(path))
    for node in model.graph.node:
        del node.metadata_props[:]
    for info in model.graph.value_info:
        del info.metadata_props[:]
    onnx.save(model, str(path))


def _session(path: Path, optimized: Path | None = None, threads: int = 1):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    if optimized is not None:
        so.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _verify(
    model: nn.Module,
    onnx_path: Path,
    inputs: tuple[torch.Tensor, ...],
    names: list[str],
    quantized: bool,
    result: ExportResult,
) -> None:
    from ..quant.modules import QuantModule

    modes = {m: m.mode for m in model.modules() if isinstance(m, QuantModule)}
    try:
        if quantized:
            _reference_mode(model)
        with torch.no_grad():
            ref = _first_output(model(*inputs)).float().numpy()
    finally:
        for m, mode in modes.items():
            m.mode = mode
    try:
        sess = _session(onnx_path)
        feeds = {n: t.numpy() for n, t in zip(names, inputs, strict=True)}
        got = sess.run(None, feeds)[0]
    except Exception as exc:
        raise ExportError(f"ONNX Runtime cannot run the exported {onnx_path.name}: {exc}") from exc
    if got.shape != ref.shape:
        raise ExportError(f"ONNX output shape {got.shape} differs from PyTorch's {ref.shape}")
    diff = float(np.max(np.abs(got - ref))) if ref.size else 0.0
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    if not quantized:
        tol = 1e-4 + 1e-3 * scale
    else:
        step = _output_step(model)
        tol = 2.0 * step + 1e-6 if step is not None else 0.05 * scale + 1e-6
    result.max_abs_diff, result.tolerance = diff, tol
    if not np.isfinite(diff) or diff > tol:
        kind = "int8" if quantized else "fp32"
        raise ExportError(
            f"{kind} ONNX export of {type(model).__name__} disagrees with PyTorch: "
            f"max |ort - torch| = {diff:.3g} > tolerance {tol:.3g}; the file was not written"
        )


def integer_ops(path: str | os.PathLike) -> dict[str, int]:
    """Counts of integer kernels in the graph ONNX Runtime optimizes ``path`` into."""
    import tempfile

    import onnx

    with tempfile.TemporaryDirectory() as d:
        opt = Path(d) / "optimized.onnx"
        _session(Path(path), optimized=opt)
        graph = onnx.load(str(opt)).graph
    counts = Counter(n.op_type for n in graph.node)
    return {op: counts[op] for op in INTEGER_OPS if counts[op]}
