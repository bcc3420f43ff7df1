"""TFLite export: write the ``.tflite`` file (:mod:`.tflite_format`) and run it.

    export_tflite(model, "m.tflite", calib=data.calib(128))

runs the file in TFLite Micro's Python interpreter (``pip install --no-deps tflite-micro``)
when it is installed and fails unless its output equals the reference interpreter's bit for
bit, and in LiteRT (``pip install ai-edge-litert``, the TFLite runtime of phones, with its
default XNNPACK delegate) when that is installed, which must agree with the reference
interpreter within :data:`LITERT_STEPS` output steps or a relative L2 error of
:data:`LITERT_REL_L2` (LiteRT's optimized kernels requantize in float or round some ties
differently from TFLite Micro's reference kernels: LeNet-5's fully connected layers differ
by one step on a few inputs). ``runtime=`` chooses: ``"auto"`` (each one installed),
``"tflm"``, ``"litert"`` or ``"all"``. Without either runtime it says so and checks the
graph against PyTorch only. ``dtype="float32"`` writes the float model instead
(:mod:`edgeslim.export.tflite_float`).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from edgeslim.core.errors import ExportError
from edgeslim.core.fileio import atomic_write_bytes
from edgeslim.export.int8 import ir
from edgeslim.export.tflite_format import io_counts, serialize, tensor_indices

RUNTIMES = ("auto", "tflm", "litert", "all")
DTYPES = ("int8", "float32")
LITERT_STEPS = 2  # LiteRT vs the reference interpreter: max difference in output steps...
LITERT_REL_L2 = 0.02  # ...or else this relative L2 error of the dequantized outputs

# --------------------------------------------------------------------------------------
# TFLite Micro
# --------------------------------------------------------------------------------------


def tflm_available() -> bool:
    """Whether TFLite Micro's Python interpreter (``tflite-micro``) can be imported."""
    try:
        from tflite_micro.python.tflite_micro import runtime  # noqa: F401
    except ImportError:
        return False
    return True


def _runtime():
    try:
        from tflite_micro.python.tflite_micro import runtime
    except ImportError as exc:
        raise ExportError(
            "TFLite Micro is not installed: pip install --no-deps tflite-micro && "
            "pip install numpy flatbuffers pyyaml absl-py (or pip install 'edgeslim[mcu]')"
        ) from exc
    return runtime


def tflm_interpreter(data: bytes, *, preserve_all: bool = False, arena_size: int | None = None):
    """A TFLite Micro interpreter for ``.tflite`` bytes.

    ``preserve_all`` keeps every tensor readable after ``invoke()`` (``GetTensor``), at the
    price of an arena with no reuse; the default records allocations for
    ``print_allocations()``.
    """
    runtime = _runtime()
    config = (
        runtime.InterpreterConfig.kPreserveAllTensors
        if preserve_all
        else runtime.InterpreterConfig.kAllocationRecording
    )
    size = arena_size or max(len(data) * 4, 1 << 20)
    try:
        return runtime.Interpreter.from_bytes(data, arena_size=size, intrepreter_config=config)
    except RuntimeError as exc:
        raise ExportError(f"TFLite Micro cannot load the model: {exc}") from exc


def run_tflm(graph: ir.Graph, data: bytes, q, *, every_tensor: bool = False):
    """Run ``.tflite`` bytes in TFLite Micro on int8 inputs ``q`` (N, H, W, C); for a graph
    with several inputs a tuple of such batches, one per input.

    Returns the outputs (N, ...) as int64 (several outputs: packed, one row per input,
    :func:`edgeslim.export.int8.reference.pack`); with ``every_tensor`` a list (one dict per
    input) of every IR tensor TFLite Micro computed, by IR name.
    """
    from edgeslim.export.int8.reference import inputs_of, pack

    interp = tflm_interpreter(data, preserve_all=every_tensor)
    index = tensor_indices(graph) if every_tensor else {}
    names = graph.activations()
    qs = [np.asarray(x, np.int8) for x in inputs_of(graph, q)]
    outputs: list[list[np.ndarray]] = [[] for _ in graph.outputs]
    tensors = []
    for i in range(len(qs[0])):
        for k, x in enumerate(qs):
            interp.set_input(x[i : i + 1], k)
        interp.invoke()
        for k, got in enumerate(outputs):
            got.append(np.asarray(interp.get_output(k), np.int64).copy())
        if every_tensor:
            tensors.append(
                {
                    n: np.asarray(interp.GetTensor(index[n], 0)["tensor_data"], np.int64).copy()
                    for n in names
                }
            )
    result = [np.concatenate(got) for got in outputs]
    out = result[0] if len(result) == 1 else pack(result)
    return (out, tensors) if every_tensor else out


def tflm_arena(data: bytes) -> dict[str, int]:
    """TFLite Micro's arena use for ``.tflite`` bytes, from its allocation report.

    ``head`` (non-persistent: activations and scratch), ``tail`` (persistent: interpreter
    overhead such as tensor structs, node data, quantization params), ``total`` = both.
    The report is read from the C library's stderr (file descriptor 2).
    """
    import re
    import tempfile

    interp = tflm_interpreter(data)
    for k in range(io_counts(data)[0]):  # every input (a model may take several)
        interp.set_input(np.zeros(interp.get_input_details(k)["shape"], np.int8), k)
    interp.invoke()
    with tempfile.TemporaryFile(mode="w+b") as sink:
        saved = os.dup(2)
        try:
            os.dup2(sink.fileno(), 2)
            interp.print_allocations()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        sink.seek(0)
        text = sink.read().decode(errors="replace")
    found = {
        k: int(v)
        for k, v in re.findall(
            r"\[RecordingMicroAllocator\] Arena allocation "
            r"(head|tail|total) (\d+) bytes",
            text,
        )
    }
    if set(found) != {"head", "tail", "total"}:
        raise ExportError(f"cannot read TFLite Micro's allocation report:\n{text[:2000]}")
    return found


# --------------------------------------------------------------------------------------
# the public call
# --------------------------------------------------------------------------------------


def export_tflite(
    model: Any,
    path: str | os.PathLike,
    *,
    calib: Any = None,
    example: Any = None,
    graph: ir.Graph | None = None,
    verify: bool = True,
    tolerance: float = 0.25,
    runtime: str = "auto",
    dtype: str = "int8",
) -> Path:
    """Write ``model`` as an int8 (default) or float32 ``.tflite`` file at ``path`` and check it.

    ``calib`` (a batch of inputs, e.g. ``data.calib(128)``) sets the qparams of a float
    model; a model quantized by ``edgeslim.quantize_`` brings its own and needs none (it is
    then checked on random int8 inputs of the shape of ``example``, an input batch, needed
    only when the model has no ``input_shape``). A prepared ``graph`` (from
    :func:`edgeslim.export.int8.lower`) may be passed instead. A model with several inputs
    takes a tuple of batches (one per input, in argument order) as ``calib`` / ``example``
    (or a tuple of shapes as ``input_shape``); the file's subgraph then has one input per
    argument and one output per tensor the model returns (a tuple, list or dict of them),
    and every output is checked.

    With ``verify`` the graph's dequantized outputs must match the PyTorch model's within
    ``tolerance`` (relative L2 error), then the file runs in the runtimes ``runtime`` names:
    ``"auto"`` each of TFLite Micro and LiteRT that is installed (a warning when neither
    is), ``"tflm"`` / ``"litert"`` that one, ``"all"`` both (a runtime asked for by name
    and not installed is an :class:`ExportError`). TFLite Micro's outputs must equal the
    reference interpreter's bit for bit; LiteRT's within :data:`LITERT_STEPS` output steps
    or a relative L2 error of :data:`LITERT_REL_L2`. Nothing is written if a check fails.

    ``dtype="float32"`` writes the float model with float32 builtin ops and no quantization
    (:mod:`edgeslim.export.tflite_float`): ``calib`` or ``example`` are then only its check
    inputs, ``graph`` and ``tolerance`` do not apply (the fp32 rule of every exporter does),
    and the file must run in LiteRT (``"auto"`` / ``"litert"``), TFLite Micro (``"tflm"``)
    or both (``"all"``): a runtime that is not installed is an :class:`ExportError`.
    """
    from edgeslim.export.int8.check import build_and_check_graph

    if dtype not in DTYPES:
        raise ExportError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    if dtype == "float32":
        from edgeslim.export.tflite_float import export_tflite_float

        if graph is not None:
            raise ExportError("graph= is an int8 graph; a float32 .tflite is built from the model")
        return export_tflite_float(
            model, path, calib=calib, example=example, verify=verify, runtime=runtime
        )
    if runtime not in RUNTIMES:
        raise ExportError(f"runtime must be one of {', '.join(RUNTIMES)}; got {runtime!r}")
    graph, calib_q = build_and_check_graph(model, calib, graph, verify, tolerance, example)
    data = serialize(graph)
    if verify:
        tflm = runtime in ("tflm", "all") or (runtime == "auto" and tflm_available())
        litert = runtime in ("litert", "all") or (runtime == "auto" and litert_available())
        if runtime == "auto" and litert and _normalizes(graph):
            litert = False  # its one-step rounding differences grow through LayerNorm
            warnings.warn(
                "the model has LayerNorm: LiteRT's optimized kernels round a step apart from "
                "TFLite Micro's and the normalization amplifies that, so the file was checked "
                "in TFLite Micro only (runtime='litert' checks it in LiteRT too)",
                stacklevel=2,
            )
        if tflm:
            check_tflm(graph, data, calib_q)
        if litert:
            check_litert(graph, data, calib_q)
        if not (tflm or litert):
            warnings.warn(
                "neither tflite-micro nor ai-edge-litert is installed: the .tflite file was "
                "not run in TFLite Micro or LiteRT",
                stacklevel=2,
            )
    return atomic_write_bytes(path, data)


def _normalizes(graph: ir.Graph) -> bool:
    from edgeslim.export.int8.ops_seq import Normalize

    return any(isinstance(op, Normalize) for op in graph.ops)


def check_tflm(graph: ir.Graph, data: bytes, q) -> None:
    """Raise :class:`ExportError` unless TFLite Micro's outputs (every output) equal the
    reference's."""
    from edgeslim.export.int8 import reference

    expected = reference.run_batch(graph, q)
    got = run_tflm(graph, data, q)
    if not np.array_equal(expected.reshape(got.shape), got):
        bad = int(np.sum(expected.reshape(got.shape) != got))
        raise ExportError(
            f"TFLite Micro's outputs differ from the reference interpreter in {bad} of "
            f"{got.size} values; the .tflite file was not written"
        )


# --------------------------------------------------------------------------------------
# LiteRT (ai-edge-litert): the TFLite runtime of phones
# --------------------------------------------------------------------------------------


def litert_available() -> bool:
    """Whether LiteRT's Python interpreter (``ai-edge-litert``) can be imported."""
    try:
        from ai_edge_litert import interpreter  # noqa: F401
    except ImportError:
        return False
    return True


def litert_interpreter(data: bytes, *, threads: int = 1):
    """A LiteRT interpreter for ``.tflite`` bytes (default kernels and XNNPACK delegate),
    with its tensors allocated."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError as exc:
        raise ExportError(
            "LiteRT is not installed: pip install ai-edge-litert "
            "(or pip install 'edgeslim[litert]')"
        ) from exc
    try:
        interp = Interpreter(model_content=data, num_threads=threads)
        interp.allocate_tensors()
    except (RuntimeError, ValueError) as exc:
        raise ExportError(f"LiteRT cannot load the model: {exc}") from exc
    return interp


def run_litert(data: bytes, q, *, threads: int = 1, interp=None) -> np.ndarray:
    """Run ``.tflite`` bytes in LiteRT on int8 inputs ``q`` (N, H, W, C) as one batch (the
    input is resized to N; several inputs: a tuple of batches, each resized); the outputs
    (N, ...) as int64 (several: packed, one row per input). ``interp`` reuses an
    interpreter from :func:`litert_interpreter`."""
    from edgeslim.export.int8.reference import pack

    interp = interp or litert_interpreter(data, threads=threads)
    qs = list(q) if isinstance(q, (tuple, list)) else [q]
    qs = [np.ascontiguousarray(x, np.int8) for x in qs]
    details = interp.get_input_details()
    if len(details) != len(qs):
        raise ExportError(f"the model has {len(details)} inputs, got {len(qs)} input batches")
    if any(tuple(d["shape"]) != x.shape for d, x in zip(details, qs, strict=True)):
        try:
            for d, x in zip(details, qs, strict=True):
                interp.resize_tensor_input(d["index"], list(x.shape))
            interp.allocate_tensors()
        except (RuntimeError, ValueError) as exc:
            shapes = ", ".join(str(x.shape) for x in qs)
            raise ExportError(f"LiteRT cannot run a batch of shape {shapes}: {exc}") from exc
    for d, x in zip(details, qs, strict=True):
        interp.set_tensor(d["index"], x)
    interp.invoke()
    outs = [
        np.asarray(interp.get_tensor(d["index"]), np.int64).copy()
        for d in interp.get_output_details()
    ]
    return outs[0] if len(outs) == 1 else pack(outs)


def check_litert(graph: ir.Graph, data: bytes, q: np.ndarray) -> dict[str, float]:
    """Raise :class:`ExportError` unless LiteRT's outputs are within :data:`LITERT_STEPS`
    output steps of the reference interpreter's, or within a relative L2 error of
    :data:`LITERT_REL_L2`; return ``{"max_steps": ..., "rel_l2": ...}``."""
    from edgeslim.export.int8 import reference
    from edgeslim.export.int8.ops_seq import SeqOp

    if any(isinstance(op, SeqOp) for op in graph.ops):  # fixed batch-1 shapes: one by one
        interp = litert_interpreter(data)
        got = np.concatenate([run_litert(data, x[None], interp=interp) for x in q])
    else:
        got = run_litert(data, q)
    expected = reference.run_batch(graph, q).reshape(got.shape)
    steps = int(np.max(np.abs(got - expected))) if got.size else 0
    rel = 0.0
    for name, e, g in zip(
        graph.outputs,
        reference.split_outputs(graph, expected),
        reference.split_outputs(graph, got),
        strict=True,
    ):
        want = reference.dequantize(graph, name, e)
        have = reference.dequantize(graph, name, g)
        rel = max(rel, float(np.linalg.norm(have - want) / max(float(np.linalg.norm(want)), 1e-12)))
    if steps > LITERT_STEPS and not rel <= LITERT_REL_L2:
        raise ExportError(
            f"LiteRT's outputs differ from the reference interpreter by up to {steps} steps "
            f"(relative L2 error {rel:.3g}; tolerance {LITERT_STEPS} steps or "
            f"{LITERT_REL_L2}); the .tflite file was not written"
        )
    return {"max_steps": float(steps), "rel_l2": rel}
