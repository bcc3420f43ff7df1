"""C99 for microcontrollers: ``export_c(model, out_dir, device=...)``.

The integer graph comes from :mod:`edgeslim.export.int8` (lowering, the numpy reference
interpreter, the check against PyTorch), shared with
:func:`edgeslim.export.tflite.export_tflite`; here: :mod:`.planner` (static arena) and
:mod:`.codegen` (C files from templates).

    export_c(model, "out/", device="stm32f746", calib=data.calib(128))

writes ``model.h``, ``model.c`` and ``weights.h`` (one static arena, no malloc, integer
only, ``int model_run(const int8_t *input, int8_t *output)``) after compiling them with
``gcc -std=c99 -O2 -Wall -Werror -fsanitize=undefined`` and checking that every output
equals the reference interpreter's bit for bit. A model with several inputs or outputs
(``calib=`` a tuple of batches, one per input; a tuple, list or dict of tensors returned)
gets one pointer per input and output, in order: ``int model_run(const int8_t *input0,
const int8_t *input1, int8_t *output0, int8_t *output1)``, with ``MODEL_INPUTk_*`` /
``MODEL_OUTPUTk_*`` macros for each and ``MODEL_RUN_PACKED(in, out)`` for buffers that
hold them back to back.
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
from edgeslim.export.c import codegen, compress, hostbuild, planner
from edgeslim.export.int8 import ir, reference
from edgeslim.export.int8.check import build_and_check_graph

__all__ = ["CExport", "code_bytes", "export_c", "plan_for"]


def plan_for(
    graph: ir.Graph,
    *,
    patch: bool | None = None,
    sram_bytes: int | None = None,
    max_mac_overhead: float = 0.3,
    packed: dict[int, compress.Packed] | None = None,
) -> planner.MemoryPlan:
    """The memory plan: in-place rules always; patch-based execution when asked (``True``)
    or, with ``None``, only if the plain plan does not fit ``sram_bytes``. The convs with
    ``packed`` weights get their im2col scratch."""
    scratch = packed_scratch(graph, packed)
    plain = planner.plan_memory(graph, scratch=scratch)
    io = graph.io_bytes()
    needs = sram_bytes is not None and plain.arena_size + io > sram_bytes
    if patch is False or (patch is None and not needs):
        return plain
    return planner.search_patch(graph, max_mac_overhead=max_mac_overhead, scratch=scratch)


def packed_scratch(graph: ir.Graph, packed: dict[int, compress.Packed] | None) -> dict[int, int]:
    """``{op index: bytes}`` of scratch the kernels of the ``packed`` layers need."""
    return {i: compress.scratch_bytes(graph, graph.ops[i]) for i in packed or {}}


@dataclass
class CExport:
    """What :func:`export_c` wrote and what it measured."""

    directory: Path
    files: list[Path]
    plan: planner.MemoryPlan
    graph: ir.Graph
    weight_bytes: int  # weights (packed or int8), int32 biases, multipliers and shifts
    io_bytes: int  # the caller's input and output buffers
    verified: list[str] = field(default_factory=list)  # what was checked
    packed: dict[int, compress.Packed] = field(default_factory=dict)  # compressed layers
    arm: Any = None  # an .arm.ArmBuild when built for the device's Cortex-M core

    @property
    def arena_bytes(self) -> int:
        return self.plan.arena_size

    def summary(self) -> str:
        text = (
            f"{self.directory}: {', '.join(p.name for p in self.files)}; "
            f"{self.plan.summary()}; {self.weight_bytes:,} B of constants"
            + (f"; checked: {', '.join(self.verified)}" if self.verified else "")
        )
        if self.arm is not None:
            text += f"\n{self.arm.summary()}"
        layers = compress.summary(self.graph, self.packed)
        if layers:
            saved = sum(p.dense_bytes - p.nbytes for p in self.packed.values())
            head = (
                f"weights: {len(self.packed)} of {len(layers)} layers compressed "
                f"(only where it saves flash), {saved:,} B saved"
            )
            text += "\n" + "\n  ".join([head, *layers])
        return text


def code_bytes(graph: ir.Graph) -> int:
    """The code size of ``graph``'s generated C: text + rodata of the object compiled on
    this host, minus the model's constants (0 without a C compiler). A cost model adds it to
    a candidate's constants to predict its flash without compiling every candidate."""
    if hostbuild.compiler() is None:
        return 0
    packed = compress.choose(graph, "auto")
    plan = planner.plan_memory(graph, scratch=packed_scratch(graph, packed))
    sizes = hostbuild.object_size(codegen.generate(graph, plan, packed))
    return max(0, sizes["text"] + sizes["rodata"] - codegen.constant_bytes(graph, packed))


def export_c(
    model: Any,
    out_dir: str | os.PathLike,
    device: str | None = None,
    *,
    calib: Any = None,
    example: Any = None,
    graph: ir.Graph | None = None,
    patch: bool | None = None,
    max_mac_overhead: float = 0.3,
    verify: bool = True,
    tolerance: float = 0.25,
    compress_weights: str | dict = "auto",
    arm: bool | None = None,
    opt: str = "-Os",
) -> CExport:
    """Write ``model.h``, ``model.c``, ``weights.h`` for ``model`` into ``out_dir``.

    ``calib`` (a batch of inputs) sets the int8 ranges of a float model and is what the
    files are checked on; a model quantized by ``edgeslim.quantize_`` brings its own qparams
    and without ``calib`` is checked on random int8 inputs of the shape of ``example`` (an
    input batch, needed only when the model has no ``input_shape``). A prepared ``graph`` may be
    passed instead of lowering ``model`` again. A model with several inputs takes a tuple of
    batches (one per input) as ``calib`` / ``example``; ``model_run`` then takes one pointer
    per input and per output (see the module docstring) and every output is checked.

    ``device`` (a profile name, see :func:`edgeslim.profiling.devices.load_device`) must
    hold the arena and I/O buffers in SRAM and the constants in flash, else
    :class:`ExportError`; when the plain plan does not fit, patch-based execution is tried
    (``patch=None``); ``patch=True`` always searches for it, ``False`` never. With
    ``verify`` the files are compiled (``gcc -std=c99 -O2 -Wall -Werror
    -fsanitize=undefined``) and run on the check inputs, and their outputs must equal the
    reference interpreter's bit for bit; nothing is written if any check fails.

    ``compress_weights`` (:func:`.compress.choose`): ``"auto"`` stores a conv or fully
    connected layer's weights compressed (value table + packed codes, sparse index) where
    that is smaller than int8, ``"off"`` never, or ``{layer: format}`` forces formats; the
    summary states each layer's choice.

    ``arm``: build for the device's Cortex-M core with ``arm-none-eabi-gcc`` (``opt``,
    ``-Os`` by default) and, where ``qemu-system-arm`` is installed, run the check inputs on
    the emulated MPS2 board and require the reference's outputs bit for bit (``None``: when
    the device is a Cortex-M and the toolchain is installed; ``True``: required). Flash and
    SRAM then come from the ARM link (:class:`.arm.ArmBuild`).
    """
    from edgeslim.profiling.devices import load_device

    dev = load_device(device) if device is not None else None
    graph, q = build_and_check_graph(model, calib, graph, verify, tolerance, example)
    sram = dev.sram_bytes if dev is not None else None
    packed = compress.choose(graph, compress_weights)
    plan = plan_for(
        graph, patch=patch, sram_bytes=sram, max_mac_overhead=max_mac_overhead, packed=packed
    )
    sources = codegen.generate(graph, plan, packed)
    io = graph.io_bytes()
    weights = codegen.constant_bytes(graph, packed)
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
        if hostbuild.compiler() is None:
            warnings.warn("no C compiler: the generated C was not compiled", stacklevel=2)
        else:
            check_c(graph, sources, q)
            verified.append(f"compiled C bit-exact on {reference.batch_size(q)} inputs")
    arm_build = None
    if dev is not None and arm is not False:
        from edgeslim.export.c import arm as armlib

        arm_build = armlib.build_for_device(
            graph, sources, dev, q if verify else None, required=bool(arm), opt=opt
        )
        if arm_build is not None:
            verified += arm_build.verified
    out = Path(out_dir)
    written = [atomic_write_text(out / name, text) for name, text in sources.items()]
    return CExport(out, written, plan, graph, weights, io, verified, packed, arm_build)


def check_c(graph: ir.Graph, sources: dict[str, str], q) -> None:
    """Compile ``sources``, run them on ``q`` (a tuple of batches for several inputs) and
    raise unless every output matches the reference's."""
    expected = reference.run_batch(graph, q)
    with hostbuild.Build(sources) as build:
        got = build.run(q, reference.output_size(graph))
    if not np.array_equal(got, expected.reshape(got.shape)):
        bad = int(np.sum(got != expected.reshape(got.shape)))
        raise ExportError(
            f"the compiled C differs from the reference interpreter in {bad} of {got.size} "
            "output values; nothing was written"
        )
