"""One model, every runtime edgeslim exports to: ONNX Runtime, OpenVINO and LiteRT, in one run.

The MobileNetV2-style zoo net, trained on the MNIST subset (the same cached weights as
``benchmarks/int8.py``), as fp32 and as int8 (``Int8PTQ(calibration="mse")``, 256
calibration images), each written by edgeslim's exporter (which runs the file and checks it
before it counts as written) and then run here on the 1,000 test images:

- ONNX Runtime: ``export_onnx`` (fp32 / int8 QDQ);
- OpenVINO Runtime: ``export_openvino`` (IR, fp32 / int8 from the QDQ graph), CPU plugin,
  ``INFERENCE_PRECISION_HINT=f32`` (no silent bf16), one stream;
- LiteRT: ``export_tflite`` (fp32: ``dtype="float32"``, float builtin ops; int8: the
  integer graph), the default kernels + XNNPACK delegate; the int8 file's input is quantized
  outside the timed call and its int8 output dequantized, as an app would; the fp32 file
  takes the NHWC float input, transposed outside the timed call;
- ExecuTorch (``.pte``, XNNPACK delegate), when the ``executorch`` package is installed.

Measured: latency (median over repeats after warm-up, batch 1 and 32, the same number of
threads in each runtime: ``--threads``, default 2 = this machine's cores), agreement with
PyTorch (max |runtime - torch| of the logits and top-1 agreement over the 1,000 test images;
the reference for int8 files is the PyTorch int8 model's exact integer simulation), test
accuracy of the file, file size. Run it under the machine's CPU lock::

    OMP_NUM_THREADS=2 flock /tmp/edgeslim-cpu.lock python benchmarks/runtimes.py

Results also go to ``benchmarks/results/runtimes.json``.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import platform
import sys
import tempfile
import warnings
from pathlib import Path

os.environ.setdefault("EDGESLIM_QUIET", "1")

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from safetensors.torch import load_file, save_file

import edgeslim as es
from edgeslim.core.fileio import atomic_write_text
from edgeslim.core.timing import median_ms
from edgeslim.export.int8 import lower, reference
from edgeslim.quant.modules import set_mode

warnings.filterwarnings("ignore")
ROOT = Path(__file__).resolve().parent
CACHE = ROOT / ".cache"
TRAIN = es.TrainConfig(epochs=10, lr=2e-3, shift=2)  # as benchmarks/int8.py: shared cache
REPEATS = {1: 200, 32: 50}
console = Console()


def trained_mobilenetv2(data) -> torch.nn.Module:
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / "mobilenetv2.safetensors"
    torch.manual_seed(0)
    model = es.load_model("zoo:mobilenetv2")
    if path.is_file():
        model.load_state_dict(load_file(str(path)))
    else:
        console.print(f"training mobilenetv2 ({TRAIN.epochs} epochs)...")
        es.fit(model, data, TRAIN, progress=False)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model.eval()


# ------------------------------------------------------------------------- runners
# each: (file bytes, run(x: float NCHW batch) -> float logits)


def onnx_runner(model, path: Path, example, threads: int):
    import onnxruntime as ort

    from edgeslim.export.onnx import export_onnx

    res = export_onnx(model, path, example)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return res.size_bytes, lambda x: sess.run(None, {"input": x})[0]


def openvino_runner(model, path: Path, example, threads: int):
    import openvino as ov

    from edgeslim.export.openvino import export_openvino

    res = export_openvino(model, path, example)
    config = {
        "INFERENCE_PRECISION_HINT": "f32",
        "INFERENCE_NUM_THREADS": threads,
        "NUM_STREAMS": 1,
        "PERFORMANCE_HINT": "LATENCY",
    }
    compiled = ov.Core().compile_model(str(path), "CPU", config)
    request = compiled.create_infer_request()

    def run(x):
        request.infer([x])
        return request.get_output_tensor(0).data.copy()  # the request reuses its buffer

    return res.size_bytes, run


def litert_runner(q, path: Path, calib, threads: int):
    from edgeslim.export import tflite

    tflite.export_tflite(q, path, calib=calib, runtime="litert")
    data = path.read_bytes()
    graph = lower(q, calib, name=type(q).__name__)
    interp = tflite.litert_interpreter(data, threads=threads)
    inp = interp.get_input_details()[0]["index"]
    out = interp.get_output_details()[0]["index"]
    shape = [None]

    def run(x):
        qx = reference.quantize_input(graph, x).astype(np.int8)
        if shape[0] != qx.shape:
            interp.resize_tensor_input(inp, list(qx.shape))
            interp.allocate_tensors()
            shape[0] = qx.shape
        interp.set_tensor(inp, qx)
        interp.invoke()
        return reference.dequantize(graph, graph.output, interp.get_tensor(out)).astype(np.float32)

    def timed_input(x):  # the int8 input an app hands to LiteRT: quantized before the call
        return reference.quantize_input(graph, x).astype(np.int8)

    def run_quantized(qx):
        if shape[0] != qx.shape:
            interp.resize_tensor_input(inp, list(qx.shape))
            interp.allocate_tensors()
            shape[0] = qx.shape
        interp.set_tensor(inp, qx)
        interp.invoke()
        return interp.get_tensor(out)

    run.timed = (timed_input, run_quantized)
    return len(data), run


def litert_fp32_runner(model, path: Path, calib, threads: int):
    from edgeslim.export import tflite, tflite_float

    tflite.export_tflite(model, path, calib=calib, runtime="litert", dtype="float32")
    data = path.read_bytes()
    interp = tflite.litert_interpreter(data, threads=threads)
    inp = interp.get_input_details()[0]["index"]
    out = interp.get_output_details()[0]["index"]
    shape = [None]

    def run_nhwc(x):  # the float input an app hands to LiteRT: already NHWC
        if shape[0] != x.shape:
            interp.resize_tensor_input(inp, list(x.shape))
            interp.allocate_tensors()
            shape[0] = x.shape
        interp.set_tensor(inp, x)
        interp.invoke()
        return interp.get_tensor(out)

    def run(x):
        return run_nhwc(tflite_float.to_nhwc(x)).copy()

    run.timed = (tflite_float.to_nhwc, run_nhwc)
    return len(data), run


def executorch_runner(model, path: Path, example, threads: int):
    """Two programs (a .pte has a fixed input shape): batch 1, and batch 32 for its latency."""
    from edgeslim.export.executorch import export_executorch, load_pte

    res = export_executorch(model, path, example[:1], threads=threads)
    b32 = path.with_name("m32.pte")
    export_executorch(model, b32, torch.zeros(32, *example.shape[1:]), threads=threads)
    one, batch = load_pte(path, threads=threads), load_pte(b32)

    def run(x):
        if len(x) == 32:
            return batch.execute([torch.from_numpy(x)])[0].numpy()
        return np.concatenate(
            [one.execute([torch.from_numpy(x[i : i + 1])])[0].numpy() for i in range(len(x))]
        )

    return res.size_bytes, run


# ------------------------------------------------------------------------- measuring


def latency(run, x: np.ndarray, batch: int) -> float:
    prepare, call = getattr(run, "timed", (lambda v: v, run))
    feed = prepare(np.ascontiguousarray(x[:batch]))
    return median_ms(lambda: call(feed), REPEATS[batch], 5)


def agreement(run, test_x: np.ndarray, ref: np.ndarray, labels: np.ndarray) -> dict:
    got = np.concatenate([run(test_x[i : i + 100]) for i in range(0, len(test_x), 100)])
    got = np.asarray(got, np.float32)
    return {
        "max_abs_diff": float(np.abs(got - ref).max()),
        "top1_agreement": float((got.argmax(1) == ref.argmax(1)).mean()),
        "accuracy": float((got.argmax(1) == labels).mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "results" / "runtimes.json"))
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="check the script: untrained net, 100 test images, 5 repeats, no ExecuTorch",
    )
    parser.add_argument("--only", help="run only these runtimes, e.g. OpenVINO,LiteRT")
    args = parser.parse_args()
    if args.smoke:
        REPEATS.update({1: 5, 32: 5})
    torch.set_num_threads(args.threads)

    data = es.load_data("mnist")
    model = es.load_model("zoo:mobilenetv2").eval() if args.smoke else trained_mobilenetv2(data)
    calib = data.calib(256)
    q = es.quantize(copy.deepcopy(model), es.Int8PTQ(calibration="mse"), calib=calib)
    n_test = 100 if args.smoke else len(data.test)
    test_x = data.test.x[:n_test].numpy().astype(np.float32)
    labels = data.test.y[:n_test].numpy()
    with torch.no_grad():
        ref_fp32 = model(data.test.x[:n_test]).numpy()
        set_mode(q, "exact")
        ref_int8 = q(data.test.x[:n_test]).numpy()
    example = data.example(4)

    contenders = [
        ("ONNX Runtime", "fp32", "m.onnx", lambda p: onnx_runner(model, p, example, args.threads)),
        ("ONNX Runtime", "int8", "q.onnx", lambda p: onnx_runner(q, p, example, args.threads)),
        ("OpenVINO", "fp32", "m.xml", lambda p: openvino_runner(model, p, example, args.threads)),
        ("OpenVINO", "int8", "q.xml", lambda p: openvino_runner(q, p, example, args.threads)),
        ("LiteRT", "fp32", "m.tflite", lambda p: litert_fp32_runner(model, p, calib, args.threads)),
        ("LiteRT", "int8", "q.tflite", lambda p: litert_runner(q, p, calib[:32], args.threads)),
    ]
    if importlib.util.find_spec("executorch") is not None and not args.smoke:
        contenders += [
            (
                "ExecuTorch",
                "fp32",
                "m.pte",
                lambda p: executorch_runner(model, p, example, args.threads),
            ),
        ]
    if args.only:
        keep = {name.strip().lower() for name in args.only.split(",")}
        contenders = [c for c in contenders if c[0].lower() in keep]
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for runtime, kind, name, make in contenders:
            console.print(f"{runtime} {kind}...")
            size, run = make(Path(d) / name)
            ref = ref_fp32 if kind == "fp32" else ref_int8
            row = {"runtime": runtime, "kind": kind, "file_bytes": size}
            row.update(agreement(run, test_x, ref, labels))
            row["batch1_ms"] = latency(run, test_x, 1)
            row["batch32_ms"] = latency(run, test_x, 32)
            rows.append(row)
    torch_acc = {
        "fp32": float((ref_fp32.argmax(1) == labels).mean()),
        "int8": float((ref_int8.argmax(1) == labels).mean()),
    }
    table = Table(title=f"MobileNetV2-style net, MNIST test set, {args.threads} threads")
    for col in ("runtime", "kind", "batch 1 ms", "batch 32 ms", "max |rt - torch|", "top-1 agree"):
        table.add_column(col)
    for col in ("test acc", "file bytes"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r["runtime"],
            r["kind"],
            f"{r['batch1_ms']:.3f}",
            f"{r['batch32_ms']:.2f}",
            f"{r['max_abs_diff']:.2e}",
            f"{100 * r['top1_agreement']:.1f}%",
            f"{100 * r['accuracy']:.1f}%",
            f"{r['file_bytes']:,}",
        )
    console.print(table)
    console.print(
        f"PyTorch test accuracy: fp32 {100 * torch_acc['fp32']:.1f}%, "
        f"int8 {100 * torch_acc['int8']:.1f}%"
    )
    markdown = [
        "| runtime | model | batch 1 ms | batch 32 ms | max \\|runtime - torch\\| "
        "| top-1 agreement | test acc | file bytes |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        markdown.append(
            f"| {r['runtime']} | {r['kind']} | {r['batch1_ms']:.3f} | {r['batch32_ms']:.2f} "
            f"| {r['max_abs_diff']:.1e} | {100 * r['top1_agreement']:.1f}% "
            f"| {100 * r['accuracy']:.1f}% | {r['file_bytes']:,} |"
        )
    print("\n".join(markdown))
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("onnxruntime", "openvino", "ai_edge_litert", "executorch"):
        if importlib.util.find_spec(pkg) is not None:
            from importlib.metadata import version

            dist = {"ai_edge_litert": "ai-edge-litert"}.get(pkg, pkg)
            versions[pkg] = version(dist)
    body = {
        "threads": args.threads,
        "repeats": REPEATS,
        "versions": versions,
        "torch_accuracy": torch_acc,
        "rows": rows,
        "markdown": markdown,
    }
    print(f"wrote {atomic_write_text(args.out, json.dumps(body, indent=1))}")


if __name__ == "__main__":
    sys.exit(main())
