"""ExecuTorch export: an fp32 ``.pte`` with the XNNPACK delegate, verified in ExecuTorch's
runtime before it counts as done.

    result = export_executorch(model, "m.pte", example)   # raises ExportError on mismatch

How: ``torch.export.export`` at the example's shape (the program's input shape is fixed:
export one program per batch size), ``executorch.exir.to_edge_transform_and_lower`` with the
``XnnpackPartitioner`` (every subgraph XNNPACK supports becomes a delegate call),
``to_executorch()``, and the program's bytes. Verification loads the written bytes with
``executorch.runtime.Runtime`` (the prebuilt runtime of the ``executorch`` wheel: core ATen
kernels + XNNPACK), runs ``example`` and judges the output with the fp32 rule of the ONNX
export (``max |pte - torch| <= 1e-4 + 1e-3 * max |torch|``,
:func:`edgeslim.export.onnx.check_agreement`).

Only float models: a model quantized by :mod:`edgeslim.quant` is refused with an
:class:`ExportError`. (Its export-mode graph, lowered the same way, leaves the first
convolution's per-channel dequantize outside XNNPACK and has no portable kernel for it;
ExecuTorch's own int8 route is PT2E with its ``XNNPACKQuantizer``.)

``executorch`` 1.5 declares no torch requirement and runs beside torch 2.13 (measured), but
pulls in about 17 packages (torchao, coremltools, hydra-core, ...), so it is the optional
extra ``edgeslim[executorch]`` and not part of ``dev``.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgeslim.core.errors import ExportError
from edgeslim.core.fileio import atomic_path
from edgeslim.export.onnx import (
    ExportResult,
    _inputs,
    _quiet_exporter,
    check_agreement,
    reference_outputs,
)

INSTALL_HINT = "pip install executorch (or pip install 'edgeslim[executorch]')"


def executorch_available() -> bool:
    """Whether the ``executorch`` package can be imported."""
    import importlib.util

    return importlib.util.find_spec("executorch") is not None


def _lowering():
    try:
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower
    except ImportError as exc:
        raise ExportError(f"ExecuTorch is not installed: {INSTALL_HINT}") from exc
    return to_edge_transform_and_lower, XnnpackPartitioner


def load_pte(path: str | os.PathLike, *, threads: int | None = None):
    """The ``forward`` method of the ``.pte`` at ``path``, loaded in ExecuTorch's runtime;
    ``threads`` resets the runtime's (process-wide) XNNPACK thread pool."""
    try:
        from executorch.runtime import Runtime
    except ImportError as exc:
        raise ExportError(f"ExecuTorch is not installed: {INSTALL_HINT}") from exc
    if threads is not None:
        from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

        _unsafe_reset_threadpool(int(threads))
    program = Runtime.get().load_program(Path(path))
    return program.load_method("forward")


def export_executorch(
    model: nn.Module,
    path: str | os.PathLike,
    example: Any,
    *,
    verify: bool = True,
    threads: int | None = None,
) -> ExportResult:
    """Write float ``model`` as an ExecuTorch program (``.pte``, XNNPACK delegate) to ``path``.

    ``example`` is an input batch (a tensor or a tuple of tensors); the program takes inputs
    of exactly that shape. With ``verify`` the
    written program runs in ExecuTorch's runtime (``threads`` XNNPACK threads) and must agree
    with PyTorch (module docstring). Raises :class:`ExportError` for a quantized model, when
    ExecuTorch is missing, lowering fails or the outputs disagree; then nothing is written
    at ``path``.
    """
    from edgeslim.quant.modules import is_quantized

    inputs = _inputs(example)
    if is_quantized(model):
        raise ExportError(
            f"{type(model).__name__} is quantized: ExecuTorch export takes float models only "
            "(export the int8 model with export_onnx, export_openvino or export_tflite)"
        )
    lower, partitioner = _lowering()
    path = Path(path)
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with warnings.catch_warnings(), _quiet_exporter():
            warnings.simplefilter("ignore")
            program = torch.export.export(model, inputs)
            data = lower(program, partitioner=[partitioner()]).to_executorch().buffer
    except ExportError:
        raise
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ExportError(
            f"ExecuTorch could not lower {type(model).__name__}: {type(exc).__name__}: {first}"
        ) from exc
    finally:
        for m, training in flags:
            m.training = training
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
        result = ExportResult(path, len(data), False)
        if verify:
            ref, _ = reference_outputs(model, inputs, False)
            try:
                got = load_pte(tmp, threads=threads).execute(list(inputs))[0]
            except Exception as exc:
                raise ExportError(f"ExecuTorch cannot run the written {path.name}: {exc}") from exc
            check_agreement(
                model, got.detach().numpy(), ref, None, result, runtime="ExecuTorch", short="pte"
            )
    return result
