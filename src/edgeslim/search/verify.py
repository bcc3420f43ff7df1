"""The search's answer written for its target and measured from what was written: an ONNX
file timed in ONNX Runtime, or the C export's own SRAM / flash / latency numbers."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch


def export_answer(result: Any, tgt: Any, example, calib, out: Path) -> dict[str, str]:
    """The chosen model written for the target, measured from what was written."""
    files: dict[str, str] = {}
    model = result.model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if tgt.kind == "runtime":
            from edgeslim.export.onnx import export_onnx

            path = out / "model.onnx"
            export_onnx(model, path, example)
            files["onnx"] = str(path)
            result.measured["file_kb"] = path.stat().st_size / 1024
            if tgt.name == "ort":
                result.measured["file_latency_ms"] = ort_file_ms(path, example)
        else:
            measured = tgt.measure(model, example, calib, out=out / "c")
            result.measured.update(measured)
            files["c"] = str(out / "c")
    return files


def ort_file_ms(path: Path, example: torch.Tensor, repeats: int = 200) -> float:
    """Median ms of the written ONNX file in ONNX Runtime (one thread)."""
    import onnxruntime as ort

    from edgeslim.core.timing import median_ms

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    feed = {name: example[:1].numpy()}
    return min(median_ms(lambda: session.run(None, feed), repeats, 10) for _ in range(2))
