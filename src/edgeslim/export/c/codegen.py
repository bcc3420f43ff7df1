"""C99 code generator: ``model.h``, ``model.c`` and ``weights.h`` from the integer graph.

The files are filled from templates (``templates/*.tmpl``, :class:`string.Template`); the
kernels (``templates/kernels.c``) are pasted into ``model.c`` as they are. ``model.c`` holds
one static arena laid out by the memory plan (:mod:`.planner`), a ``static const`` parameter
struct per op and ``model_run``, which calls the kernels in order with arena offsets; a
patch-based stage becomes a loop over a table of regions. ``weights.h`` holds the int8
weights, int32 biases and per-channel multipliers and shifts. No malloc, no floating point.

:mod:`.hostbuild` compiles and runs the files on this machine.
"""

from __future__ import annotations

import re
from importlib.resources import files
from string import Template

import numpy as np

from edgeslim.core.version import __version__
from edgeslim.export.c import compress
from edgeslim.export.c.codegen_seq import SeqEmitters
from edgeslim.export.c.planner import MemoryPlan, Region, full_region
from edgeslim.export.int8 import ir, reference


def template(name: str) -> str:
    """The text of ``templates/NAME`` (a C source, header or linker script)."""
    return (files("edgeslim.export.c") / "templates" / name).read_text(encoding="utf-8")


def _kernels(needed: set[str]) -> str:
    """The preamble and the sections of ``templates/kernels.c`` that ``needed`` names.

    Sections start with a ``/* ==== name ==== */`` line; unused static functions would
    fail ``-Wall -Werror``, so only what the model calls is pasted.
    """
    text = template("kernels.c") + "\n" + template("kernels_seq.c")
    parts = re.split(r"^/\* ==== (\w+) ==== \*/\n", text, flags=re.M)
    preamble, sections = parts[0], dict(zip(parts[1::2], parts[2::2], strict=True))
    if needed - set(sections):
        raise ValueError(f"no kernel sections {sorted(needed - set(sections))} in kernels.c")
    if needed - {"types", "concat", "lut", "transpose", "constant", "gather"}:
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


class _Writer(SeqEmitters):
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
        buf = self.plan.buffer(tensor)
        if buf.kind in ("input", "output"):
            rel = buf.members[tensor].rel
            name = io_name(self.g, buf.kind, buf.port)
            return f"{name} + {rel}" if rel else name
        return f"ARENA + {self.plan.offset(tensor)}"

    def scratch(self, i: int) -> str:
        if i not in self.plan.scratch:
            return "0"
        return f"ARENA + {self.plan.buffers[self.plan.scratch[i]].offset}"

    def in_stage(self, i: int) -> bool:
        return i < self.stage_ops

    def layout(self, tensor: str, i: int) -> str:
        """Region that ``tensor``'s buffer holds while op ``i`` runs."""
        held_in_part = tensor not in self.g.inputs and tensor != (
            self.plan.patch and self.plan.patch.output
        )
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
            *p.values(),
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

    def _lut(self, i: int, op: ir.Op, indent: str) -> None:
        self.arrays.append(_c_array("int8_t", f"op{i}_table", reference.lookup_table(self.g, op)))
        size = self.g[op.output].size
        args = f"op{i}_table, {self.ptr(op.inputs[0])}, {self.ptr(op.output)}, {size}"
        self.call("lut", args, indent)

    _Logistic = _lut
    _HardSwish = _lut

    def _Mul(self, i: int, op: ir.Mul, indent: str) -> None:
        a, b = (self.g[n] for n in op.inputs)
        out = self.g[op.output]
        gate = 0 if b.shape == out.shape else b.size  # (1, 1, 1, C): broadcast over H, W
        p = op.params
        fields = [
            out.size,
            gate,
            a.qzero,
            b.qzero,
            out.qzero,
            p.multiplier,
            p.shift,
            op.act_min,
            op.act_max,
        ]
        self.params.append(f"static const mul_params_t OP{i} = {{{', '.join(map(str, fields))}}};")
        args = f"&OP{i}, {self.ptr(op.inputs[0])}, {self.ptr(op.inputs[1])}, {self.ptr(op.output)}"
        self.call("mul", args, indent)

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
        ports = [("input", n) for n in range(len(g.inputs))]
        ports += [("output", n) for n in range(len(g.outputs))]
        params = ", ".join(
            f"{'const ' if kind == 'input' else ''}int8_t *{io_name(g, kind, n)}"
            for kind, n in ports
        )
        unused = "".join(f"    (void){io_name(g, kind, n)};\n" for kind, n in ports)
        header = _multi_io_header(g, arena, layout) if g.multi_io else None
        header = header or Template(template("model.h.tmpl")).substitute(
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
        source = Template(template("model.c.tmpl")).substitute(
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
            run_params=params,
            unused_io=unused,
            patch_tables=tables,
            body="\n".join(self.body)
            + ("\n    (void)ARENA; /* no activation lives in the arena */" if arena == 0 else ""),
        )
        nbytes = constant_bytes(g, self.packed)
        weights = Template(template("weights.h.tmpl")).substitute(
            name=name,
            version=__version__,
            guard=guard_w,
            nbytes=f"{nbytes:,}",
            arrays="\n".join(self.arrays),
        )
        return {"model.h": header, "model.c": source, "weights.h": weights}


def io_name(graph: ir.Graph, kind: str, port: int) -> str:
    """The C parameter of ``model_run`` that holds input / output ``port`` (``kind``):
    ``input`` and ``output`` for a graph with one of each, else ``input0``, ``output1`` ..."""
    return f"{kind}{port}" if graph.multi_io else kind


def _multi_io_header(graph: ir.Graph, arena: int, layout: dict[int, str]) -> str:
    """``model.h`` of a graph with several inputs or outputs: one pointer per input and
    output in ``model_run``, ``MODEL_INPUTk_*`` / ``MODEL_OUTPUTk_*`` for each, and
    ``MODEL_RUN_PACKED(in, out)`` for callers that hold them back to back."""
    docs, defines, packed = [], [], []
    offsets = {"input": 0, "output": 0}
    for kind, names in (("input", graph.inputs), ("output", graph.outputs)):
        for n, tensor in enumerate(names):
            t = graph[tensor]
            c = io_name(graph, kind, n)
            up = c.upper()
            shape = f"{layout.get(len(t.shape), '')} {'x'.join(map(str, t.shape))}".strip()
            formula = (
                f"q = round(x / MODEL_{up}_SCALE) + MODEL_{up}_ZERO_POINT"
                if kind == "input"
                else f"y = (q - MODEL_{up}_ZERO_POINT) * MODEL_{up}_SCALE"
            )
            docs.append(f" *   {c} ({shape}): {formula}")
            defines += [
                f"#define MODEL_{up}_SIZE {t.size}",
                f"#define MODEL_{up}_SCALE {_float(t.qscale)}f",
                f"#define MODEL_{up}_ZERO_POINT {t.qzero}",
            ]
            at = offsets[kind]
            packed.append(
                f"({'in' if kind == 'input' else 'out'}) + {at}"
                if at
                else f"({'in' if kind == 'input' else 'out'})"
            )
            offsets[kind] += t.size
    params = ", ".join(
        [f"const int8_t *{io_name(graph, 'input', n)}" for n in range(len(graph.inputs))]
        + [f"int8_t *{io_name(graph, 'output', n)}" for n in range(len(graph.outputs))]
    )
    return Template(template("model_multi_io.h.tmpl")).substitute(
        name=graph.name,
        version=__version__,
        guard="EDGESLIM_MODEL_H",
        n_inputs=len(graph.inputs),
        n_outputs=len(graph.outputs),
        io_doc="\n".join(docs),
        io_defines="\n".join(defines),
        input_size=offsets["input"],
        output_size=offsets["output"],
        arena_size=arena,
        run_params=params,
        packed_args=", ".join(packed),
    )


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
