"""OpenVINO IR export (``.xml`` + ``.bin``), fp32 or int8, verified in OpenVINO Runtime.

    result = export_openvino(model, "m.xml", example)     # raises ExportError on mismatch

How: the model is first written as ONNX by :func:`edgeslim.export.onnx.export_onnx` (a float
model as is, a model quantized by :mod:`edgeslim.quant` as its int8 QDQ graph), then
``openvino.convert_model`` reads that file and ``openvino.save_model`` writes the IR with
``compress_to_fp16=False`` (the default would halve float weights to fp16). OpenVINO's
low-precision transformations turn the QDQ pairs of an int8 model into int8 convolutions
and matrix multiplications; the ``.bin`` then holds int8 weights.
:attr:`OpenVINOResult.integer_ops` counts the layers OpenVINO's CPU plugin runs in int8.

Verification compiles the written IR for the CPU with ``INFERENCE_PRECISION_HINT=f32``
(on CPUs with bf16 units OpenVINO would otherwise run float layers in bf16), runs it on
``example`` and judges the output with exactly the rules of the ONNX export
(:func:`edgeslim.export.onnx.check_agreement`): fp32 within ``1e-4 + 1e-3 * max|torch|``;
int8 within two output steps of the integer simulation, or a relative L2 error at most
``max(0.02, e_q)``.

Both files are written in a temporary directory next to ``path`` and moved into place only
after the check passes, the ``.bin`` first and then the ``.xml`` that names it; on any
failure neither file at the destination is touched.

Needs ``pip install 'edgeslim[openvino]'``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from edgeslim.core.errors import ExportError
from edgeslim.export.onnx import (
    ExportResult,
    _inputs,
    check_agreement,
    export_onnx,
    reference_outputs,
)

# runtime layers that only move or relabel data, not counted as integer kernels
_DATA_MOVES = ("Reorder", "Reshape", "Input", "Output", "Const", "Transpose")
INSTALL_HINT = "pip install openvino (or pip install 'edgeslim[openvino]')"


@dataclass
class OpenVINOResult(ExportResult):
    """What :func:`export_openvino` wrote (``path`` is the ``.xml``) and how well OpenVINO
    Runtime agrees with PyTorch; ``size_bytes`` counts both files."""

    bin_path: Path | None = None


def openvino_available() -> bool:
    """Whether the ``openvino`` package can be imported."""
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def _openvino():
    try:
        import openvino
    except ImportError as exc:
        raise ExportError(f"OpenVINO is not installed: {INSTALL_HINT}") from exc
    return openvino


def compile_ir(xml: str | os.PathLike, *, threads: int = 1, precision: str = "f32"):
    """An OpenVINO ``CompiledModel`` of the IR at ``xml`` on the CPU, with ``threads``
    inference threads and float layers in ``precision`` (``"f32"`` unless asked)."""
    ov = _openvino()
    config = {"INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": int(threads)}
    return ov.Core().compile_model(str(xml), "CPU", config)


def run_ir(compiled, inputs: tuple) -> np.ndarray:
    """The first output of a compiled IR on ``inputs`` (tensors or arrays), as numpy."""
    arrays = [np.asarray(getattr(t, "numpy", lambda t=t: t)()) for t in inputs]
    request = compiled.create_infer_request()
    request.infer(arrays)
    return np.array(request.get_output_tensor(0).data, copy=True)


def integer_ops(compiled) -> dict[str, int]:
    """Counts, by layer type, of the compute layers the CPU plugin of ``compiled`` runs in
    int8/uint8 (data moves such as reorders and reshapes left out)."""
    counts: Counter[str] = Counter()
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        if "runtimePrecision" not in info or "layerType" not in info:
            continue
        precision, kind = info["runtimePrecision"].astype(str), info["layerType"].astype(str)
        if precision.lower() in ("i8", "u8") and kind not in _DATA_MOVES:
            counts[kind] += 1
    return dict(sorted(counts.items()))


def export_openvino(
    model: nn.Module,
    path: str | os.PathLike,
    example: Any,
    *,
    verify: bool = True,
    dynamic_batch: bool = True,
    threads: int = 1,
) -> OpenVINOResult:
    """Write ``model`` as OpenVINO IR (``path`` = the ``.xml``, its ``.bin`` beside it).

    ``example`` is an input batch (a tensor or a tuple of tensors). A model quantized by
    ``edgeslim.quant`` becomes an int8 IR (from its QDQ ONNX graph). With ``verify`` the IR
    runs in OpenVINO Runtime on the CPU (``threads`` threads) and must agree with PyTorch
    (module docstring). Raises :class:`ExportError` when OpenVINO is missing, conversion
    fails or the outputs disagree; then nothing is written at ``path``.
    """
    ov = _openvino()
    path = Path(path)
    if path.suffix != ".xml":
        raise ExportError(f"an OpenVINO IR path must end in .xml, got {str(path)!r}")
    inputs = _inputs(example)
    bin_path = path.with_suffix(".bin")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        onnx_res = export_onnx(
            model, tmp_dir / "model.onnx", inputs, verify=False, dynamic_batch=dynamic_batch
        )
        tmp_xml = tmp_dir / path.name
        try:
            converted = ov.convert_model(str(onnx_res.path))
            ov.save_model(converted, str(tmp_xml), compress_to_fp16=False)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise ExportError(
                f"OpenVINO could not convert {type(model).__name__}: {type(exc).__name__}: {first}"
            ) from exc
        tmp_bin = tmp_xml.with_suffix(".bin")
        size = tmp_xml.stat().st_size + tmp_bin.stat().st_size
        result = OpenVINOResult(path, size, onnx_res.quantized, bin_path=bin_path)
        if verify:
            ref, ref_float = reference_outputs(model, inputs, onnx_res.quantized)
            try:
                compiled = compile_ir(tmp_xml, threads=threads)
                got = run_ir(compiled, inputs)
            except Exception as exc:
                raise ExportError(
                    f"OpenVINO Runtime cannot run the IR of {path.name}: {exc}"
                ) from exc
            check_agreement(
                model, got, ref, ref_float, result, runtime="OpenVINO", short="openvino"
            )
            result.integer_ops = integer_ops(compiled) if onnx_res.quantized else {}
        os.replace(tmp_bin, bin_path)  # the .bin first: the .xml names it
        os.replace(tmp_xml, path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return result
