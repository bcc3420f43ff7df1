"""One-shot compression on a CUDA GPU beside the CPU, and 2:4 sparse linear layers on the GPU.

    python benchmarks/gpu.py            # the full run: a CUDA GPU, about 8 min at most on an H200
    python benchmarks/gpu.py --small    # the same code on a tiny model (checks the script)

Part 1. A Llama-architecture model (``transformers.LlamaConfig``: 8 blocks, hidden size 2048,
MLP 5632, 16 heads, vocabulary 32,000; random weights, seed 0) is compressed by Wanda 50%,
SparseGPT 50%, SparseGPT 2:4 and GPTQ int4 (group 128) with 16 x 256 random calibration
tokens, once with the model on the CPU and once with the same model on the GPU (the
calibration ids stay on the CPU: edgeslim moves them to the model). For each job: wall time on
each device (the GPU's with ``torch.cuda.synchronize`` before the clock stops), the GPU's peak
memory, and how far the two results agree: the share of weights whose kept/pruned status is
the same (pruning) or whose integer code is the same (GPTQ), and ||W_cpu - W_gpu|| / ||W_cpu||
over the blocks' linear layers.

Part 2. The linear layers of the GPU's SparseGPT 2:4 model, in float16, run as
``torch.sparse.to_sparse_semi_structured`` weights (NVIDIA's 2:4 sparse tensor cores) beside
the same dense weights, on 4,096 tokens (prefill) and 16 tokens (decode): median time over
``--repeats`` runs with CUDA events, per layer, and the speedup dense / sparse. Published
anchors: PyTorch reports 1.1-1.6x for 2:4 linear layers on A100-class GPUs; Wanda computes
LLaMA-7B masks in under a second on one A100; SparseGPT prunes LLaMA-7B in about 3 minutes.

The GPU jobs and part 2 run first; the CPU jobs follow, quickest first, each only if it is
predicted to end within ``--budget`` seconds of the start (default 420, so that the whole run
stays within about 8 minutes); a job left out is reported as skipped. Results are saved after
every step.

Without a CUDA GPU the script prints why and exits 0. ``--small`` runs every CPU-side step on a
2-block, 128-wide model; without a GPU its "accelerator" side is a second CPU run (labelled
so, to exercise the comparison code) and part 2 is skipped with a message.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

os.environ.setdefault("EDGESLIM_QUIET", "1")

import torch
from torch import nn

FULL = {"layers": 8, "hidden": 2048, "mlp": 5632, "heads": 16, "vocab": 32000, "n": 16, "seq": 256}
SMALL = {"layers": 2, "hidden": 128, "mlp": 384, "heads": 4, "vocab": 256, "n": 4, "seq": 64}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def build_model(size: dict[str, int]) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        num_hidden_layers=size["layers"],
        hidden_size=size["hidden"],
        intermediate_size=size["mlp"],
        num_attention_heads=size["heads"],
        num_key_value_heads=size["heads"],
        vocab_size=size["vocab"],
        max_position_embeddings=max(2048, size["seq"]),
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def block_linears(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n}


def jobs() -> dict[str, Any]:
    from edgeslim.prune import SparseGPT, Wanda, prune_
    from edgeslim.quant import GPTQ, quantize_

    return {
        "wanda 50%": (prune_, Wanda(sparsity=0.5)),
        "sparsegpt 50%": (prune_, SparseGPT(sparsity=0.5)),
        "sparsegpt 2:4": (prune_, SparseGPT(n=2, m=4)),
        "gptq int4 g128": (quantize_, GPTQ(bits=4, group_size=128)),
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_job(base: nn.Module, verb, cfg, calib, device: torch.device) -> tuple[nn.Module, dict]:
    """Compress a copy of ``base`` on ``device``; return it (moved to the CPU) and the times."""
    model = copy.deepcopy(base).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    start = time.perf_counter()
    verb(model, cfg, calib=calib, progress=False)
    sync(device)
    seconds = time.perf_counter() - start
    info = {"device": str(device), "seconds": seconds}
    if device.type == "cuda":
        info["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return model.to("cpu"), info


def agreement(a: nn.Module, b: nn.Module, quantized: bool) -> dict[str, float]:
    """How alike two compressed copies are, over the blocks' linear layers."""
    from edgeslim.core.models.quantstate import quantized_codes

    la, lb = block_linears(a), block_linears(b)
    same = total = 0
    diff2 = norm2 = 0.0
    worst = 1.0
    for name, ma in la.items():
        mb = lb[name]
        if quantized:
            eq = quantized_codes(ma) == quantized_codes(mb)
        else:
            eq = (ma.weight == 0) == (mb.weight == 0)
        same += int(eq.sum())
        total += eq.numel()
        worst = min(worst, float(eq.float().mean()))
        wa, wb = ma.weight.detach().double(), mb.weight.detach().double()
        diff2 += float((wa - wb).pow(2).sum())
        norm2 += float(wa.pow(2).sum())
    return {"same": same / total, "worst_layer_same": worst, "rel_err": (diff2 / norm2) ** 0.5}


def sparsity(model: nn.Module) -> float:
    ws = [m.weight for m in block_linears(model).values()]
    return sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws)


def warm_up(device: torch.device) -> None:
    """CUDA context, cuBLAS and cuSOLVER handles: one-time costs kept out of the timings."""
    if device.type != "cuda":
        return
    a = torch.randn(256, 256, device=device, dtype=torch.float64)
    torch.linalg.cholesky(a @ a.T + 256 * torch.eye(256, device=device, dtype=torch.float64))
    b = torch.randn(256, 256, device=device)
    (b @ b).argsort(1)
    sync(device)


# ----------------------------------------------------------------------------- part 2


def semi_structured(model: nn.Module, tokens: list[int], repeats: int) -> list[dict[str, Any]]:
    """Dense vs 2:4 semi-structured float16 linear layers of ``model`` on the GPU."""
    import torch.nn.functional as F
    from torch.sparse import to_sparse_semi_structured

    from edgeslim.core.timing import cuda_median_ms

    device = torch.device("cuda")
    rows = []
    gen = torch.Generator(device=device).manual_seed(0)
    for name, layer in block_linears(model).items():
        w = layer.weight.detach().to(device, torch.float16)
        sparse = to_sparse_semi_structured(w)
        for n in tokens:
            x = torch.randn(n, w.shape[1], device=device, dtype=torch.float16, generator=gen)
            with torch.inference_mode():
                dense_out = F.linear(x, w)
                sparse_out = F.linear(x, sparse)
                err = float((dense_out - sparse_out).abs().max() / dense_out.abs().max())
                dense_ms = cuda_median_ms(partial(F.linear, x, w), repeats, 10, device)
                sparse_ms = cuda_median_ms(partial(F.linear, x, sparse), repeats, 10, device)
            rows.append(
                {
                    "layer": name,
                    "shape": list(w.shape),
                    "tokens": n,
                    "dense_ms": dense_ms,
                    "sparse_ms": sparse_ms,
                    "speedup": dense_ms / sparse_ms,
                    "max_rel_err": err,
                }
            )
    return rows


def semi_structured_backend() -> str:
    from torch.sparse import SparseSemiStructuredTensor

    if getattr(SparseSemiStructuredTensor, "_FORCE_CUTLASS", False):
        return "CUTLASS"
    cusparselt = getattr(torch.backends, "cusparselt", None)
    return "cuSPARSELt" if cusparselt is not None and cusparselt.is_available() else "CUTLASS"


# ----------------------------------------------------------------------------- tables


def print_jobs(rows: list[dict[str, Any]], accel: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"one-shot compression, CPU vs accelerator = {accel}")
    for col in (
        "job",
        "zero weights",
        "CPU s",
        "accel s",
        "speedup",
        "peak GiB",
        "same mask/code",
        "worst layer",
        "‖ΔW‖/‖W‖",
    ):
        table.add_column(col, justify="right")
    for r in rows:
        cpu_s = r.get("cpu", {}).get("seconds")
        agree = r.get("agreement")
        peak = r["accel"].get("peak_gib")
        table.add_row(
            r["job"],
            f"{r['sparsity']:.3f}",
            "-" if cpu_s is None else f"{cpu_s:.1f}",
            f"{r['accel']['seconds']:.1f}",
            "-" if cpu_s is None else f"{cpu_s / r['accel']['seconds']:.1f}x",
            "-" if peak is None else f"{peak:.1f}",
            "-" if agree is None else f"{100 * agree['same']:.3f}%",
            "-" if agree is None else f"{100 * agree['worst_layer_same']:.2f}%",
            "-" if agree is None else f"{agree['rel_err']:.2e}",
        )
    Console(width=150).print(table)


def print_semi(rows: list[dict[str, Any]], backend: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"2:4 semi-structured vs dense float16 linear layers ({backend})")
    for col in ("projection", "shape", "tokens", "dense ms", "2:4 ms", "speedup (median, min-max)"):
        table.add_column(col, justify="right")
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["layer"].rsplit(".", 1)[-1], r["tokens"]), []).append(r)
    for (proj, n), rs in groups.items():
        sp = [r["speedup"] for r in rs]
        table.add_row(
            proj,
            "x".join(map(str, rs[0]["shape"])),
            str(n),
            f"{statistics.median(r['dense_ms'] for r in rs):.4f}",
            f"{statistics.median(r['sparse_ms'] for r in rs):.4f}",
            f"{statistics.median(sp):.2f}x ({min(sp):.2f}-{max(sp):.2f})",
        )
    Console(width=150).print(table)


# ----------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="a tiny model (checks the script)")
    parser.add_argument("--device", default="cuda", help="the accelerator (default cuda)")
    parser.add_argument("--repeats", type=int, default=50, help="timed runs per 2:4 layer")
    parser.add_argument("--skip-cpu", action="store_true", help="accelerator side only")
    parser.add_argument(
        "--budget",
        type=float,
        default=420,
        help="seconds by which the CPU jobs should be done: one that would end later is "
        "skipped (and reported so)",
    )
    parser.add_argument("--jobs", help="comma-separated subset, e.g. 'wanda 50%%,gptq int4 g128'")
    parser.add_argument("--out", help="JSON results (default benchmarks/results/gpu.json)")
    args = parser.parse_args()
    started = time.perf_counter()

    cuda = torch.cuda.is_available()
    if not cuda and not args.small:
        why = (
            f"torch {torch.__version__} is built without CUDA"
            if torch.version.cuda is None
            else "no CUDA GPU is visible (torch.cuda.is_available() is False)"
        )
        print(f"benchmarks/gpu.py: skipped: {why}. Nothing was measured.")
        print("(`--small` runs the CPU-side code on a tiny model to check the script.)")
        return 0
    try:
        import transformers  # noqa: F401
    except ImportError:
        print("benchmarks/gpu.py: skipped: needs transformers (pip install -e '.[hf]')")
        return 0

    from edgeslim.core.device_check import check_device

    size = SMALL if args.small else FULL
    accel = check_device(args.device) if cuda else torch.device("cpu")
    accel_label = str(accel) if cuda else "cpu (stand-in: no CUDA GPU)"
    selected = jobs()
    if args.jobs:
        names = [s.strip() for s in args.jobs.split(",")]
        unknown = [n for n in names if n not in selected]
        if unknown:
            parser.error(f"unknown job(s) {unknown}; known: {list(selected)}")
        selected = {n: selected[n] for n in names}

    log(
        f"Llama {size['layers']} blocks x {size['hidden']} (MLP {size['mlp']}), "
        f"{size['n']} x {size['seq']} calibration tokens; CPU threads {torch.get_num_threads()}"
        f"; accelerator {accel_label}"
    )
    base = build_model(size)
    params = sum(p.numel() for p in base.parameters())
    log(f"model built: {params / 1e6:.0f}M parameters")
    calib = torch.randint(
        0, size["vocab"], (size["n"], size["seq"]), generator=torch.Generator().manual_seed(1)
    )
    warm_up(accel)

    out = args.out or (None if args.small else "benchmarks/results/gpu.json")
    rows: list[dict[str, Any]] = []
    semi: list[dict[str, Any]] = []
    backend: str | None = None

    def save() -> None:  # after every step: a run cut short still leaves what it measured
        if not out:
            return
        result = {
            "model": {**size, "params": params},
            "jobs": rows,
            "semi_structured": {"backend": backend, "rows": semi},
            "machine": {
                "gpu": torch.cuda.get_device_name() if cuda else None,
                "cpu": platform.processor() or platform.machine(),
                "cpu_threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "cuda": torch.version.cuda,
                "python": sys.version.split()[0],
            },
            "seconds": time.perf_counter() - started,
        }
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=1))

    # 1. every job on the accelerator first (the results are kept, on the CPU, to compare)
    done: dict[str, nn.Module] = {}
    for label, (verb, cfg) in selected.items():
        log(f"{label}: on {accel_label} ...")
        model, info = run_job(base, verb, cfg, calib, accel)
        log(f"{label}: {accel_label} {info['seconds']:.1f} s")
        rows.append({"job": label, "accel": info, "sparsity": sparsity(model)})
        done[label] = model
        save()

    # 2. the 2:4 model's linear layers as semi-structured sparse tensors
    if not cuda:
        print("2:4 semi-structured part skipped: it needs a CUDA GPU (sparse tensor cores).")
    elif "sparsegpt 2:4" not in done:
        print("2:4 semi-structured part skipped: the 'sparsegpt 2:4' job was not run.")
    else:
        backend = semi_structured_backend()
        tokens = [64, 16] if args.small else [4096, 16]
        log(f"2:4 semi-structured vs dense ({backend}), {args.repeats} repeats per layer ...")
        try:
            semi = semi_structured(done["sparsegpt 2:4"], tokens, args.repeats)
        except (RuntimeError, NotImplementedError) as exc:  # an older GPU: no 2:4 kernels
            print(f"2:4 semi-structured part failed on {torch.cuda.get_device_name()}: {exc}")
        save()

    # 3. the same jobs on the CPU, quickest first, while the time budget lasts: a job starts
    #    only if it should end within --budget, predicted from its accelerator time and the
    #    largest CPU / accelerator ratio seen so far (x 1.5); the first needs only time left
    ratio = 0.0
    for row in sorted(rows, key=lambda r: r["accel"]["seconds"]):
        if args.skip_cpu:
            break
        label = row["job"]
        elapsed = time.perf_counter() - started
        predicted = 1.5 * ratio * row["accel"]["seconds"]
        if elapsed + predicted > args.budget:
            log(
                f"{label}: CPU run skipped ({elapsed:.0f} s elapsed + ~{predicted:.0f} s "
                f"predicted > --budget {args.budget:g} s)"
            )
            row["cpu"] = {"skipped": f"would not end within the {args.budget:g} s budget"}
            continue
        verb, cfg = selected[label]
        log(f"{label}: on cpu ...")
        on_cpu, info = run_job(base, verb, cfg, calib, torch.device("cpu"))
        log(f"{label}: cpu {info['seconds']:.1f} s")
        ratio = max(ratio, info["seconds"] / max(row["accel"]["seconds"], 1e-3))
        row["cpu"] = info
        row["agreement"] = agreement(on_cpu, done[label], label.startswith("gptq"))
        del on_cpu
        save()

    print_jobs(rows, accel_label)
    if semi:
        print_semi(semi, backend or "?")
    save()
    log(f"done in {time.perf_counter() - started:.0f} s" + (f"; results: {out}" if out else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
