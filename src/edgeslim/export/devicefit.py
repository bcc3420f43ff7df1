"""``edgeslim fit`` and ``edgeslim export``: does a model fit a device, and the export call.

:func:`fit_report` lowers the model to the int8 graph, plans its memory (plain and with
patch-based execution; conv / fully connected weights compressed where that saves flash, as
``export_c`` stores them) and compares SRAM and flash with the device's budgets, with the
latency estimate of the device's model (:mod:`edgeslim.profiling.devices`: for a Cortex-M,
instructions fitted per op type on QEMU x an assumed cycles per instruction).

Where the numbers come from, best first (the report says which):

- a Cortex-M device with ``arm-none-eabi-gcc`` installed: flash = ``model.o``'s ``.text +
  .rodata + .data`` in the ARM link; with ``qemu-system-arm`` also the stack measured on
  the emulated board (stack painting, one random input) and the emulator's instruction count;
- otherwise flash = ``.text + .rodata`` of ``model.c`` compiled on this host (an estimate: host
  code, not Thumb-2), or the constants alone without a C compiler (an estimate);
- SRAM = arena + the caller's input and output buffers (+ the measured stack when run on QEMU;
  without it the stack is not counted).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.table import Table

from edgeslim.core.errors import ConfigError
from edgeslim.export import int8
from edgeslim.export.c import codegen, hostbuild, planner
from edgeslim.export.int8 import ir


def calibration_inputs(model: Any, data: str, n: int):
    """``n`` calibration inputs for ``model``: from dataset ``data`` when its inputs have the
    model's shape, else (or with ``data="random"``) uniform random inputs in [0, 1)."""
    import torch

    from edgeslim.core.data.datasets import load_data

    shape = tuple(int8.example_of(model, None).shape[1:])
    if n < 1:
        raise ConfigError(f"--calib must be >= 1, got {n}")
    if data != "random":
        splits = load_data(data)
        if splits.input_shape == shape:
            return splits.calib(min(n, len(splits.train)))
        print(
            f"{data} inputs are {splits.input_shape}, the model takes {shape}: "
            "calibrating on random inputs"
        )
    return torch.rand(n, *shape, generator=torch.Generator().manual_seed(0))


def export_file(
    fmt: str,
    model: Any,
    out: str | os.PathLike,
    calib: Any,
    *,
    device=None,
    patch="auto",
    runtime: str = "auto",
    dtype: str = "int8",
) -> str:
    """Export ``model`` as ``fmt`` ("tflite", "litert" = a .tflite checked in LiteRT, or
    "c"); return a one-line summary. ``runtime`` and ``dtype`` ("int8" or "float32") are
    :func:`export_tflite`'s for "tflite" / "litert"."""
    if fmt in ("tflite", "litert"):
        from edgeslim.export.tflite import export_tflite, litert_available, tflm_available

        runtime = "litert" if fmt == "litert" else runtime
        path = export_tflite(model, out, calib=calib, runtime=runtime, dtype=dtype)
        float_auto = dtype == "float32" and runtime == "auto"  # a float32 file: LiteRT
        ran = [
            name
            for name, key, present in (
                ("TFLite Micro", "tflm", tflm_available),
                ("LiteRT", "litert", litert_available),
            )
            if runtime in (key, "all")
            or (float_auto and key == "litert")
            or (runtime == "auto" and dtype == "int8" and present())
        ]
        checked = f"; verified in {' and '.join(ran)}" if ran else ""
        return f"wrote {path} ({path.stat().st_size:,} bytes){checked}"
    if fmt == "c":
        from edgeslim.export.c import export_c

        choice = {"auto": None, "on": True, "off": False}[patch]
        return export_c(model, out, device, calib=calib, patch=choice).summary()
    raise ConfigError(f"unknown export format {fmt!r}; expected 'tflite', 'litert' or 'c'")


@dataclass
class FitRow:
    """One way to run the model: its SRAM, flash and estimated latency."""

    label: str
    plan: planner.MemoryPlan
    sram: int
    flash: int
    macs: int
    instructions: int | None = None  # per inference on QEMU (-icount)
    work: Any = None  # the graph's profiling.devices.Workload (the latency model's input)


@dataclass
class FitReport:
    """How a model fits a device, plain and with patch-based execution."""

    model: str
    device: Any  # profile.devices.Device
    rows: list[FitRow]
    flash_source: str  # how flash was measured
    sram_source: str = "arena + input + output buffers (stack not counted: an estimate)"
    compressed: str = ""  # which layers keep compressed weights

    def fits(self, row: FitRow) -> bool:
        return not self.device.check_fit(row.sram, row.flash)

    def table(self) -> Table:
        dev = self.device
        table = Table(
            title=f"{self.model} on {dev.description or dev.name}",
            caption=(
                f"SRAM = {self.sram_source} (% of {dev.sram_bytes:,} B); flash = "
                f"{self.flash_source} (% of {dev.flash_bytes:,} B); latency = "
                f"{dev.latency_text()}" + (f"; {self.compressed}" if self.compressed else "")
            ),
        )
        counted = any(row.instructions is not None for row in self.rows)
        columns = ["execution", "SRAM", "flash", "MACs", "latency"]
        columns += ["instructions (QEMU)"] if counted else []
        for col in [*columns, "fits"]:
            table.add_column(col, justify="left" if col == "execution" else "right")
        for row in self.rows:
            cells = [
                row.label,
                f"{row.sram:,} B ({100 * row.sram / dev.sram_bytes:.1f}%)",
                f"{row.flash:,} B ({100 * row.flash / dev.flash_bytes:.1f}%)",
                f"{row.macs:,}",
                f"{dev.latency_ms(row.work if row.work is not None else row.macs):.2f} ms",
            ]
            if counted:
                cells.append(f"{row.instructions:,}" if row.instructions is not None else "-")
            table.add_row(*cells, "yes" if self.fits(row) else "[bold red]no[/]")
        return table


def fit_report(model: Any, calib: Any, device: str | Path, name: str | None = None) -> FitReport:
    """Flash, SRAM and estimated latency of ``model`` on ``device`` (see the module docstring)."""
    import numpy as np

    from edgeslim.export.c import arm, compress, packed_scratch
    from edgeslim.export.c.workload import workload
    from edgeslim.profiling.devices import load_device

    dev = load_device(device)
    graph: ir.Graph = int8.lower(model, calib, name=type(model).__name__)
    packed = compress.choose(graph, "auto")
    scratch = packed_scratch(graph, packed)
    plain = planner.plan_memory(graph, scratch=scratch)
    patched = planner.search_patch(graph, scratch=scratch)
    io = graph.io_bytes()
    plans = [("plain", plain)]
    if patched.patch is not None:
        p = patched.patch
        plans.append((f"patches {p.grid[0]}x{p.grid[1]} (ops 0-{p.stage_ops - 1})", patched))
    use_arm = dev.core.lower() in arm.CORES and arm.toolchain() is not None
    run_qemu = use_arm and arm.qemu() is not None
    rng = np.random.default_rng(0)
    qs = tuple(
        rng.integers(-128, 128, (1, *graph[n].shape[1:])).astype(np.int8) for n in graph.inputs
    )
    q = qs[0] if len(qs) == 1 else qs
    rows = []
    if use_arm:
        flash_source = f"model.o's text + rodata + data in the ARM link ({dev.core}, -Os)"
    elif hostbuild.compiler() is not None:
        flash_source = (
            "text + rodata of model.c compiled on this host (an estimate: "
            f"{arm.missing() or 'no ARM build for ' + dev.core})"
        )
    else:
        flash_source = "constants only (an estimate: no C compiler to measure code)"
    sram_source = "arena + input + output buffers (stack not counted: an estimate)"
    if run_qemu:
        sram_source = "arena + stack measured on QEMU (painting) + input + output buffers"
    for label, plan in plans:
        sources = codegen.generate(graph, plan, packed)
        sram, instructions = plan.arena_size + io, None
        if use_arm:
            built = arm.build(graph, sources, dev.core, q if run_qemu else None)
            flash = built.flash
            if built.run is not None:
                sram, instructions = built.sram, built.instructions
        elif hostbuild.compiler() is not None:
            sizes = hostbuild.object_size(sources)
            flash = sizes["text"] + sizes["rodata"]
        else:
            flash = codegen.constant_bytes(graph, packed)
        macs = graph.macs()
        if plan.patch is not None:
            macs = round(macs * (1 + plan.patch.mac_overhead))
        work = workload(graph, packed, plan)
        rows.append(FitRow(label, plan, sram, flash, macs, instructions, work))
    compressed = ""
    if packed:
        names = ", ".join(graph.ops[i].name for i in sorted(packed))
        compressed = f"compressed weights: {names}"
    return FitReport(name or type(model).__name__, dev, rows, flash_source, sram_source, compressed)
