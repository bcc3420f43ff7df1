"""Deep Compression on the MNIST subset: the .slim file beside the paper, gzip/zstd/xz and entropy.

In one run:

1. **Deep Compression** of LeNet-300-100 and LeNet-5 with the shipped recipes
   (``recipes/deep_compression_*.yaml``: iterative magnitude pruning, k-means weight sharing
   with centroid fine-tuning, entropy-coded ``.slim``; ``edgeslim compress`` does exactly this):
   bytes of the dense fp32 file and of the real ``.slim`` file, the ratio and the test error
   before and after, beside the paper's 40x and 39x; beside gzip -9, zstd -22 and xz -9e applied
   to the same pruned and shared tensors (as fp32 arrays, and as uint8 cluster-code arrays plus
   centroids), and beside the entropy bound of the symbols the file stores.
2. **Per stream**: Huffman and ANS bytes beside the stream's entropy (n x H).
3. **HashedNets** on LeNet-300-100 at 1/8 and 1/64 of the weights, trained from scratch with
   the dense baseline's schedule, beside the paper's 1.45% and 2.79% error.
4. **Codec throughput**: encode + decode of 10 million symbols, Huffman and ANS (median of 3).

Usage::

    python benchmarks/deep_compression.py                  # seed 0, everything
    python benchmarks/deep_compression.py --seeds 0,1,2    # Deep Compression over three seeds
"""

from __future__ import annotations

import argparse
import gzip
import lzma
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("EDGESLIM_QUIET", "1")

import numpy as np
import torch
import zstandard
from rich.console import Console
from rich.table import Table
from safetensors.torch import load_file

import edgeslim as es
from edgeslim.codec import PackConfig, ans, huffman, pack
from edgeslim.codec.symbols import entropy_bits
from edgeslim.core.masks import add_mask_buffers_, iter_shared
from edgeslim.core.models.storage import deployable_state
from edgeslim.pipeline.runner import stage_seed

ROOT = Path(__file__).resolve().parents[1]
# Han et al. 2016, Table 1/2/3: dense KB, compressed KB, ratio, error before %, after %
PAPER = {"lenet300": (1070, 27, 40, 1.64, 1.58), "lenet5": (1720, 44, 39, 0.80, 0.74)}
HASHED_PAPER = {8: 1.45, 64: 2.79}
# the paper's bit widths: LeNet-300-100 6-bit FC; LeNet-5 8-bit conv, 5-bit FC (Han et al. 2016)
PAPER_BITS = {
    "lenet300": {"linear": 6},
    "lenet5": {"conv": 8, "linear": 5},
}  # Chen et al. 2015, MNIST error % at 1/8 and 1/64
COMPRESSORS = {
    "gzip -9": lambda b: gzip.compress(b, 9, mtime=0),
    "zstd -22": lambda b: zstandard.ZstdCompressor(level=22).compress(b),
    "xz -9e": lambda b: lzma.compress(b, preset=9 | lzma.PRESET_EXTREME),
}


@dataclass
class DCResult:
    net: str
    seed: int
    fp32_bytes: int
    slim_bytes: int
    error_before: float
    error_after: float
    nonzero: int
    params: int
    generic: dict[str, int] = field(default_factory=dict)  # "gzip -9 (fp32)" -> bytes
    paper_style_bytes: int = 0  # paper's bit widths and index widths, Huffman only
    paper_style_error: float = 0.0
    entropy_bytes: float = 0.0  # n x H of every coded stream
    coded_bytes: int = 0  # what the file spends on those streams
    other_bytes: int = 0  # raw tensors, centroids, header, directory
    streams: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def _error(acc: float) -> float:
    return 100 * (1 - acc)


def _generic_inputs(model: torch.nn.Module) -> dict[str, bytes]:
    """The pruned and shared tensors as plain arrays, for general-purpose compressors."""
    state = deployable_state(model)
    fp32 = b"".join(t.detach().contiguous().numpy().tobytes() for t in state.values())
    shared = {
        (f"{m}.{p}" if m else p): (codes, centroids)
        for m, _, p, codes, centroids in iter_shared(model)
    }
    parts = []
    for name, t in state.items():
        if name in shared:
            codes, centroids = shared[name]
            parts.append(codes.to(torch.uint8 if centroids.numel() < 256 else torch.int16).numpy())
            parts.append(centroids.detach().numpy())
        else:
            parts.append(t.detach().contiguous().numpy())
    return {"fp32": fp32, "codes": b"".join(p.tobytes() for p in parts)}


def run_deep_compression(net: str, seed: int, workdir: Path) -> DCResult:
    recipe = es.Recipe.from_yaml(ROOT / "recipes" / f"deep_compression_{net}.yaml")
    recipe = es.Recipe.from_dict({**recipe.to_dict(), "seed": seed})
    out = workdir / f"{net}-{seed}"
    start = time.perf_counter()
    result = es.run_recipe(recipe, out, restart=True, progress=False)
    seconds = time.perf_counter() - start
    base, final = result.rows[0], result.rows[-1]
    slim = out / f"stage-{len(result.rows) - 1}" / final["file"]
    assert final["format"] == "slim" and slim.stat().st_size == final["size_bytes"]
    log = final["log"]
    res = DCResult(
        net,
        seed,
        base["size_bytes"],
        final["size_bytes"],
        _error(base["accuracy"]),
        _error(final["accuracy"]),
        final["nonzero_params"],
        base["params"],
        seconds=seconds,
    )
    for label, data in _generic_inputs(result.model).items():
        for name, compress in COMPRESSORS.items():
            res.generic[f"{name} ({label})"] = len(compress(data))
    res.paper_style_bytes, res.paper_style_error = paper_style(net, recipe, out)
    res.streams = log["streams"]
    res.entropy_bytes = sum(s["entropy_bits"] for s in res.streams) / 8
    res.coded_bytes = sum(s["bytes"] for s in res.streams)
    res.other_bytes = res.slim_bytes - res.coded_bytes
    return res


def paper_style(net: str, recipe: es.Recipe, out: Path) -> tuple[int, float]:
    """The paper's own choices on our pruned model: its bit widths, the same centroid
    fine-tuning, its index widths (conv 8, fc 5) and Huffman coding only."""
    data = es.load_data(recipe.data.source)
    model = es.load_model(recipe.model)
    state = load_file(str(out / "stage-1" / "state.safetensors"))
    add_mask_buffers_(model, state)
    model.load_state_dict(state)
    es.share_(model, es.KMeansShare(bits=PAPER_BITS[net]))
    ft = recipe.stages[1].finetune.model_copy(update={"seed": stage_seed(recipe.seed, 2)})
    es.finetune(model, data, ft, progress=False)
    size = pack(model, out / "paper-style.slim", PackConfig(codecs=["huffman"])).size_bytes
    return size, _error(es.evaluate(model, data))


def run_hashed(ratio: int, seed: int, data: es.DataSplits) -> tuple[float, int, int, float]:
    """Train hashed LeNet-300-100 from scratch: (error %, buckets, .slim bytes, seconds)."""
    recipe = es.Recipe.from_yaml(ROOT / "recipes" / "deep_compression_lenet300.yaml")
    torch.manual_seed(seed)
    model = es.load_model("zoo:lenet300")
    es.share_(model, es.HashShare(ratio=1 / ratio, seed=seed))
    start = time.perf_counter()
    es.fit(model, data, recipe.train, seed=seed, progress=False)
    seconds = time.perf_counter() - start
    buckets = sum(p.numel() for p in model.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        size = pack(model, Path(tmp) / "h.slim").size_bytes
    return _error(es.evaluate(model, data)), buckets, size, seconds


def throughput(n: int = 10_000_000, repeats: int = 3) -> list[tuple[str, str, float, float]]:
    """(distribution, codec, median encode s, median decode s) for n symbols."""
    rng = np.random.default_rng(0)
    streams = {
        "codes: 33 symbols, skewed": rng.choice(33, n, p=rng.dirichlet(np.full(33, 0.5))),
        "gaps: geometric p=0.08, 256 symbols": np.minimum(rng.geometric(0.08, n) - 1, 255),
    }
    rows = []
    for label, symbols in streams.items():
        alphabet = int(symbols.max()) + 1
        for name, (enc, dec) in {
            "huffman": (huffman.encode, huffman.decode),
            "ans": (ans.encode, ans.decode),
        }.items():
            enc_t, dec_t = [], []
            for _ in range(repeats):
                t0 = time.perf_counter()
                data = enc(symbols, alphabet)
                t1 = time.perf_counter()
                back = dec(data, n, alphabet)
                t2 = time.perf_counter()
                assert np.array_equal(back, symbols)
                enc_t.append(t1 - t0)
                dec_t.append(t2 - t1)
            bound = entropy_bits(np.bincount(symbols)) / 8
            rows.append(
                (label, name, statistics.median(enc_t), statistics.median(dec_t), len(data) / bound)
            )
    return rows


# ----------------------------------------------------------------------------- tables


def _kb(n: float) -> str:
    return f"{n / 1000:,.1f}"


def dc_table(results: list[DCResult], seeds: str) -> Table:
    table = Table(title=f"Deep Compression on the MNIST subset (seeds {seeds}); sizes in KB")
    for col in ("net", "what", "KB", "ratio", "error before %", "error after %", "Δ pts"):
        table.add_column(col, justify="left" if col in ("net", "what") else "right")
    for net in dict.fromkeys(r.net for r in results):
        rs = [r for r in results if r.net == net]
        dense, small, ratio, e0, e1 = PAPER[net]
        table.add_row(
            net,
            "paper (full MNIST)",
            f"{dense} → {small}",
            f"{ratio}x",
            f"{e0:.2f}",
            f"{e1:.2f}",
            f"{e1 - e0:+.2f}",
        )
        fp32 = statistics.mean(r.fp32_bytes for r in rs)
        slim = statistics.mean(r.slim_bytes for r in rs)
        eb = statistics.mean(r.error_before for r in rs)
        ea = statistics.mean(r.error_after for r in rs)
        deltas = ", ".join(f"{r.error_after - r.error_before:+.1f}" for r in rs)
        table.add_row(net, "dense fp32 file (safetensors)", _kb(fp32), "1.0x", f"{eb:.2f}", "", "")
        table.add_row(
            net,
            "edgeslim .slim (real file)",
            _kb(slim),
            f"[bold]{fp32 / slim:.1f}x[/]",
            f"{eb:.2f}",
            f"{ea:.2f}",
            f"{ea - eb:+.2f}" + (f" ({deltas})" if len(rs) > 1 else ""),
        )
        paper_style_kb = statistics.mean(r.paper_style_bytes for r in rs)
        table.add_row(
            net,
            "paper's bit and index widths, Huffman only",
            _kb(paper_style_kb),
            f"{fp32 / paper_style_kb:.1f}x",
            f"{eb:.2f}",
            f"{statistics.mean(r.paper_style_error for r in rs):.2f}",
            f"{statistics.mean(r.paper_style_error - r.error_before for r in rs):+.2f}",
        )
        for name in rs[0].generic:
            size = statistics.mean(r.generic[name] for r in rs)
            table.add_row(net, name, _kb(size), f"{fp32 / size:.1f}x", "", "", "")
        bound = statistics.mean(r.entropy_bytes + r.other_bytes for r in rs)
        table.add_row(
            net,
            "entropy bound of the stored symbols (+ raw parts)",
            _kb(bound),
            f"{fp32 / bound:.1f}x",
            "",
            "",
            "",
        )
        nz = statistics.mean(r.nonzero for r in rs)
        table.add_row(
            net, "nonzero parameters", f"{nz:,.0f}", f"{rs[0].params / nz:.1f}x fewer", "", "", ""
        )
        table.add_section()
    return table


def stream_table(results: list[DCResult]) -> Table:
    table = Table(title="coded streams: Huffman vs ANS vs entropy (bytes; payload, tables apart)")
    cols = (
        "net",
        "tensor",
        "stream",
        "symbols",
        "entropy",
        "huffman",
        "ans",
        "ans/entropy",
        "tables h/a",
        "kept",
    )
    for col in cols:
        table.add_column(
            col, justify="left" if col in ("net", "tensor", "stream", "kept") else "right"
        )
    for r in results:
        if r.seed != results[0].seed:
            continue
        for s in r.streams:
            if not s["symbols"]:
                continue
            entropy = s["entropy_bits"] / 8
            pay = s["payloads"]
            tables = {k: s["sizes"][k] - pay[k] for k in pay}
            table.add_row(
                r.net,
                s["tensor"],
                s["role"],
                f"{s['symbols']:,}",
                f"{entropy:,.0f}",
                f"{pay['huffman']:,}",
                f"{pay['ans']:,}",
                f"{pay['ans'] / entropy:.4f}" if entropy else "-",
                f"{tables['huffman']}/{tables['ans']}",
                s["codec"],
            )
        total_e = sum(s["entropy_bits"] for s in r.streams) / 8
        total_h = sum(s["sizes"]["huffman"] for s in r.streams)
        total_a = sum(s["sizes"]["ans"] for s in r.streams)
        table.add_row(
            r.net,
            "all streams, tables included",
            "",
            "",
            f"{total_e:,.0f}",
            f"{total_h:,}",
            f"{total_a:,}",
            f"{total_a / total_e:.4f}",
            "",
            "",
            style="bold",
        )
        table.add_section()
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0", help="comma-separated recipe seeds")
    parser.add_argument("--nets", default="lenet300,lenet5")
    parser.add_argument("--skip-hashed", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--symbols", type=int, default=10_000_000, help="for the throughput test")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    console = Console(width=150)
    results: list[DCResult] = []
    with tempfile.TemporaryDirectory() as tmp:
        for net in args.nets.split(","):
            for seed in seeds:
                results.append(run_deep_compression(net, seed, Path(tmp)))
                r = results[-1]
                console.print(
                    f"{net} seed {seed}: {r.fp32_bytes / r.slim_bytes:.1f}x, error "
                    f"{r.error_before:.2f} -> {r.error_after:.2f} ({r.seconds:.0f} s)"
                )
    console.print(dc_table(results, args.seeds))
    console.print(stream_table(results))
    console.print(
        "Errors on the 1,000-image test split (1 image = 0.1 points). Generic compressors get the "
        "final model's tensors: 'fp32' = every tensor as float32 (zeros and shared values "
        "included), 'codes' = shared weights as dense uint8 cluster codes + fp32 centroids, other "
        "tensors fp32. The entropy bound is n x H of each coded stream (order 0) plus the bytes "
        "stored raw (centroids, biases, header)."
    )

    if not args.skip_hashed:
        data = es.load_data("mnist")
        table = Table(title="HashedNets on LeNet-300-100 (trained from scratch, seed 0)")
        for col in (
            "weights kept",
            "buckets",
            "error %",
            "paper error %",
            ".slim bytes",
            "train s",
        ):
            table.add_column(col, justify="right")
        base = [r for r in results if r.net == "lenet300" and r.seed == seeds[0]]
        if base:
            table.add_row("1 (dense)", "266,610", f"{base[0].error_before:.2f}", "", "", "")
        for ratio in (8, 64):
            err, buckets, size, sec = run_hashed(ratio, seeds[0], data)
            table.add_row(
                f"1/{ratio}",
                f"{buckets:,}",
                f"{err:.2f}",
                f"{HASHED_PAPER[ratio]:.2f}",
                f"{size:,}",
                f"{sec:.0f}",
            )
        console.print(table)

    if not args.skip_throughput:
        table = Table(title=f"codec throughput: {args.symbols:,} symbols (median of 3)")
        for col in ("stream", "codec", "encode s", "decode s", "total s", "size / entropy"):
            table.add_column(col, justify="left" if col in ("stream", "codec") else "right")
        for label, name, enc, dec, rel in throughput(args.symbols):
            table.add_row(label, name, f"{enc:.2f}", f"{dec:.2f}", f"{enc + dec:.2f}", f"{rel:.4f}")
        console.print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
