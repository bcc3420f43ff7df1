"""edgeslim's C99 export vs TFLite Micro on the same int8 models, in one run.

For LeNet-5, the MobileNetV2-style net and the DS-CNN keyword-spotting net (seeded random
weights, int8 qparams from 64 real MNIST digits, resized to 49x10 for the DS-CNN):

- **RAM**: edgeslim's static arena (in-place rules; and with patch-based execution of the
  first layers) against TFLite Micro's arena for the same ``.tflite`` file, head
  (activations) + tail (interpreter overhead), from its allocation report. edgeslim reads the
  input and writes the output in the caller's buffers, so "ours + io" adds those bytes.
  PyTorch's symmetric padding at stride 2 needs explicit PAD ops in TFLite (MobileNetV2);
  TFLite Micro is also measured on a copy of the file with TFLite SAME padding instead
  (same shapes, no PAD ops, not the same numbers), the fairer baseline.
- **Flash**: ``.text`` + ``.rodata`` of ``model.c`` compiled with gcc -O2 on this host against
  the size of the ``.tflite`` file (which TFLite Micro needs in flash besides its own code).
- **Latency on this host**: our compiled C (``-O2``, no sanitizer) against TFLite Micro's
  ``invoke()`` from Python, median of 100 runs each, one input.
- **Bit-exactness**: outputs of the reference interpreter, our C and TFLite Micro on 8 real
  inputs (must be identical).

Run under the CPU lock: ``flock /tmp/edgeslim-cpu.lock python benchmarks/mcu.py``.
"""

from __future__ import annotations

import copy
import sys

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from edgeslim import load_data, zoo
from edgeslim.core.models.kws import ds_cnn
from edgeslim.core.timing import median_ms
from edgeslim.export import int8, tflite
from edgeslim.export.c import codegen, planner
from edgeslim.export.int8 import ir, reference

REPEATS = 100
TARGET_PLAIN, TARGET_PATCH = 0.7, 0.4  # MobileNetV2 arena vs TFLite Micro's total


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
        if tflite.tflite_padding(x.shape[1:3], out.shape[1:3], kernel, op.stride, op.padding):
            continue
        pads = [tflite._same_padding(x.shape[1 + i], kernel[i], op.stride[i]) for i in (0, 1)]
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
    data = tflite.serialize(graph)
    plain = planner.plan_memory(graph)
    patched = planner.search_patch(graph, max_mac_overhead=0.3)
    io = graph[graph.input].nbytes + graph[graph.output].nbytes
    arena = tflite.tflm_arena(data)
    same = tflite.tflm_arena(tflite.serialize(same_padding_variant(graph)))
    sources = codegen.generate(graph, plain)
    sizes = codegen.object_size(sources)
    expected = reference.run_batch(graph, q)
    with codegen.Build(sources) as build:
        exact_c = np.array_equal(build.run(q, graph[graph.output].size), expected)
    with codegen.Build(codegen.generate(graph, patched)) as build:
        exact_c &= np.array_equal(build.run(q, graph[graph.output].size), expected)
    exact_tflm = np.array_equal(tflite.run_tflm(graph, data, q), expected)
    with codegen.Build(sources, sanitize=False) as build:
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
        "pad_ops": len(data) != len(tflite.serialize(same_padding_variant(graph))),
        "flash": sizes["text"] + sizes["rodata"],
        "text": sizes["text"],
        "tflite_bytes": len(data),
        "ours_us": ours_us,
        "tflm_us": tflm_latency_us(data, q[:1]),
        "exact": exact_c and exact_tflm,
    }


def main() -> int:
    if not tflite.tflm_available() or codegen.compiler() is None:
        print("needs tflite-micro (pip install 'edgeslim[mcu]') and gcc")
        return 2
    torch.manual_seed(0)
    nets = [
        ("lenet5", zoo.create("lenet5")),
        ("mobilenetv2", zoo.create("mobilenetv2")),
        ("ds_cnn", ds_cnn()),
    ]
    rows = [measure(name, model) for name, model in nets]
    console = Console(width=200)

    ram = Table(title="RAM: edgeslim arena vs TFLite Micro arena (same .tflite)")
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
        "TFLM total (SAME, no PAD)",
        "ours / it",
        "patches / it",
    ):
        ram.add_column(col, justify="right")
    for r in rows:
        t, s = r["tflm"], r["tflm_same"]
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
        "* the exported file has PAD ops (PyTorch pads stride-2 convs symmetrically); "
        "this column is TFLite Micro on the same graph with SAME padding instead."
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
    total = mbv2["tflm"]["total"]
    for label, key, target in (("arena", "ours", TARGET_PLAIN), ("patches", "patch", TARGET_PATCH)):
        ratio = mbv2[key] / total
        verdict = "met" if ratio <= target else "MISSED"
        print(f"MobileNetV2 {label} <= {target}x TFLite Micro's total: {ratio:.3f} ({verdict})")
    return 0 if all(r["exact"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
