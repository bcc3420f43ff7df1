"""Early-exit networks in ONNX: one file per stage between enabled exits, plus a tiny runner.

The data-dependent part of BranchyNet-style inference (Teerapittayanon et al., ICPR 2016)
-- stop when an exit is confident -- stays outside the graphs, in a 60-line runner that only
needs numpy and onnxruntime::

    export_exits(model, "out/", example)         # out/exit-0.onnx ... exits.json runner.py
    python out/runner.py out/ frames.npy          # or: load_runner("out/").run(x)

Each ``exit-k.onnx`` runs the segments since the previous enabled exit and, except for the
last file, that exit's head; it returns ``features`` (what the next file reads), ``logits``
and ``score`` (the exit's confidence: max softmax probability, or minus the entropy, the
same as :func:`edgeslim.dynamic.exits.confidence`). The runner goes file by file; samples
whose score reaches the exit's threshold (``exits.json``) leave the batch. Exits whose
threshold is unset are merged away (their head is not exported, so it costs nothing).

:func:`export_exits` checks the runner on ``example`` against the PyTorch model's
early-exit inference -- same exit for every sample, logits within the fp32 tolerance --
before anything counts as written.
"""

from __future__ import annotations

import json
import math
import os
import runpy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgeslim.core.errors import ExportError
from edgeslim.dynamic.exits import ExitModel, confidence
from edgeslim.export.onnx import export_onnx

RUNNER_SOURCE = '''"""Early-exit runner for the ONNX files beside it (written by edgeslim).

    python runner.py DIR INPUT.npy     # prints the class and the exit of each sample
"""
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort


class ExitRunner:
    """Runs exit-0.onnx, exit-1.onnx ... until every sample has left through an exit."""

    def __init__(self, directory, threads=1):
        directory = Path(directory)
        self.manifest = json.loads((directory / "exits.json").read_text())
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        self.sessions = [
            ort.InferenceSession(str(directory / f), opts, providers=["CPUExecutionProvider"])
            for f in self.manifest["files"]
        ]
        self.thresholds = self.manifest["score_thresholds"]
        self.exits = self.manifest["exit_index"]

    def run(self, x):
        """(logits (B, classes), exit index (B,)) for a float32 batch x."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        b = x.shape[0]
        out, taken = None, np.full(b, self.exits[-1], dtype=np.int64)
        idx, h = np.arange(b), x
        last = len(self.sessions) - 1
        for k, sess in enumerate(self.sessions):
            if k == last:
                logits = sess.run(None, {"input": h})[0]
                if out is None:
                    out = np.empty((b,) + logits.shape[1:], np.float32)
                out[idx] = logits
                break
            h, logits, score = sess.run(None, {"input": h})
            if out is None:
                out = np.empty((b,) + logits.shape[1:], np.float32)
            done = score >= self.thresholds[k]
            if done.any():
                out[idx[done]] = logits[done]
                taken[idx[done]] = self.exits[k]
                keep = ~done
                idx, h = idx[keep], np.ascontiguousarray(h[keep])
                if idx.size == 0:
                    break
        return out, taken


if __name__ == "__main__":
    runner = ExitRunner(sys.argv[1])
    logits, taken = runner.run(np.load(sys.argv[2]))
    for cls, ex in zip(logits.argmax(1), taken):
        print(int(cls), int(ex))
'''


class _Part(nn.Module):
    """Segments ``lo..hi`` and (unless last) exit ``hi``'s head, its confidence."""

    def __init__(self, model: ExitModel, lo: int, hi: int, last: bool) -> None:
        super().__init__()
        self.segments = nn.ModuleList(model.segments[lo : hi + 1])
        self.head = None if last else model.heads[hi]
        self.criterion = model.criterion

    def forward(self, x: torch.Tensor) -> Any:
        for segment in self.segments:
            x = segment(x)
        if self.head is None:
            return x
        logits = self.head(x)
        return x, logits, confidence(logits, self.criterion)


@dataclass
class ExitExport:
    """What :func:`export_exits` wrote and how well the runner agrees with PyTorch."""

    directory: Path
    files: list[str]
    size_bytes: int
    max_abs_diff: float
    exits_match: bool


def load_runner(directory: str | os.PathLike, threads: int = 1) -> Any:
    """The ``ExitRunner`` of an exported directory (loaded from its own ``runner.py``)."""
    path = Path(directory) / "runner.py"
    if not path.is_file():
        raise ExportError(f"{directory} has no runner.py: not an export_exits directory")
    return runpy.run_path(str(path))["ExitRunner"](directory, threads=threads)


def export_exits(
    model: ExitModel, directory: str | os.PathLike, example: torch.Tensor, *, verify: bool = True
) -> ExitExport:
    """Write ``model``'s stages as ONNX files, ``exits.json`` and ``runner.py`` into
    ``directory``; with ``verify``, check the runner against PyTorch on ``example``.

    Raises :class:`ExportError` when an export fails or the runner disagrees.
    """
    if not isinstance(model, ExitModel):
        raise ExportError(f"export_exits needs an ExitModel (add_exits_), got {type(model)}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.eval()
    enabled = [k for k, t in enumerate(model.thresholds.tolist()) if t != math.inf]
    bounds = [*enabled, len(model.segments) - 1]
    files, lo, h = [], 0, example
    for n, hi in enumerate(bounds):
        last = n == len(bounds) - 1
        part = _Part(model, lo, hi, last).eval()
        name = f"exit-{n}.onnx"
        export_onnx(part, directory / name, h, verify=verify)
        files.append(name)
        with torch.no_grad():
            h = part(h) if last else part(h)[0]
        lo = hi + 1
    manifest = {
        "files": files,
        "exit_index": bounds,
        "score_thresholds": [float(model.thresholds[k]) for k in enabled],
        "criterion": model.criterion,
    }
    (directory / "exits.json").write_text(json.dumps(manifest, indent=1))
    (directory / "runner.py").write_text(RUNNER_SOURCE)
    size = sum((directory / f).stat().st_size for f in files)
    result = ExitExport(directory, files, size, 0.0, True)
    if verify:
        _verify(model, directory, example, result)
    return result


def _verify(model: ExitModel, directory: Path, example: torch.Tensor, result: ExitExport) -> None:
    runner = load_runner(directory)
    logits, taken = runner.run(example.numpy())
    with torch.no_grad():
        ref, ref_taken = model.infer(example)
        outs = torch.stack(model.all_exits(example))  # (exits, B, classes)
    scores = torch.stack([confidence(o, model.criterion) for o in outs[:-1]])
    # a sample whose confidence is within float noise of a threshold may go either way
    margin = (scores - model.thresholds[:, None]).abs().min(0).values > 1e-5
    same = torch.from_numpy(taken) == ref_taken
    result.exits_match = bool(same[margin].all())
    agree = same.numpy()
    diff = np.abs(logits[agree] - ref.numpy()[agree])
    result.max_abs_diff = float(diff.max()) if diff.size else 0.0
    tol = 1e-4 + 1e-3 * float(ref.abs().max())
    if not result.exits_match or result.max_abs_diff > tol:
        raise ExportError(
            f"export_exits: the ONNX runner disagrees with PyTorch in {directory}: exits "
            f"{'match' if result.exits_match else 'differ'}, max |logit diff| "
            f"{result.max_abs_diff:.3g} (tolerance {tol:.3g})"
        )
