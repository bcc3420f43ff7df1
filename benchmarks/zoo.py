"""The model zoo, measured: params, MACs, memory access cost, peak memory, latency, accuracy.

Every zoo network, in one run, on one 1x28x28 MNIST image (haarnet: its 4x14x14 Haar
sub-bands): parameters, MACs and memory access cost (bytes every op reads and writes, Ma et
al. 2018) and peak activation memory counted by ``edgeslim.profiling`` on the exported graph,
and latency measured on one thread in PyTorch (median of repeated batch-1 forward passes,
median over 3 rounds) and, unless ``--no-onnx``, in ONNX Runtime (same input, checked against
PyTorch). With
``--epochs N`` each model is also trained N epochs on the MNIST subset (Adam, lr 2e-3, shifts
of up to 2 pixels; the ViT: ``TRAIN`` below) and its test accuracy and training time
reported.

The last lines list the pairs where MACs and latency disagree: the model with fewer MACs is
the slower one.

    python benchmarks/zoo.py --epochs 8
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("EDGESLIM_QUIET", "1")

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

import edgeslim as es
from edgeslim.core.data.transforms import apply_transform
from edgeslim.core.timing import median_ms
from edgeslim.profiling import measure_latency_ms, profile

MODELS = (
    "lenet300",
    "lenet5",
    "haarnet",
    "mobilenetv1",
    "mobilenetv2",
    "shufflenetv2",
    "squeezenet",
    "resnet8",
    "vit_tiny",
    "mlp2x800",
    "mlp2x1200",
)
# training that differs from the default (Adam, lr 2e-3, batch 64, --epochs): the ViT needs
# smaller steps and more of them (see the ViTTiny docstring)
TRAIN = {"vit_tiny": {"lr": 1e-3, "batch_size": 32, "epochs": 20}}


def onnx_latency_ms(model: torch.nn.Module, x: torch.Tensor, repeats: int) -> float | None:
    """Median ms of ONNX Runtime (1 thread) on ``x[:1]``; None if the export fails."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.onnx"
        try:
            with warnings.catch_warnings():  # the legacy exporter's deprecation notice
                warnings.simplefilter("ignore")
                torch.onnx.export(model.eval(), (x[:1],), str(path), dynamo=False)
        except Exception as exc:  # report, do not stop the table
            print(f"  onnx export failed for {type(model).__name__}: {exc}")
            return None
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        feed = {sess.get_inputs()[0].name: x[:1].numpy()}
        with torch.no_grad():
            expected = model(x[:1]).numpy()
        got = sess.run(None, feed)[0]
        if not np.allclose(got, expected, atol=1e-4):
            raise RuntimeError(f"ONNX Runtime output of {type(model).__name__} differs")
        return median_ms(lambda: sess.run(None, feed), repeats, warmup=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=0, help="train each model N epochs")
    parser.add_argument("--repeats", type=int, default=200, help="timed passes per round")
    parser.add_argument("--no-onnx", action="store_true")
    args = parser.parse_args()
    threads = torch.get_num_threads()
    mnist = es.load_data("mnist")
    haar = apply_transform(mnist, "haar")
    rows = []
    for name in MODELS:
        data = haar if name == "haarnet" else mnist
        torch.manual_seed(0)
        model = es.load_model(f"zoo:{name}")
        row: dict[str, object] = {"name": name}
        if args.epochs:
            torch.set_num_threads(threads)
            train = {"epochs": args.epochs, "lr": 2e-3, "batch_size": 64, **TRAIN.get(name, {})}
            start = time.perf_counter()
            es.fit(model, data, shift=2 if name != "haarnet" else 0, **train)
            row["train_s"] = time.perf_counter() - start
            row["epochs"] = train["epochs"]
            row["accuracy"] = es.evaluate(model, data)
        model.eval()
        torch.set_num_threads(1)  # latency on one core: no thread-pool noise, as on a phone/MCU
        x = data.example()
        prof = profile(model, x, latency=False)
        row.update(
            params=prof.params,
            macs=prof.macs,
            moved=prof.memory_access_bytes,
            peak=prof.peak_activation_bytes,
            torch_ms=statistics.median(
                measure_latency_ms(model, x, repeats=args.repeats) for _ in range(3)
            ),
            onnx_ms=None if args.no_onnx else onnx_latency_ms(model, x, args.repeats),
        )
        rows.append(row)
        print(row, flush=True)

    table = Table(title="edgeslim zoo on one 28x28 image (batch 1, 1 thread)")
    cols = ["model", "params", "MACs", "bytes moved", "bytes/MAC", "peak act.", "torch ms"]
    cols += ["ONNX RT ms"] if not args.no_onnx else []
    cols += ["test acc.", "epochs", "train s"] if args.epochs else []
    for col in cols:
        table.add_column(col, justify="left" if col == "model" else "right")
    for r in rows:
        cells = [
            r["name"],
            f"{r['params']:,}",
            f"{r['macs']:,}",
            f"{r['moved']:,}",
            f"{r['moved'] / r['macs']:.2f}",
            f"{r['peak']:,}",
            f"{r['torch_ms']:.3f}",
        ]
        if not args.no_onnx:
            cells.append("-" if r["onnx_ms"] is None else f"{r['onnx_ms']:.3f}")
        if args.epochs:
            cells += [f"{100 * r['accuracy']:.2f}%", str(r["epochs"]), f"{r['train_s']:.0f}"]
        table.add_row(*cells)
    Console(width=160).print(table)
    key = "onnx_ms" if not args.no_onnx else "torch_ms"
    print(f"MACs vs latency ({key}): pairs where the model with fewer MACs is slower")
    for a in rows:
        for b in rows:
            if a["macs"] < b["macs"] and a[key] and b[key] and a[key] > b[key]:
                print(
                    f"  {a['name']}: {a['macs'] / b['macs']:.2f}x the MACs of {b['name']} but "
                    f"{a[key] / b[key]:.2f}x its latency; bytes moved "
                    f"{a['moved'] / b['moved']:.2f}x"
                )


if __name__ == "__main__":
    main()
