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

For batch 1 there is also ``exits-b1.onnx``: the same files joined into one graph whose
exits are nested ONNX ``If`` nodes (the score against the threshold picks the branch; the
``else`` branch holds the rest of the network), returning ``logits`` and ``exit``. One
session call per input, and the features never leave ONNX Runtime; the runner uses it for
batch-1 calls.

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
import onnx
import torch
from onnx import TensorProto, compose, helper, numpy_helper
from torch import nn

from edgeslim.core.errors import ExportError
from edgeslim.core.fileio import atomic_write_bytes, atomic_write_text
from edgeslim.dynamic.exits import ExitModel, confidence
from edgeslim.export.onnx import export_onnx

BATCH1 = "exits-b1.onnx"

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
        one = self.manifest.get("batch1")
        self.single = (
            ort.InferenceSession(str(directory / one), opts, providers=["CPUExecutionProvider"])
            if one else None
        )

    def run(self, x):
        """(logits (B, classes), exit index (B,)) for a float32 batch x."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        b = x.shape[0]
        if b == 1 and self.single is not None:  # one call: the exits are If nodes inside
            logits, taken = self.single.run(None, {"input": x})
            return logits, taken
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


def _const(name: str, value: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value, name))


def _if_model(
    parts: list[onnx.ModelProto],
    model: ExitModel,
    enabled: list[int],
    bounds: list[int],
    example: torch.Tensor,
) -> onnx.ModelProto:
    """The per-exit files joined into one batch-1 graph with nested ``If`` nodes."""
    parts = [compose.add_prefix(p, f"p{n}_") for n, p in enumerate(parts)]
    with torch.no_grad():
        classes = int(model.static(example[:1]).shape[1])
    shape = [1, *example.shape[1:]]
    thresholds = [float(model.thresholds[k]) for k in enabled]

    def outputs(n: int, kind: str) -> list[onnx.ValueInfoProto]:
        return [
            helper.make_tensor_value_info(f"x{n}_{kind}_logits", TensorProto.FLOAT, [1, classes]),
            helper.make_tensor_value_info(f"x{n}_{kind}_exit", TensorProto.INT64, [1]),
        ]

    def body(n: int, src: str) -> tuple[list[onnx.NodeProto], str, str]:
        g = parts[n].graph
        nodes = [helper.make_node("Identity", [src], [g.input[0].name]), *g.node]
        names = [o.name for o in g.output]
        if n == len(parts) - 1:
            nodes.append(_const(f"x{n}_exit", np.array([bounds[n]], np.int64)))
            return nodes, names[0], f"x{n}_exit"
        feat, logits, score = names
        nodes += [
            _const(f"x{n}_t", np.array([thresholds[n]], np.float32)),
            _const(f"x{n}_axes", np.array([0], np.int64)),
            helper.make_node("GreaterOrEqual", [score, f"x{n}_t"], [f"x{n}_ge"]),
            helper.make_node("Squeeze", [f"x{n}_ge", f"x{n}_axes"], [f"x{n}_cond"]),
        ]
        then = helper.make_graph(
            [
                helper.make_node("Identity", [logits], [f"x{n}_then_logits"]),
                _const(f"x{n}_then_exit", np.array([bounds[n]], np.int64)),
            ],
            f"exit{n}_then", [], outputs(n, "then"),
        )  # fmt: skip
        rest, rest_logits, rest_exit = body(n + 1, feat)
        rest += [
            helper.make_node("Identity", [rest_logits], [f"x{n}_else_logits"]),
            helper.make_node("Identity", [rest_exit], [f"x{n}_else_exit"]),
        ]
        other = helper.make_graph(rest, f"exit{n}_else", [], outputs(n, "else"))
        nodes.append(
            helper.make_node(
                "If",
                [f"x{n}_cond"],
                [f"x{n}_logits", f"x{n}_exit"],
                then_branch=then,
                else_branch=other,
            )
        )
        return nodes, f"x{n}_logits", f"x{n}_exit"

    nodes, logits, taken = body(0, "input")
    nodes += [
        helper.make_node("Identity", [logits], ["logits"]),
        helper.make_node("Identity", [taken], ["exit"]),
    ]
    graph = helper.make_graph(
        nodes,
        "early_exits",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, classes]),
            helper.make_tensor_value_info("exit", TensorProto.INT64, [1]),
        ],
        initializer=[init for p in parts for init in p.graph.initializer],
    )
    joined = helper.make_model(graph, opset_imports=list(parts[0].opset_import))
    joined.ir_version = parts[0].ir_version
    try:
        onnx.checker.check_model(joined, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"export_exits: the joined batch-1 graph is invalid: {exc}") from exc
    return joined


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
    single = _if_model(
        [onnx.load(str(directory / f)) for f in files], model, enabled, bounds, example
    )
    atomic_write_bytes(directory / BATCH1, single.SerializeToString())
    manifest = {
        "files": files,
        "batch1": BATCH1,
        "exit_index": bounds,
        "score_thresholds": [float(model.thresholds[k]) for k in enabled],
        "criterion": model.criterion,
    }
    atomic_write_text(directory / "exits.json", json.dumps(manifest, indent=1))
    atomic_write_text(directory / "runner.py", RUNNER_SOURCE)
    size = sum((directory / f).stat().st_size for f in files)
    result = ExitExport(directory, files, size, 0.0, True)
    if verify:
        _verify(model, directory, example, result)
    return result


def _verify(model: ExitModel, directory: Path, example: torch.Tensor, result: ExitExport) -> None:
    runner = load_runner(directory)
    logits, taken = runner.run(example.numpy())
    ones = [runner.run(example[i : i + 1].numpy()) for i in range(min(16, len(example)))]
    logits[: len(ones)] = np.concatenate([one[0] for one in ones])  # batch 1: exits-b1.onnx
    taken[: len(ones)] = np.concatenate([one[1] for one in ones])
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
