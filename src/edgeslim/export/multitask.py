"""A multi-task model's heads exported together: one ONNX file, one output per task.

The shared trunk runs once in the graph (Caruana 1997, hard parameter sharing; see
:mod:`edgeslim.dynamic.multitask`). Every output is checked in ONNX Runtime against PyTorch.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgeslim.core.errors import ExportError
from edgeslim.dynamic.multitask import MultiHead
from edgeslim.export.onnx import export_onnx


class _AllHeads(nn.Module):
    def __init__(self, mh: MultiHead) -> None:
        super().__init__()
        self.mh = mh

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.mh.forward_all(x).values())


def export_heads(mh: MultiHead, path: str | os.PathLike, example: torch.Tensor) -> dict:
    """Write ``mh`` as one ONNX file whose outputs are the tasks' logits, in task order;
    returns ``{task: max |ORT - PyTorch|}``. Raises :class:`ExportError` on disagreement."""
    import onnxruntime as ort

    if not isinstance(mh, MultiHead):
        raise ExportError(f"export_heads needs a MultiHead (add_heads), got {type(mh)}")
    path = Path(path)
    wrapper = _AllHeads(mh).eval()
    export_onnx(wrapper, path, example, verify=False)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: example.numpy()})
    with torch.no_grad():
        ref = wrapper(example)
    if len(got) != len(ref):
        raise ExportError(f"{path}: {len(got)} outputs for {len(ref)} tasks")
    diffs = {}
    for task, g, r in zip(mh.tasks, got, ref, strict=True):
        diff = float(np.abs(g - r.numpy()).max())
        tol = 1e-4 + 1e-3 * float(r.abs().max())
        if diff > tol:
            raise ExportError(
                f"{path}: task {task!r} differs from PyTorch by {diff:.3g} > {tol:.3g}"
            )
        diffs[task] = diff
    return diffs
