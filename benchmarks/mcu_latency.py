"""Fit the Cortex-M device latency model to QEMU's instruction counts, and state its error.

Every sample is an int8 graph exported to C, built for Cortex-M4 with ``-Os`` (what
``export_c`` builds by default) and run on QEMU ``mps2-an386`` under ``-icount``: the
instructions of one ``model_run``. Samples: seeded random single-layer nets (convolutions of
several kernels, strides, channel counts and sizes; depthwise convolutions; fully connected
layers; pooling; a residual add; sparse layers stored compressed) and the zoo nets (LeNet-5,
LeNet-300-100, the MobileNetV2-style net, DS-CNN, ResNet-8; seeded random weights). The
model (``edgeslim.profiling.devices``: instructions per conv / depthwise / FC / compressed
MAC, per requantized output, per other value written, per op) is fitted by non-negative
least squares on the relative error; each sample is then left out in turn and predicted by
the fit of the others. Compared with the profile's former 5 cycles per MAC (read as
instructions, i.e. one instruction per cycle) and with a one-constant instructions-per-MAC
fit.

    flock /tmp/edgeslim-cpu.lock python benchmarks/mcu_latency.py          # ~3 min
    ... --write   # also store the coefficients in profiling/devices/instruction-models.yml
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
import yaml
from rich.console import Console
from rich.table import Table
from torch import nn

from edgeslim import zoo
from edgeslim.core.fileio import atomic_write_text
from edgeslim.core.models.kws import ds_cnn
from edgeslim.export import int8
from edgeslim.export.c import arm, codegen, compress, packed_scratch, planner
from edgeslim.export.c.workload import workload
from edgeslim.export.int8 import reference
from edgeslim.profiling.devices import FEATURES, fit_instructions

MODEL_NAME = "thumb2-scalar-Os"
OLD_CYCLES_PER_MAC = 5.0  # the stm32f446 profile before this fit
YML = Path(__file__).parents[1] / "src/edgeslim/profiling/devices/instruction-models.yml"
RESULTS = Path(__file__).parent / "results/mcu_latency.json"


class Residual(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return torch.relu(x + self.conv(x))


def _sparse(model: nn.Module, sparsity: float, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)) and getattr(m, "groups", 1) == 1:
                m.weight[torch.rand(m.weight.shape, generator=g) < sparsity] = 0
    return model


def layer_samples() -> list[tuple[str, nn.Module, tuple[int, ...]]]:
    """Seeded random nets of one layer type: (name, model, input shape without batch).

    Each layer comes twice (the second keeps the shape): gcc -Os inlines a kernel called
    once into ``model_run`` and specialises it, which real nets, calling their kernels
    several times, never get; two calls keep the samples' kernels out of line, as in a net.
    """
    torch.manual_seed(0)
    out: list[tuple[str, nn.Module, tuple[int, ...]]] = []
    for cin, cout, k, s, hw in (
        (1, 8, 3, 1, 28),
        (3, 16, 3, 2, 32),
        (8, 8, 1, 1, 16),
        (16, 32, 1, 1, 8),
        (4, 6, 5, 1, 20),
        (16, 16, 3, 1, 12),
        (32, 16, 3, 2, 16),
        (8, 24, 1, 1, 24),
        (2, 4, 7, 2, 24),
        (64, 64, 1, 1, 4),
    ):
        conv = nn.Sequential(
            nn.Conv2d(cin, cout, k, s, padding=k // 2),
            nn.ReLU(),
            nn.Conv2d(cout, cout, k, 1, padding=k // 2),
        )
        out.append((f"2 convs {cin}->{cout}->{cout} k{k} s{s} {hw}x{hw}", conv, (cin, hw, hw)))
    for c, k, s, hw in ((8, 3, 1, 16), (32, 3, 2, 16), (16, 5, 1, 12), (64, 3, 1, 8)):
        dw = nn.Sequential(
            nn.Conv2d(c, c, k, s, padding=k // 2, groups=c),
            nn.ReLU6(),
            nn.Conv2d(c, c, k, 1, padding=k // 2, groups=c),
        )
        out.append((f"2 depthwise {c} k{k} s{s} {hw}x{hw}", dw, (c, hw, hw)))
    for fin, fout in ((784, 64), (256, 10), (64, 64), (1024, 32), (32, 128)):
        fc = nn.Sequential(nn.Linear(fin, fout), nn.ReLU(), nn.Linear(fout, fout))
        out.append((f"2 fc {fin}->{fout}->{fout}", fc, (fin,)))
    for pool, c, hw in ((nn.MaxPool2d(2), 8, 24), (nn.AvgPool2d(3, 1), 16, 12)):
        net = nn.Sequential(nn.Conv2d(c, c, 1), pool, nn.Conv2d(c, c, 1), pool)
        out.append((f"2x (conv 1x1 + {type(pool).__name__}) {c}x{hw}x{hw}", net, (c, hw, hw)))
    out.append(("2 residual relu(x + conv(x)) 8x12x12", nn.Sequential(Residual(8), Residual(8)),
                (8, 12, 12)))  # fmt: skip
    for i, (fin, fout, sp) in enumerate(((784, 128, 0.9), (256, 64, 0.7), (512, 32, 0.95))):
        fc = _sparse(nn.Sequential(nn.Linear(fin, fout), nn.Linear(fout, fout)), sp, i)
        out.append((f"2 fc {fin}->{fout}->{fout} {100 * sp:.0f}% sparse", fc, (fin,)))
    for i, (cin, cout, hw, sp) in enumerate(((8, 16, 12, 0.9), (16, 32, 8, 0.6))):
        conv = nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1), nn.Conv2d(cout, cout, 3, padding=1)
        )
        name = f"2 convs {cin}->{cout}->{cout} k3 {hw}x{hw} {100 * sp:.0f}% sparse"
        out.append((name, _sparse(conv, sp, 10 + i), (cin, hw, hw)))
    # small mixed nets
    out.append(("mini LeNet (conv-pool-conv-pool-fc-fc)", nn.Sequential(
        nn.Conv2d(1, 4, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 8, 5), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(128, 32), nn.ReLU(), nn.Linear(32, 10)),
        (1, 28, 28)))  # fmt: skip
    out.append(("mini inverted residual (1x1-dw-1x1)", nn.Sequential(
        nn.Conv2d(8, 32, 1), nn.ReLU6(), nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.ReLU6(),
        nn.Conv2d(32, 8, 1), nn.Conv2d(8, 16, 3, 2, 1)), (8, 16, 16)))  # fmt: skip
    out.append(("mini DS-CNN (conv, 2x dw-1x1, avgpool, fc)", nn.Sequential(
        nn.Conv2d(1, 16, (5, 3), 2, (2, 1)), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU(), nn.Conv2d(16, 16, 1), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU(), nn.Conv2d(16, 16, 1), nn.ReLU(),
        nn.AvgPool2d((25, 5)), nn.Flatten(), nn.Linear(16, 12)), (1, 49, 10)))  # fmt: skip
    return out


def zoo_samples() -> list[tuple[str, nn.Module, tuple[int, ...]]]:
    torch.manual_seed(0)
    nets = [
        ("LeNet-5", zoo.create("lenet5")),
        ("LeNet-300-100", zoo.create("lenet300")),
        ("MobileNetV2-style", zoo.create("mobilenetv2")),
        ("DS-CNN", ds_cnn()),
        ("ResNet-8", zoo.create("resnet8")),
    ]
    return [(name, m, tuple(m.input_shape)) for name, m in nets]


def measure(
    name: str, model: nn.Module, shape: tuple[int, ...], kind: str, counted: dict | None = None
) -> dict:
    """One sample: its workload, and its instructions on QEMU (or from ``counted``)."""
    model.eval()
    g = torch.Generator().manual_seed(0)
    calib = torch.rand(32, *shape, generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = int8.lower(model, calib, name="sample")
    packed = compress.choose(graph, "auto")
    plan = planner.plan_memory(graph, scratch=packed_scratch(graph, packed))
    sources = codegen.generate(graph, plan, packed)
    if counted and name in counted:
        instructions = counted[name]
    else:
        q = reference.quantize_input(graph, calib[:2].numpy())
        built = arm.build(graph, sources, "cortex-m4", q, opt="-Os")  # raises unless bit-exact
        instructions = built.instructions
    work = workload(graph, packed, plan)
    return {
        "name": name,
        "kind": kind,
        "work": {k: getattr(work, k) for k in FEATURES},
        "macs": graph.macs(),
        "instructions": instructions,
        "compressed": sorted(p.format for p in packed.values()),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"store the fit in {YML.name}")
    parser.add_argument(
        "--reuse", action="store_true", help=f"reuse the counts in {RESULTS.name} (refit only)"
    )
    args = parser.parse_args()
    counted = None
    if args.reuse:
        counted = {r["name"]: r["instructions"] for r in json.loads(RESULTS.read_text())["rows"]}
    elif arm.missing():
        print(f"needs the ARM toolchain and QEMU: {arm.missing()}")
        return 2
    from edgeslim.profiling.devices import Workload

    rows = [measure(n, m, s, "layer", counted) for n, m, s in layer_samples()]
    rows += [measure(n, m, s, "net", counted) for n, m, s in zoo_samples()]
    samples = [(Workload(**r["work"]), r["instructions"]) for r in rows]
    fit = fit_instructions(samples)
    for r, loo, err in zip(rows, fit.loo_error, fit.fit_error, strict=True):
        r["loo_error"], r["fit_error"] = loo, err
        r["one_constant_error"] = (
            abs(fit.per_mac * r["macs"] - r["instructions"]) / r["instructions"]
        )
        r["old_error"] = abs(OLD_CYCLES_PER_MAC * r["macs"] - r["instructions"]) / r["instructions"]
    console = Console(width=200)
    t = Table(title="Instructions per inference (Cortex-M4, -Os, QEMU -icount) vs the models")
    for c in ("sample", "MACs", "instructions", "instr./MAC", "old 5/MAC err"):
        t.add_column(c, justify="right")
    for c in ("1-constant err", "per-op fit err", "per-op leave-one-out err"):
        t.add_column(c, justify="right")
    for r in rows:
        t.add_row(
            r["name"],
            f"{r['macs']:,}",
            f"{r['instructions']:,}",
            f"{r['instructions'] / r['macs']:.1f}" if r["macs"] else "-",
            f"{100 * r['old_error']:.1f}%",
            f"{100 * r['one_constant_error']:.1f}%",
            f"{100 * r['fit_error']:.1f}%",
            f"{100 * r['loo_error']:.1f}%",
        )
    console.print(t)
    coefs = ", ".join(f"{k} {v:.4g}" for k, v in fit.coefficients.items())
    print(f"coefficients (instructions per unit): {coefs}; one constant: {fit.per_mac:.3f}/MAC")
    summary = {}
    for label, key in (
        ("old 5 cyc/MAC", "old_error"),
        ("one constant", "one_constant_error"),
        ("per-op (fit)", "fit_error"),
        ("per-op (leave-one-out)", "loo_error"),
    ):
        for kind in ("layer", "net", "all"):
            errs = [r[key] for r in rows if kind in (r["kind"], "all")]
            summary[f"{key}/{kind}"] = {"mean": float(np.mean(errs)), "max": float(np.max(errs))}
            print(
                f"{label:24s} {kind:5s}: mean {100 * np.mean(errs):5.1f}%, "
                f"max {100 * np.max(errs):5.1f}%"
            )
    RESULTS.parent.mkdir(exist_ok=True)
    payload = {"coefficients": fit.coefficients, "per_mac": fit.per_mac, "rows": rows}
    atomic_write_text(RESULTS, json.dumps({**payload, "summary": summary}, indent=1) + "\n")
    if args.write:
        loo = [r["loo_error"] for r in rows]
        nets = [r["loo_error"] for r in rows if r["kind"] == "net"]
        body = {
            MODEL_NAME: {
                "description": (
                    "edgeslim's scalar C kernels, arm-none-eabi-gcc -Os for Cortex-M4 (Thumb-2), "
                    f"fitted to QEMU -icount counts of {len(rows)} graphs "
                    "(benchmarks/mcu_latency.py)"
                ),
                "coefficients": {k: round(v, 4) for k, v in fit.coefficients.items()},
                "per_mac": round(fit.per_mac, 3),
                "error": {
                    "loo_mean": round(float(np.mean(loo)), 4),
                    "loo_max": round(float(np.max(loo)), 4),
                    "loo_nets_mean": round(float(np.mean(nets)), 4),
                    "loo_nets_max": round(float(np.max(nets)), 4),
                },
            }
        }
        head = YML.read_text(encoding="utf-8").split("\n# ---\n")[0]
        atomic_write_text(YML, head + "\n# ---\n" + yaml.safe_dump(body, sort_keys=False))
        print(f"wrote {YML}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
