"""Build and run the generated C on this machine: the checks behind every C export.

:class:`Build` compiles the files with ``gcc -std=c99 -O2 -Wall -Werror
-fsanitize=undefined`` around a small driver (``templates/harness.c``) and runs them; the
driver can also log every op's output (``-DMODEL_TRACE``), which :func:`check_trace`
compares with the integer reference, op by op. :func:`object_size` measures the flash a
build takes (``.text`` + ``.rodata``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from edgeslim.core.errors import ExportError
from edgeslim.core.fileio import ScratchDir
from edgeslim.export.c.codegen import template
from edgeslim.export.c.planner import Region
from edgeslim.export.int8 import ir
from edgeslim.export.int8.reference import pack

GCC_FLAGS = (
    "-std=c99",
    "-O2",
    "-Wall",
    "-Wextra",
    "-Werror",
    "-fsanitize=undefined",
    "-fno-sanitize-recover=undefined",
)


def compiler() -> str | None:
    """The C compiler to use: ``$CC`` or ``gcc``, if it exists."""
    return shutil.which(os.environ.get("CC", "gcc"))


class Build(ScratchDir):
    """The generated files compiled with the test driver in a temporary directory.

    ``sanitize=False`` leaves out ``-fsanitize=undefined`` (for timing).
    """

    def __init__(
        self, sources: dict[str, str], *, trace: bool = False, sanitize: bool = True
    ) -> None:
        cc = compiler()
        if cc is None:
            raise ExportError("no C compiler found (set CC or install gcc)")
        super().__init__(prefix="edgeslim-c-")
        for name, text in sources.items():
            (self.dir / name).write_text(text, encoding="utf-8")
        for name in ("harness.c", "harness_io.h"):
            (self.dir / name).write_text(template(name), encoding="utf-8")
        flags = [f for f in GCC_FLAGS if sanitize or "sanitize" not in f]
        if trace:
            flags.append("-DMODEL_TRACE")
        self.exe = self.dir / "harness"
        cmd = [cc, *flags, "-o", str(self.exe), "model.c", "harness.c"]
        proc = subprocess.run(cmd, cwd=self.dir, capture_output=True, text=True)
        if proc.returncode != 0:
            raise ExportError(
                f"the generated C does not compile ({' '.join(cmd)}):\n{proc.stderr[-4000:]}"
            )

    def run(self, q, output_size: int, trace: bool = False):
        """Outputs (N, output_size) for int8 inputs ``q`` (N, ...); with ``trace`` also the log.

        A model with several inputs takes a tuple of batches (one per input) and writes all
        its outputs of one inference back to back (``output_size``: their total)."""
        q = np.ascontiguousarray(pack(q), dtype=np.int8)
        (self.dir / "in.bin").write_bytes(q.tobytes())
        args = [str(self.exe), "run", "in.bin", "out.bin"] + (["trace.bin"] if trace else [])
        proc = subprocess.run(args, cwd=self.dir, capture_output=True, text=True)
        if proc.returncode != 0:
            raise ExportError(
                f"the compiled model failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
            )
        out = np.frombuffer((self.dir / "out.bin").read_bytes(), np.int8).astype(np.int64)
        out = out.reshape(len(q), output_size)
        if not trace:
            return out
        return out, parse_trace((self.dir / "trace.bin").read_bytes())

    def time_us(self, q: np.ndarray, repeats: int = 100) -> float:
        """Median latency of ``model_run`` in microseconds over ``repeats`` runs."""
        (self.dir / "one.bin").write_bytes(np.ascontiguousarray(pack(q), dtype=np.int8).tobytes())
        proc = subprocess.run(
            [str(self.exe), "time", "one.bin", str(repeats)],
            cwd=self.dir,
            capture_output=True,
            text=True,
            check=True,
        )
        return float(proc.stdout.strip())


def parse_trace(data: bytes) -> list[tuple[int, Region, np.ndarray]]:
    """Records ``(op, region, int8 values)`` of a ``-DMODEL_TRACE`` log, in order."""
    records = []
    pos = 0
    while pos < len(data):
        op, y0, x0, h, w, size = np.frombuffer(data, np.int32, 6, pos)
        pos += 24
        values = np.frombuffer(data, np.int8, int(size), pos).astype(np.int64)
        pos += int(size)
        records.append((int(op), Region(int(y0), int(x0), int(h), int(w)), values))
    return records


def check_trace(graph: ir.Graph, values: dict[str, np.ndarray], records) -> list[str]:
    """Compare a trace (one inference) with the reference's tensors; return mismatches."""
    problems = []
    seen = set()
    for i, region, data in records:
        name = graph.ops[i].output
        seen.add(i)
        ref = values[name]
        if len(ref.shape) == 4:
            c = ref.shape[3]
            ref = ref[0, region.y0 : region.y0 + region.h, region.x0 : region.x0 + region.w, :]
            data = data.reshape(region.h, region.w, c)
        else:
            ref = ref.reshape(-1)
        if not np.array_equal(ref, data):
            problems.append(f"op {i} ({graph.ops[i].kind} {graph.ops[i].name}) region {region}")
    missing = set(range(len(graph.ops))) - seen
    problems += [f"op {i} was never traced" for i in sorted(missing)]
    return problems


def object_size(sources: dict[str, str], flags: tuple[str, ...] = ("-std=c99", "-O2")) -> dict:
    """``{"text": B, "rodata": B}`` of ``model.c`` compiled to an object file on this host.

    The constants (``.rodata``) are what a microcontroller keeps in flash byte for byte;
    ``.text`` is host (x86-64 / Arm64) code, a stand-in for the target's.
    """
    cc = compiler()
    if cc is None:
        raise ExportError("no C compiler found (set CC or install gcc)")
    with tempfile.TemporaryDirectory(prefix="edgeslim-size-") as tmp:
        for name, text in sources.items():
            Path(tmp, name).write_text(text, encoding="utf-8")
        proc = subprocess.run(
            [cc, *flags, "-c", "model.c", "-o", "model.o"], cwd=tmp, capture_output=True, text=True
        )
        if proc.returncode != 0:
            raise ExportError(f"the generated C does not compile:\n{proc.stderr[-4000:]}")
        sizes = {"text": 0, "rodata": 0}
        for line in _section_sizes(Path(tmp, "model.o")):
            name, size = line
            if name.startswith(".text"):
                sizes["text"] += size
            elif name.startswith(".rodata"):
                sizes["rodata"] += size
    return sizes


def _section_sizes(path: Path) -> list[tuple[str, int]]:
    """``(name, size)`` of every section of an ELF object file (read with the struct module)."""
    import struct

    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2:
        raise ExportError(f"{path} is not a 64-bit ELF object")
    endian = "<" if data[5] == 1 else ">"
    shoff = struct.unpack_from(endian + "Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from(endian + "HHH", data, 0x3A)
    headers = [
        struct.unpack_from(endian + "IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)
    ]
    names_at = headers[shstrndx][4]
    out = []
    for h in headers:
        start = names_at + h[0]
        name = data[start : data.index(b"\0", start)].decode()
        sh_type, size = h[1], h[5]
        if sh_type != 8:  # SHT_NOBITS (.bss) takes no flash
            out.append((name, size))
    return out
