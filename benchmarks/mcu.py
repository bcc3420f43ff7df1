"""edgeslim's C99 export vs TFLite Micro on the same int8 models, in one run.

For LeNet-5, the MobileNetV2-style net and the DS-CNN keyword-spotting net (seeded random
weights, int8 qparams from 64 real MNIST digits, resized to 49x10 for the DS-CNN):

- **RAM**: edgeslim's static arena (in-place rules; and with patch-based execution of the
  first layers) against TFLite Micro's arena, head (activations) + tail (interpreter
  overhead), from its allocation report. edgeslim reads the input and writes the output in
  the caller's buffers, so "ours + io" adds those bytes. The headline baseline is TFLite
  Micro on the same graph *without PAD ops*: PyTorch's symmetric padding at stride 2 needs
  explicit PAD ops in TFLite (MobileNetV2), which our own exporter writes and which cost
  TFLite Micro two padded copies of feature maps, so TFLite Micro runs a copy of the graph
  with TFLite SAME padding instead (same shapes, no PAD ops, not the same numbers). The
  exported file with its PAD ops is measured too, beside it, never as the headline.
- **Flash**: ``.text`` + ``.rodata`` of ``model.c`` compiled with gcc -O2 on this host against
  the size of the ``.tflite`` file (which TFLite Micro needs in flash besides its own code).
- **Latency on this host**: our compiled C (``-O2``, no sanitizer) against TFLite Micro's
  ``invoke()`` from Python, median of 100 runs each, one input.
- **Bit-exactness**: outputs of the reference interpreter, our C and TFLite Micro on 8 real
  inputs (must be identical).

On a Cortex-M (needs ``arm-none-eabi-gcc`` and ``qemu-system-arm``; skipped otherwise):

- **Deep Compression on the microcontroller**: LeNet-5 and LeNet-300-100 after the shipped
  recipes (``recipes/deep_compression_*.yaml``, run with ``es.run_recipe`` into ``--runs``,
  resumed when already there), exported dense int8 and with compressed weights
  (``export/c/compress.py``), built for Cortex-M4 (``-Os`` and ``-O2``) and run on QEMU
  ``mps2-an386``: flash (``model.o``'s text + rodata + data in the ARM link) beside the
  ``.slim`` and ``.tflite`` sizes, instructions per inference (``-icount``), bit-exactness of
  QEMU = host C = reference = TFLite Micro (dense equivalent) on 8 test digits.
- **Int8 nets on Cortex-M4**: MobileNetV2-style, DS-CNN, ResNet-8 (seeded random weights;
  ResNet-8 quantized with ``Int8PTQ`` first) and a small net with two inputs and two outputs
  (``TwoInTwoHeads``: ``model_run`` with two input and two output pointers): flash, SRAM
  (arena + stack painted on QEMU + caller I/O), instructions per inference, the device
  model's predicted instructions and latency (fitted per op type by
  ``benchmarks/mcu_latency.py``) against the count, and the old 5-cycles-per-MAC estimate
  beside it.

Run under the CPU lock: ``flock /tmp/edgeslim-cpu.lock python benchmarks/mcu.py``.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch import nn

import edgeslim as es
from edgeslim import load_data, zoo
from edgeslim.core.models.kws import ds_cnn
from edgeslim.core.timing import median_ms
from edgeslim.export import int8, tflite, tflite_format
from edgeslim.export.c import arm, codegen, compress, hostbuild, packed_scratch, planner
from edgeslim.export.c.workload import workload
from edgeslim.export.int8 import ir, reference
from edgeslim.profiling.devices import load_device

REPEATS = 100
TARGET_PLAIN, TARGET_PATCH = 0.7, 0.4  # MobileNetV2 arena vs TFLite Micro's total, no PAD


def inputs(model, n: int, split: str) -> torch.Tensor:
    data = load_data("mnist")
    x = (data.train if split == "train" else data.test).x[:n]
    shape = tuple(model.input_shape)
    if tuple(x.shape[1:]) != shape:
        x = F.interpolate(x, size=shape[1:], mode="bilinear", align_corners=False)
    return x


def same_padding_variant(graph: ir.Graph) -> ir.Graph:
    """A copy whose convs use TFLite SAME padding where PyTorch's needs a PAD op."""
    g = copy.deepcopy(graph)
    for op in g.ops:
        if not isinstance(op, ir.Conv2D):
            continue
        x, out = g[op.inputs[0]], g[op.output]
        kernel = g.kernel_of(op)
        if tflite_format.tflite_padding(
            x.shape[1:3], out.shape[1:3], kernel, op.stride, op.padding
        ):
            continue
        pads = [
            tflite_format._same_padding(x.shape[1 + i], kernel[i], op.stride[i]) for i in (0, 1)
        ]
        op.padding = (pads[0][1], pads[1][1], pads[0][2], pads[1][2])
    return g


def tflm_latency_us(data: bytes, q: np.ndarray) -> float:
    interp = tflite.tflm_interpreter(data)
    interp.set_input(q, 0)
    return median_ms(interp.invoke, REPEATS, warmup=1) * 1e3


def measure(name: str, model) -> dict:
    model.eval()
    graph = int8.lower(model, inputs(model, 64, "train"), name=name)
    q = reference.quantize_input(graph, inputs(model, 8, "test").numpy())
    data = tflite_format.serialize(graph)
    plain = planner.plan_memory(graph)
    patched = planner.search_patch(graph, max_mac_overhead=0.3)
    io = graph[graph.input].nbytes + graph[graph.output].nbytes
    arena = tflite.tflm_arena(data)
    same = tflite.tflm_arena(tflite_format.serialize(same_padding_variant(graph)))
    sources = codegen.generate(graph, plain)
    sizes = hostbuild.object_size(sources)
    expected = reference.run_batch(graph, q)
    with hostbuild.Build(sources) as build:
        exact_c = np.array_equal(build.run(q, graph[graph.output].size), expected)
    with hostbuild.Build(codegen.generate(graph, patched)) as build:
        exact_c &= np.array_equal(build.run(q, graph[graph.output].size), expected)
    exact_tflm = np.array_equal(tflite.run_tflm(graph, data, q), expected)
    with hostbuild.Build(sources, sanitize=False) as build:
        ours_us = build.time_us(q[:1], REPEATS)
    return {
        "name": name,
        "macs": graph.macs(),
        "ours": plain.arena_size,
        "lower_bound": plain.lower_bound,
        "patch": patched.arena_size,
        "patch_plan": patched.patch,
        "io": io,
        "tflm": arena,
        "tflm_same": same,
        "pad_ops": len(data) != len(tflite_format.serialize(same_padding_variant(graph))),
        "flash": sizes["text"] + sizes["rodata"],
        "text": sizes["text"],
        "tflite_bytes": len(data),
        "ours_us": ours_us,
        "tflm_us": tflm_latency_us(data, q[:1]),
        "exact": exact_c and exact_tflm,
    }


GOALS = {"lenet5": 64 * 1024, "lenet300": 40 * 1024}  # flash of the whole model, bytes
N_ARM = 8  # test inputs run on QEMU
OLD_CYCLES_PER_MAC = 5.0  # the stm32f446 profile's latency model before the QEMU fit


def arm_measure(graph: ir.Graph, packed: dict, q: np.ndarray, opt: str = "-Os") -> dict:
    """ARM build for Cortex-M4 + QEMU run: sizes, instructions, stack, bit-exactness."""
    plan = planner.plan_memory(graph, scratch=packed_scratch(graph, packed))
    sources = codegen.generate(graph, plan, packed)
    expected = reference.run_batch(graph, q)
    with hostbuild.Build(sources) as build:
        host = build.run(q, reference.output_size(graph))
    built = arm.build(graph, sources, "cortex-m4", q, opt=opt)  # raises unless bit-exact
    return {
        "flash": built.flash,
        "text": built.model["text"],
        "arena": plan.arena_size,
        "sram": built.sram,
        "stack": built.stack,
        "instructions": built.instructions,
        "predicted": load_device("stm32f446")
        .instructions()
        .instructions(workload(graph, packed, plan)),
        "exact": bool(
            np.array_equal(built.run.outputs, host)
            and np.array_equal(host, expected.reshape(host.shape))
        ),
    }


def deep_compression(runs: Path) -> list[dict]:
    rows = []
    test = load_data("mnist").test.x[:N_ARM].numpy()
    calib = load_data("mnist").train.x[:64]
    for name in ("lenet5", "lenet300"):
        res = es.run_recipe(f"recipes/deep_compression_{name}.yaml", runs / name, progress=False)
        model = res.model.eval()
        graph = int8.lower(model, calib, name=name)
        q = reference.quantize_input(graph, test.reshape(len(test), *model.input_shape))
        packed = compress.choose(graph, "auto")
        data = tflite_format.serialize(graph)
        row = {
            "name": name,
            "slim": int(res.rows[-1]["size_bytes"]),
            "accuracy": float(res.rows[-1]["accuracy"]),
            "tflite": len(data),
            "tflm_exact": bool(
                tflite.tflm_available()
                and np.array_equal(tflite.run_tflm(graph, data, q), reference.run_batch(graph, q))
            ),
            "layers": compress.summary(graph, packed),
            "macs": graph.macs(),
        }
        for opt in ("-Os", "-O2"):
            row[f"dense{opt}"] = arm_measure(graph, {}, q, opt)
            row[f"packed{opt}"] = arm_measure(graph, packed, q, opt)
        rows.append(row)
    return rows


class TwoInTwoHeads(nn.Module):
    """Several inputs and outputs: a 28x28 digit and a second 28x28 map (the digit shifted
    by 2 pixels, standing in for a second sensor), a strided conv each, added; a shared
    trunk; two heads (10 digits, 2 parities)."""

    input_shape = ((1, 28, 28), (1, 28, 28))

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 8, 3, stride=2, padding=1)
        self.b = nn.Conv2d(1, 8, 3, stride=2, padding=1)
        self.c = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16 * 7 * 7, 32)
        self.digit = nn.Linear(32, 10)
        self.parity = nn.Linear(32, 2)

    def forward(self, image: torch.Tensor, aux: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = torch.relu(self.a(image)) + torch.relu(self.b(aux))
        h = torch.relu(self.fc(torch.flatten(torch.relu(self.c(x)), 1)))
        return self.digit(h), self.parity(h)


def two_inputs(n: int, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    x = inputs(zoo.create("lenet5"), n, split)
    return x, torch.roll(x, shifts=(2, 2), dims=(2, 3))


def int8_nets() -> list[dict]:
    dev = load_device("stm32f446")
    rows = []
    torch.manual_seed(0)
    for name, model in (
        ("mobilenetv2", zoo.create("mobilenetv2")),
        ("ds_cnn", ds_cnn()),
        ("resnet8 (Int8PTQ)", zoo.create("resnet8")),
        ("two inputs, two heads", TwoInTwoHeads()),
    ):
        model.eval()
        several = isinstance(model, TwoInTwoHeads)
        calib = two_inputs(64, "train") if several else inputs(model, 64, "train")
        if "Int8PTQ" in name:  # quantized by edgeslim first: the quantize-then-export path
            model = es.quantize(model, es.Int8PTQ(), calib=calib).eval()
        graph = int8.lower(model, calib, name=name.split()[0].replace(",", ""))
        test = two_inputs(N_ARM, "test") if several else inputs(model, N_ARM, "test")
        q = reference.quantize_input(
            graph, tuple(x.numpy() for x in test) if several else test.numpy()
        )
        packed = compress.choose(graph, "auto")  # random dense weights: nothing to compress
        r = arm_measure(graph, packed, q)
        plan = planner.plan_memory(graph, scratch=packed_scratch(graph, packed))
        work = workload(graph, packed, plan)
        r.update(
            name=name,
            macs=graph.macs(),
            estimate_ms=dev.latency_ms(work),
            old_ms=graph.macs() * OLD_CYCLES_PER_MAC / (dev.clock_mhz * 1e3),
        )
        rows.append(r)
    return rows


def arm_tables(console: Console, dc: list[dict], nets: list[dict]) -> bool:
    ok = True
    t = Table(title="Deep Compression on Cortex-M4 (ARM link, QEMU mps2-an386)")
    cols = ["model", ".slim", ".tflite", "flash dense -Os", "flash compressed -Os"]
    cols += ["x smaller", "goal", "flash dense -O2", "flash compressed -O2"]
    cols += ["instr. dense -Os", "instr. compressed -Os", "instr. dense -O2"]
    cols += ["instr. compressed -O2", "arena (compressed)", "stack", "bit-exact"]
    for c in cols:
        t.add_column(c, justify="right")
    for r in dc:
        d, p = r["dense-Os"], r["packed-Os"]
        d2, p2 = r["dense-O2"], r["packed-O2"]
        goal = GOALS[r["name"]]
        met = p["flash"] <= goal
        exact = all(x["exact"] for x in (d, p, d2, p2)) and r["tflm_exact"]
        ok &= exact
        t.add_row(
            r["name"],
            f"{r['slim']:,}",
            f"{r['tflite']:,}",
            f"{d['flash']:,}",
            f"{p['flash']:,}",
            f"{d['flash'] / p['flash']:.1f}x",
            f"<= {goal:,}: {'met' if met else 'MISSED'}",
            f"{d2['flash']:,}",
            f"{p2['flash']:,}",
            f"{d['instructions']:,}",
            f"{p['instructions']:,}",
            f"{d2['instructions']:,}",
            f"{p2['instructions']:,}",
            f"{p['arena']:,}",
            f"{p['stack']:,}",
            "yes" if exact else "NO",
        )
    console.print(t)
    for r in dc:
        print(f"{r['name']} (recipe accuracy {r['accuracy']:.3f}, {r['macs']:,} dense MACs):")
        for line in r["layers"]:
            print(f"  {line}")
    t = Table(title="Int8 nets on Cortex-M4 (-Os, QEMU mps2-an386; STM32F446 device model)")
    for c in ("model", "MACs", "flash", "arena", "stack", "SRAM (+io)", "instructions"):
        t.add_column(c, justify="right")
    for c in ("instr./MAC", "model instr.", "model error", "device model ms"):
        t.add_column(c, justify="right")
    for c in ("old model ms (5 cyc/MAC)", "instr. at 180 MHz, 1/cycle (ms)"):
        t.add_column(c, justify="right")
    t.add_column("bit-exact", justify="right")
    for r in nets:
        ok &= r["exact"]
        t.add_row(
            r["name"],
            f"{r['macs']:,}",
            f"{r['flash']:,}",
            f"{r['arena']:,}",
            f"{r['stack']:,}",
            f"{r['sram']:,}",
            f"{r['instructions']:,}",
            f"{r['instructions'] / r['macs']:.2f}",
            f"{r['predicted']:,.0f}",
            f"{100 * (r['predicted'] - r['instructions']) / r['instructions']:+.1f}%",
            f"{r['estimate_ms']:.2f}",
            f"{r['old_ms']:.2f}",
            f"{r['instructions'] / 180e3:.2f}",
            "yes" if r["exact"] else "NO",
        )
    console.print(t)
    builds = [(x["name"], x) for x in nets]
    for r in dc:
        builds += [
            (f"{r['name']} dense", r["dense-Os"]),
            (f"{r['name']} compressed", r["packed-Os"]),
        ]
    print("device model (instructions fitted per op type, benchmarks/mcu_latency.py) vs QEMU, -Os:")
    errs = []
    for name, b in builds:
        err = (b["predicted"] - b["instructions"]) / b["instructions"]
        errs.append(abs(err))
        print(f"  {name}: {b['predicted']:,.0f} vs {b['instructions']:,} ({100 * err:+.1f}%)")
    print(f"  |error| mean {100 * np.mean(errs):.1f}%, max {100 * np.max(errs):.1f}%")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="/tmp/edgeslim-mcu-runs", help="recipe run dirs")
    parser.add_argument("--arm-only", action="store_true", help="only the Cortex-M tables")
    args = parser.parse_args()
    console = Console(width=250)
    arm_ok = True
    if arm.missing():
        print(f"Cortex-M tables skipped: {arm.missing()}")
    else:
        dc = deep_compression(Path(args.runs))
        nets = int8_nets()
        arm_ok = arm_tables(console, dc, nets)
    if args.arm_only:
        return 0 if arm_ok else 1
    if not tflite.tflm_available() or hostbuild.compiler() is None:
        print("needs tflite-micro (pip install 'edgeslim[mcu]') and gcc")
        return 2
    torch.manual_seed(0)
    nets = [
        ("lenet5", zoo.create("lenet5")),
        ("mobilenetv2", zoo.create("mobilenetv2")),
        ("ds_cnn", ds_cnn()),
    ]
    rows = [measure(name, model) for name, model in nets]

    ram = Table(title="RAM: edgeslim arena vs TFLite Micro arena (same graph, no PAD ops)")
    for col in (
        "model",
        "ours",
        "lower bound",
        "ours, patches",
        "patch plan",
        "caller io",
        "TFLM head",
        "TFLM tail",
        "TFLM total",
        "ours / TFLM",
        "patches / TFLM",
        "TFLM total (exported file, PAD ops)",
        "ours / it",
        "patches / it",
    ):
        ram.add_column(col, justify="right")
    for r in rows:
        s, t = r["tflm"], r["tflm_same"]  # t: the headline baseline (no PAD ops)
        p = r["patch_plan"]
        plan = "-"
        if p is not None:
            extra = f"+{100 * p.mac_overhead:.1f}% MACs"
            plan = f"{p.grid[0]}x{p.grid[1]}, ops 0-{p.stage_ops - 1}, {extra}"
        ram.add_row(
            r["name"],
            f"{r['ours']:,}",
            f"{r['lower_bound']:,}",
            f"{r['patch']:,}",
            plan,
            f"{r['io']:,}",
            f"{t['head']:,}",
            f"{t['tail']:,}",
            f"{t['total']:,}",
            f"{r['ours'] / t['total']:.3f}",
            f"{r['patch'] / t['total']:.3f}",
            f"{s['total']:,}" + (" *" if r["pad_ops"] else ""),
            f"{r['ours'] / s['total']:.3f}",
            f"{r['patch'] / s['total']:.3f}",
        )
    console.print(ram)
    console.print(
        "TFLM: TFLite Micro on the graph with TFLite SAME padding (same shapes, no PAD ops); "
        "* the exported file has PAD ops (PyTorch pads stride-2 convs symmetrically), which "
        "cost TFLite Micro padded copies: shown beside, not the headline."
    )

    other = Table(title=f"Flash, host latency (median of {REPEATS}), bit-exactness")
    columns = ["model", "MACs", "ours text+rodata", "(text)", ".tflite", "ours / .tflite"]
    columns += ["ours C (us)", "TFLM invoke (us)", "TFLM / ours", "bit-exact (ref = C = TFLM)"]
    for col in columns:
        other.add_column(col, justify="right")
    for r in rows:
        other.add_row(
            r["name"],
            f"{r['macs']:,}",
            f"{r['flash']:,}",
            f"{r['text']:,}",
            f"{r['tflite_bytes']:,}",
            f"{r['flash'] / r['tflite_bytes']:.3f}",
            f"{r['ours_us']:.1f}",
            f"{r['tflm_us']:.1f}",
            f"{r['tflm_us'] / r['ours_us']:.2f}x",
            "yes" if r["exact"] else "NO",
        )
    console.print(other)

    mbv2 = next(r for r in rows if r["name"] == "mobilenetv2")
    total, padded = mbv2["tflm_same"]["total"], mbv2["tflm"]["total"]
    for label, key, target in (("arena", "ours", TARGET_PLAIN), ("patches", "patch", TARGET_PATCH)):
        ratio = mbv2[key] / total
        verdict = "met" if ratio <= target else "MISSED"
        print(
            f"MobileNetV2 {label} <= {target}x TFLite Micro's total on the same graph without "
            f"PAD ops: {ratio:.3f} ({verdict}; {mbv2[key] / padded:.3f} against the exported "
            "file with PAD ops)"
        )
    return 0 if all(r["exact"] for r in rows) and arm_ok else 1


if __name__ == "__main__":
    sys.exit(main())
