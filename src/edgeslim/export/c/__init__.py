"""C99 for microcontrollers: ``export_c(model, out_dir, device=...)``.

The integer graph comes from :mod:`edgeslim.export.int8` (lowering, the numpy reference
interpreter, the check against PyTorch), shared with
:func:`edgeslim.export.tflite.export_tflite`; here: :mod:`.planner` (static arena) and
:mod:`.codegen` (C files from templates).

    export_c(model, "out/", device="stm32f746", calib=data.calib(128))

writes ``model.h``, ``model.c`` and ``weights.h`` (one static arena, no malloc, integer
only, ``int model_run(const int8_t *input, int8_t *output)``) after compiling them with
``gcc -std=c99 -O2 -Wall -Werror -fsanitize=undefined`` and checking that every output
equals the reference interpreter's bit for bit.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeslim.core.errors import ExportError
from edgeslim.core.fileio import atomic_write_text
from edgeslim.export.c import codegen, planner
from edgeslim.export.int8 import ir, reference
from edgeslim.export.int8.check import build_and_check_graph

__all__ = ["CExport", "export_c", "plan_for"]


def plan_for(
    graph: ir.Graph,
    *,
    patch: bool | None = None,
    sram_bytes: int | None = None,
    max_mac_overhead: float = 0.3,
) -> planner.MemoryPlan:
    """The memory plan: in-place rules always; patch-based execution when asked (``True``)
    or, with ``None``, only if the plain plan does not fit ``sram_bytes``."""
    plain = planner.plan_memory(graph)
    io = graph[graph.input].nbytes + graph[graph.output].nbytes
    needs = sram_bytes is not None and plain.arena_size + io > sram_bytes
    if patch is False or (patch is None and not needs):
        return plain
    return planner.search_patch(graph, max_mac_overhead=max_mac_overhead)


@dataclass
class CExport:
    """What :func:`export_c` wrote and what it measured."""

    directory: Path
    files: list[Path]
    plan: planner.MemoryPlan
    graph: ir.Graph
    weight_bytes: int  # int8 weights, int32 biases, multipliers and shifts (all rodata)
    io_bytes: int  # the caller's input and output buffers
    verified: list[str] = field(default_factory=list)  # what was checked

    @property
    def arena_bytes(self) -> int:
        return self.plan.arena_size

    def summary(self) -> str:
        return (
            f"{self.directory}: {', '.join(p.name for p in self.files)}; "
            f"{self.plan.summary()}; {self.weight_bytes:,} B of constants"
            + (f"; checked: {', '.join(self.verified)}" if self.verified else "")
        )


def export_c(
    model: Any,
    out_dir: str | os.PathLike,
    device: str | None = None,
    *,
    calib: Any = None,
    graph: ir.Graph | None = None,
    patch: bool | None = None,
    max_mac_overhead: float = 0.3,
    verify: bool = True,
    tolerance: float = 0.25,
) -> CExport:
    """Write ``model.h``, ``model.c``, ``weights.h`` for ``model`` into ``out_dir``.

    ``calib`` (a batch of inputs) sets the int8 ranges of a float model and is what the
    files are checked on; a model quantized by ``edgeslim.quantize_`` brings its own qparams
    and without ``calib`` is checked on random int8 inputs. A prepared ``graph`` may be
    passed instead of lowering ``model`` again.

    ``device`` (a profile name, see :func:`edgeslim.profiling.devices.load_device`) must
    hold the arena and I/O buffers in SRAM and the constants in flash, else
    :class:`ExportError`; when the plain plan does not fit, patch-based execution is tried
    (``patch=None``); ``patch=True`` always searches for it, ``False`` never. With
    ``verify`` the files are compiled (``gcc -std=c99 -O2 -Wall -Werror
    -fsanitize=undefined``) and run on the check inputs, and their outputs must equal the
    reference interpreter's bit for bit; nothing is written if any check fails.
    """
    from edgeslim.profiling.devices import load_device

    dev = load_device(device) if device is not None else None
    graph, q = build_and_check_graph(model, calib, graph, verify, tolerance)
    sram = dev.sram_bytes if dev is not None else None
    plan = plan_for(graph, patch=patch, sram_bytes=sram, max_mac_overhead=max_mac_overhead)
    sources = codegen.generate(graph, plan)
    io = graph[graph.input].nbytes + graph[graph.output].nbytes
    weights = graph.constant_bytes()
    if dev is not None:
        problems = dev.check_fit(plan.arena_size + io, weights)
        if problems:
            raise ExportError(
                f"{graph.name} does not fit {dev.name}: {'; '.join(problems)}"
                + ("" if plan.patch else " (patch-based execution did not help enough)")
            )
    verified = []
    if verify:
        verified.append("PyTorch outputs within tolerance")
        if codegen.compiler() is None:
            warnings.warn("no C compiler: the generated C was not compiled", stacklevel=2)
        else:
            check_c(graph, sources, q)
            verified.append(f"compiled C bit-exact on {len(q)} inputs")
    out = Path(out_dir)
    written = [atomic_write_text(out / name, text) for name, text in sources.items()]
    return CExport(out, written, plan, graph, weights, io, verified)


def check_c(graph: ir.Graph, sources: dict[str, str], q: np.ndarray) -> None:
    """Compile ``sources``, run them on ``q`` and raise unless they match the reference."""
    expected = reference.run_batch(graph, q)
    with codegen.Build(sources) as build:
        got = build.run(q, graph[graph.output].size)
    if not np.array_equal(got, expected.reshape(got.shape)):
        bad = int(np.sum(got != expected.reshape(got.shape)))
        raise ExportError(
            f"the compiled C differs from the reference interpreter in {bad} of {got.size} "
            "output values; nothing was written"
        )
