"""C99 code generator: ``model.h``, ``model.c`` and ``weights.h`` from the integer graph.

The files are filled from templates (``templates/*.tmpl``, :class:`string.Template`); the
kernels (``templates/kernels.c``) are pasted into ``model.c`` as they are. ``model.c`` holds
one static arena laid out by the memory plan (:mod:`.planner`), a ``static const`` parameter
struct per op and ``model_run``, which calls the kernels in order with arena offsets; a
patch-based stage becomes a loop over a table of regions. ``weights.h`` holds the int8
weights, int32 biases and per-channel multipliers and shifts. No malloc, no floating point.

``compile_and_run`` builds the files with ``gcc -std=c99 -O2 -Wall -Werror
-fsanitize=undefined`` around a small driver (``templates/harness.c``) and runs them; the
driver can also log every op's output (``-DMODEL_TRACE``) for bit-exact checks of every
intermediate tensor.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from importlib.resources import files
from pathlib import Path
from string import Template

import numpy as np

from edgeslim.core.errors import ExportError
from edgeslim.core.version import __version__
from edgeslim.export.c import compress
from edgeslim.export.c.planner import MemoryPlan, Region, full_region
from edgeslim.export.int8 import ir

GCC_FLAGS = (
    "-std=c99",
    "-O2",
    "-Wall",
    "-Wextra",
    "-Werror",
    "-fsanitize=undefined",
    "-fno-sanitize-recover=undefined",
)


def _template(name: str) -> str:
    return (files("edgeslim.export.c") / "templates" / name).read_text(encoding="utf-8")


def _kernels(needed: set[str]) -> str:
    """The preamble and the sections of ``templates/kernels.c`` that ``needed`` names.

    Sections start with a ``/* ==== name ==== */`` line; unused static functions would
    fail ``-Wall -Werror``, so only what the model calls is pasted.
    """
    parts = re.split(r"^/\* ==== (\w+) ==== \*/\n", _template("kernels.c"), flags=re.M)
    preamble, sections = parts[0], dict(zip(parts[1::2], parts[2::2], strict=True))
    if needed - set(sections):
        raise ValueError(f"no kernel sections {sorted(needed - set(sections))} in kernels.c")
    if needed - {"types", "concat"}:
        needed = needed | {"arith"}
    return preamble + "".join(sections[name] for name in sections if name in needed | {"types"})


def _c_array(ctype: str, name: str, values: np.ndarray, per_line: int = 16) -> str:
    flat = [str(int(v)) for v in np.asarray(values).reshape(-1)]
    rows = [", ".join(flat[i : i + per_line]) for i in range(0, len(flat), per_line)]
    body = ",\n    ".join(rows) if rows else "0"
    return f"static const {ctype} {name}[{max(len(flat), 1)}] = {{\n    {body}\n}};\n"


def _region(r: Region) -> str:
    return f"region({r.y0}, {r.x0}, {r.h}, {r.w})"


def _float(x: float) -> str:
    return f"{np.float32(x)!r}".replace("np.float32(", "").rstrip(")")


class _Writer:
    """Builds the text of the three files for one graph and memory plan."""

    def __init__(
        self, graph: ir.Graph, plan: MemoryPlan, packed: dict[int, compress.Packed] | None = None
    ) -> None:
        self.g = graph
        self.plan = plan
        self.packed = packed or {}
        self.arrays: list[str] = []
        self.params: list[str] = []
        self.body: list[str] = []
        self.const_names: dict[str, str] = {}
        self.kernels: set[str] = set()
        patch = plan.patch
        self.stage_ops = patch.stage_ops if patch is not None else 0
        self.columns = {name: k for k, name in enumerate(patch.regions[0])} if patch else {}

    # ---- names, pointers, regions

    def const(self, tensor: str) -> str:
        """C name of a weight / bias array (written to weights.h on first use)."""
        if tensor not in self.const_names:
            t = self.g[tensor]
            name = f"{'w' if t.dtype == 'int8' else 'b'}_{tensor}"
            ctype = "int8_t" if t.dtype == "int8" else "int32_t"
            self.arrays.append(_c_array(ctype, name, t.data))
            self.const_names[tensor] = name
        return self.const_names[tensor]

    def ptr(self, tensor: str) -> str:
        kind = self.plan.buffer(tensor).kind
        if kind in ("input", "output"):
            return kind
        return f"ARENA + {self.plan.offset(tensor)}"

    def scratch(self, i: int) -> str:
        if i not in self.plan.scratch:
            return "0"
        return f"ARENA + {self.plan.buffers[self.plan.scratch[i]].offset}"

    def in_stage(self, i: int) -> bool:
        return i < self.stage_ops

    def layout(self, tensor: str, i: int) -> str:
        """Region that ``tensor``'s buffer holds while op ``i`` runs."""
        held_in_part = tensor not in (self.g.input, self.plan.patch and self.plan.patch.output)
        if self.in_stage(i) and tensor in self.columns and held_in_part:
            return f"r[{self.columns[tensor]}]"
        return _region(full_region(self.g[tensor]))

    def todo(self, i: int) -> str:
        """Region of op ``i``'s output to compute."""
        op = self.g.ops[i]
        if self.in_stage(i):
            return f"r[{self.columns[op.output]}]"
        return _region(full_region(self.g[op.output]))

    def trace(self, i: int, indent: str) -> None:
        op = self.g.ops[i]
        t = self.g[op.output]
        if self.in_stage(i):
            if op.output == self.plan.patch.output:
                return  # traced whole after the patch loop
            k = self.columns[op.output]
            size = f"r[{k}].h * r[{k}].w * {t.shape[3]}"
            self.body.append(f"{indent}TRACE({i}, r[{k}], {self.ptr(op.output)}, {size});")
        else:
            region = _region(full_region(t))
            self.body.append(f"{indent}TRACE({i}, {region}, {self.ptr(op.output)}, {t.size});")

    # ---- ops

    def packed_weights(self, i: int) -> str:
        """C name of op ``i``'s packed weights (stream and table in weights.h)."""
        p = self.packed[i]
        self.arrays.append(_c_array("uint8_t", f"pk{i}_stream", np.frombuffer(p.stream, np.uint8)))
        self.arrays.append(_c_array("int8_t", f"pk{i}_table", p.table))
        fields = [
            compress.FORMAT_ID[p.format],
            p.rows,
            p.cols,
            p.code_bits,
            p.index_bits,
            p.run_bits,
            p.entries,
            f"pk{i}_stream",
            f"pk{i}_table",
        ]
        self.params.append(
            f"/* op {i} weights: {p.describe()} */\n"
            f"static const packed_t PK{i} = {{{', '.join(map(str, fields))}}};"
        )
        return f"&PK{i}"

    def call(self, kernel: str, args: str, indent: str, uses: str | None = None) -> None:
        self.kernels.add(kernel)
        if uses:
            self.kernels.add(uses)
        self.body.append(f"{indent}{kernel}_s8({args});")

    def emit(self, i: int, indent: str) -> None:
        op = self.g.ops[i]
        t_out = self.g[op.output]
        shape = "x".join(map(str, t_out.shape[1:]))
        rule = self.plan.inplace.get(i)
        note = f", in place ({rule})" if rule else ""
        self.body.append(f"{indent}/* op {i}: {op.kind} {op.name} -> {shape}{note} */")
        getattr(self, f"_{op.kind}")(i, op, indent)
        self.trace(i, indent)

    def _Conv2D(self, i: int, op: ir.Conv2D, indent: str) -> None:
        x, out, w = self.g[op.inputs[0]], self.g[op.output], self.g[op.weight]
        kh, kw = w.shape[1:3]
        mult = _c_array("int32_t", f"op{i}_mult", op.multiplier)
        shift = _c_array("int32_t", f"op{i}_shift", op.shift)
        self.arrays += [mult, shift]
        fields = [
            x.shape[1],
            x.shape[2],
            x.shape[3],
            out.shape[3],
            kh,
            kw,
            *op.stride,
            op.padding[0],
            op.padding[1],
            x.qzero,
            out.qzero,
            op.act_min,
            op.act_max,
            "0" if i in self.packed else self.const(op.weight),
            self.const(op.bias),
            f"op{i}_mult",
            f"op{i}_shift",
        ]
        self.params.append(f"static const conv_params_t OP{i} = {{{', '.join(map(str, fields))}}};")
        args = (
            f"&OP{i}, {self.ptr(op.inputs[0])}, {self.layout(op.inputs[0], i)}, "
            f"{self.ptr(op.output)}, {self.layout(op.output, i)}, {self.todo(i)}"
        )
        rule = self.plan.inplace.get(i)
        if i in self.packed:
            im2col = int(compress.scratch_bytes(self.g, op) > 0)
            pk = self.packed_weights(i)
            args = f"&OP{i}, {pk}, {args.split(', ', 1)[1]}, {im2col}, {self.scratch(i)}"
            self.call("conv2d_packed", args, indent, "packed")
        elif op.depthwise:
            self.call("dwconv", f"{args}, {self.scratch(i)}", indent)
        elif rule == "pointwise":
            self.call("pointwise", f"{args}, {self.scratch(i)}", indent)
        else:
            self.call("conv2d", args, indent)

    def _FullyConnected(self, i: int, op: ir.FullyConnected, indent: str) -> None:
        x, out = self.g[op.inputs[0]], self.g[op.output]
        self.arrays += [
            _c_array("int32_t", f"op{i}_mult", op.multiplier),
            _c_array("int32_t", f"op{i}_shift", op.shift),
        ]
        fields = [
            x.size,
            out.size,
            x.qzero,
            out.qzero,
            op.act_min,
            op.act_max,
            int(len(op.multiplier) > 1),
            "0" if i in self.packed else self.const(op.weight),
            self.const(op.bias),
            f"op{i}_mult",
            f"op{i}_shift",
        ]
        self.params.append(f"static const fc_params_t OP{i} = {{{', '.join(map(str, fields))}}};")
        io = f"{self.ptr(op.inputs[0])}, {self.ptr(op.output)}"
        if i in self.packed:
            self.call("fc_packed", f"&OP{i}, {self.packed_weights(i)}, {io}", indent, "packed")
        else:
            self.call("fc", f"&OP{i}, {io}", indent)

    def _Pool2D(self, i: int, op: ir.Pool2D, indent: str) -> None:
        x = self.g[op.inputs[0]]
        fields = [
            int(op.mode == "avg"),
            x.shape[1],
            x.shape[2],
            x.shape[3],
            *op.kernel,
            *op.stride,
            op.padding[0],
            op.padding[1],
            op.act_min,
            op.act_max,
        ]
        self.params.append(f"static const pool_params_t OP{i} = {{{', '.join(map(str, fields))}}};")
        args = (
            f"&OP{i}, {self.ptr(op.inputs[0])}, {self.layout(op.inputs[0], i)}, "
            f"{self.ptr(op.output)}, {self.layout(op.output, i)}, {self.todo(i)}"
        )
        self.call("pool", args, indent)

    def _Add(self, i: int, op: ir.Add, indent: str) -> None:
        a, b = op.inputs
        p = op.params
        out = self.g[op.output]
        channels = out.shape[-1]
        fields = [
            channels,
            self.g[a].qzero,
            self.g[b].qzero,
            out.qzero,
            p.left_shift,
            p.input1_multiplier,
            p.input1_shift,
            p.input2_multiplier,
            p.input2_shift,
            p.output_multiplier,
            p.output_shift,
            op.act_min,
            op.act_max,
        ]
        self.params.append(f"static const add_params_t OP{i} = {{{', '.join(map(str, fields))}}};")
        if len(out.shape) == 4:
            regions = [
                self.layout(a, i),
                self.layout(b, i),
                self.layout(op.output, i),
                self.todo(i),
            ]
        else:
            regions = [_region(Region(0, 0, 1, 1))] * 4
        args = (
            f"&OP{i}, {self.ptr(a)}, {regions[0]}, {self.ptr(b)}, {regions[1]}, "
            f"{self.ptr(op.output)}, {regions[2]}, {regions[3]}"
        )
        self.call("add", args, indent)

    def _Reshape(self, i: int, op: ir.Reshape, indent: str) -> None:
        self.body.append(f"{indent}/* same bytes as {op.inputs[0]} */")

    def _Concat(self, i: int, op: ir.Concat, indent: str) -> None:
        out = self.g[op.output]
        outer = int(np.prod(out.shape[: op.axis]))
        out_inner = int(np.prod(out.shape[op.axis :]))
        offset = 0
        for name in op.inputs:
            inner = int(np.prod(self.g[name].shape[op.axis :]))
            args = (
                f"{self.ptr(name)}, {outer}, {inner}, {self.ptr(op.output)}, {out_inner}, {offset}"
            )
            self.call("concat", args, indent)
            offset += inner

    def _Softmax(self, i: int, op: ir.Softmax, indent: str) -> None:
        out = self.g[op.output]
        depth = out.shape[-1]
        p = op.params
        fields = [out.size // depth, depth, p.input_multiplier, p.input_left_shift, p.diff_min]
        self.params.append(
            f"static const softmax_params_t OP{i} = {{{', '.join(map(str, fields))}}};"
        )
        self.call("softmax", f"&OP{i}, {self.ptr(op.inputs[0])}, {self.ptr(op.output)}", indent)

    def _Requantize(self, i: int, op: ir.Requantize, indent: str) -> None:
        x, out = self.g[op.inputs[0]], self.g[op.output]
        fields = [out.size, x.qzero, out.qzero, op.multiplier, op.shift]
        self.params.append(
            f"static const requant_params_t OP{i} = {{{', '.join(map(str, fields))}}};"
        )
        self.call("requantize", f"&OP{i}, {self.ptr(op.inputs[0])}, {self.ptr(op.output)}", indent)

    # ---- whole files

    def run(self) -> dict[str, str]:
        patch = self.plan.patch
        tables = ""
        if patch is not None:
            rows = []
            for regions in patch.regions:
                cells = ", ".join(f"{{{r.y0}, {r.x0}, {r.h}, {r.w}}}" for r in regions.values())
                rows.append(f"    {{{cells}}}")
            tables = (
                f"/* patch-based stage: ops 0..{patch.stage_ops - 1} run once per patch; row p "
                f"holds the region of each stage tensor ({', '.join(patch.regions[0])}) */\n"
                f"static const region_t PATCHES[{len(patch.regions)}][{len(self.columns)}] = {{\n"
                + ",\n".join(rows)
                + "\n};\n"
            )
            self.body.append("    {")
            self.body.append("        int32_t p;")
            self.body.append(f"        for (p = 0; p < {len(patch.regions)}; ++p) {{")
            self.body.append("            const region_t *r = PATCHES[p];")
            for i in range(patch.stage_ops):
                self.emit(i, " " * 12)
            self.body.append("        }")
            last = patch.stage_ops - 1
            t = self.g[patch.output]
            self.body.append(
                f"        TRACE({last}, {_region(full_region(t))}, {self.ptr(patch.output)}, "
                f"{t.size});"
            )
            self.body.append("    }")
        for i in range(self.stage_ops, len(self.g.ops)):
            self.emit(i, "    ")
        return self._files(tables)

    def _files(self, tables: str) -> dict[str, str]:
        g = self.g
        inp, out = g[g.input], g[g.output]
        name = g.name
        guard_h = "EDGESLIM_MODEL_H"
        guard_w = "EDGESLIM_WEIGHTS_H"
        arena = self.plan.arena_size
        layout = {4: "NHWC", 2: "N x features"}
        header = Template(_template("model.h.tmpl")).substitute(
            name=name,
            version=__version__,
            guard=guard_h,
            input_layout=f"{layout.get(len(inp.shape), '')} {'x'.join(map(str, inp.shape))}",
            output_layout=f"{'x'.join(map(str, out.shape))}",
            input_size=inp.size,
            output_size=out.size,
            input_scale=_float(inp.qscale),
            input_zero_point=inp.qzero,
            output_scale=_float(out.qscale),
            output_zero_point=out.qzero,
            arena_size=arena,
        )
        source = Template(_template("model.c.tmpl")).substitute(
            name=name,
            version=__version__,
            summary=f"{len(g.ops)} ops, {g.macs():,} MACs; {self.plan.summary()}"
            + "".join(
                f"\n * {line}" for line in (compress.summary(g, self.packed) if self.packed else [])
            ),
            kernels=_kernels(self.kernels),
            arena_note=f"activations: {self.plan.summary()}",
            arena_alloc=max(arena, 1),
            params="\n".join(self.params) + "\n",
            patch_tables=tables,
            body="\n".join(self.body),
        )
        nbytes = constant_bytes(g, self.packed)
        weights = Template(_template("weights.h.tmpl")).substitute(
            name=name,
            version=__version__,
            guard=guard_w,
            nbytes=f"{nbytes:,}",
            arrays="\n".join(self.arrays),
        )
        return {"model.h": header, "model.c": source, "weights.h": weights}


def generate(
    graph: ir.Graph, plan: MemoryPlan, packed: dict[int, compress.Packed] | None = None
) -> dict[str, str]:
    """The text of ``model.h``, ``model.c`` and ``weights.h`` for ``graph`` laid out by
    ``plan``; the layers in ``packed`` (:func:`.compress.choose`) keep compressed weights."""
    return _Writer(graph, plan, packed).run()


def constant_bytes(graph: ir.Graph, packed: dict[int, compress.Packed] | None = None) -> int:
    """Bytes of constants in ``weights.h``: :meth:`ir.Graph.constant_bytes` with the packed
    layers' weights counted in their compressed form."""
    saved = sum(p.dense_bytes - p.nbytes for p in (packed or {}).values())
    return graph.constant_bytes() - saved


# --------------------------------------------------------------------------------------
# building and running the generated code
# --------------------------------------------------------------------------------------


def compiler() -> str | None:
    """The C compiler to use: ``$CC`` or ``gcc``, if it exists."""
    return shutil.which(os.environ.get("CC", "gcc"))


class Build:
    """The generated files compiled with the test driver in a temporary directory.

    ``sanitize=False`` leaves out ``-fsanitize=undefined`` (for timing).
    """

    def __init__(
        self, sources: dict[str, str], *, trace: bool = False, sanitize: bool = True
    ) -> None:
        cc = compiler()
        if cc is None:
            raise ExportError("no C compiler found (set CC or install gcc)")
        self.dir = Path(tempfile.mkdtemp(prefix="edgeslim-c-"))
        for name, text in sources.items():
            (self.dir / name).write_text(text, encoding="utf-8")
        (self.dir / "harness.c").write_text(_template("harness.c"), encoding="utf-8")
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

    def run(self, q: np.ndarray, output_size: int, trace: bool = False):
        """Outputs (N, output_size) for int8 inputs ``q`` (N, ...); with ``trace`` also the log."""
        q = np.ascontiguousarray(q, dtype=np.int8)
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
        (self.dir / "one.bin").write_bytes(np.ascontiguousarray(q, dtype=np.int8).tobytes())
        proc = subprocess.run(
            [str(self.exe), "time", "one.bin", str(repeats)],
            cwd=self.dir,
            capture_output=True,
            text=True,
            check=True,
        )
        return float(proc.stdout.strip())

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Build:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
