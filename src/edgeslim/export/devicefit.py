"""``edgeslim fit`` and ``edgeslim export``: does a model fit a device, and the export call.

:func:`fit_report` lowers the model to the int8 graph, plans its memory (plain and with
patch-based execution) and compares SRAM (arena + the caller's input and output buffers)
and flash (the compiled ``model.c``'s ``.text`` + ``.rodata`` on this host, or the constants
alone without a compiler) with the device's budgets, with the latency estimate of the
device's cycles-per-MAC model (:mod:`edgeslim.profiling.devices`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.table import Table

from edgeslim.core.errors import ConfigError
from edgeslim.export import int8
from edgeslim.export.c import codegen, planner
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
    fmt: str, model: Any, out: str | os.PathLike, calib: Any, *, device=None, patch="auto"
) -> str:
    """Export ``model`` as ``fmt`` ("tflite" or "c"); return a one-line summary."""
    if fmt == "tflite":
        from edgeslim.export.tflite import export_tflite

        path = export_tflite(model, out, calib=calib)
        return f"wrote {path} ({path.stat().st_size:,} bytes)"
    if fmt == "c":
        from edgeslim.export.c import export_c

        choice = {"auto": None, "on": True, "off": False}[patch]
        return export_c(model, out, device, calib=calib, patch=choice).summary()
    raise ConfigError(f"unknown export format {fmt!r}; expected 'tflite' or 'c'")


@dataclass
class FitRow:
    """One way to run the model: its SRAM, flash and estimated latency."""

    label: str
    plan: planner.MemoryPlan
    sram: int
    flash: int
    macs: int


@dataclass
class FitReport:
    """How a model fits a device, plain and with patch-based execution."""

    model: str
    device: Any  # profile.devices.Device
    rows: list[FitRow]
    flash_source: str  # how flash was measured

    def fits(self, row: FitRow) -> bool:
        return not self.device.check_fit(row.sram, row.flash)

    def table(self) -> Table:
        dev = self.device
        table = Table(
            title=f"{self.model} on {dev.description or dev.name}",
            caption=(
                f"SRAM = arena + input + output buffers (% of {dev.sram_bytes:,} B); flash = "
                f"{self.flash_source} (% of {dev.flash_bytes:,} B); latency = MACs x "
                f"{dev.cycles_per_mac} cycles / {dev.clock_mhz:g} MHz (an estimate)"
            ),
        )
        for col in ("execution", "SRAM", "flash", "MACs", "latency", "fits"):
            table.add_column(col, justify="left" if col == "execution" else "right")
        for row in self.rows:
            table.add_row(
                row.label,
                f"{row.sram:,} B ({100 * row.sram / dev.sram_bytes:.1f}%)",
                f"{row.flash:,} B ({100 * row.flash / dev.flash_bytes:.1f}%)",
                f"{row.macs:,}",
                f"{dev.latency_ms(row.macs):.2f} ms",
                "yes" if self.fits(row) else "[bold red]no[/]",
            )
        return table


def fit_report(model: Any, calib: Any, device: str | Path, name: str | None = None) -> FitReport:
    """Flash, SRAM and estimated latency of ``model`` on ``device`` (see the module docstring)."""
    from edgeslim.profiling.devices import load_device

    dev = load_device(device)
    graph: ir.Graph = int8.lower(model, calib, name=type(model).__name__)
    plain = planner.plan_memory(graph)
    patched = planner.search_patch(graph)
    io = graph[graph.input].nbytes + graph[graph.output].nbytes
    plans = [("plain", plain)]
    if patched.patch is not None:
        p = patched.patch
        plans.append((f"patches {p.grid[0]}x{p.grid[1]} (ops 0-{p.stage_ops - 1})", patched))
    rows = []
    flash_source = "text + rodata of model.c compiled on this host"
    for label, plan in plans:
        sources = codegen.generate(graph, plan)
        if codegen.compiler() is not None:
            sizes = codegen.object_size(sources)
            flash = sizes["text"] + sizes["rodata"]
        else:
            flash = graph.constant_bytes()
            flash_source = "constants only (no C compiler to measure code)"
        macs = graph.macs()
        if plan.patch is not None:
            macs = round(macs * (1 + plan.patch.mac_overhead))
        rows.append(FitRow(label, plan, plan.arena_size + io, flash, macs))
    return FitReport(name or type(model).__name__, dev, rows, flash_source)
