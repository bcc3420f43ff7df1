"""Bounded memory: Wanda on a >= 2 GB Llama streamed from shards vs loaded whole, in one run.

    flock /tmp/edgeslim-cpu.lock python benchmarks/llm_stream.py

1. Writes a randomly initialised Llama-architecture model (float32, default 36 layers of width
   1024, vocab 32000: 2.11 GB) as safetensors shards under ``--dir`` (in /tmp, not the repo),
   one tensor group at a time, never holding the model in memory.
2. In a child process, :func:`edgeslim.oneshot.streaming.compress_sharded` prunes it with
   Wanda 50% from the shards into a new sharded directory, block by block.
3. In another child process, the peer: the whole model loaded with transformers and pruned
   in memory with ``prune_(model, Wanda(...))`` on the same calibration tokens.
4. Peak RSS of each child (``ru_maxrss`` of the finished child, as /usr/bin/time reports), the
   ratio to the model's size on disk, and a check that both produce the same pruned weights.
The directories are deleted at the end (``--keep`` keeps them).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("EDGESLIM_QUIET", "1")

CHECK = "model.layers.0.self_attn.q_proj.weight"


def llama_config(args):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=args.width,
        intermediate_size=args.ffn,
        num_hidden_layers=args.layers,
        num_attention_heads=args.width // 64,
        num_key_value_heads=args.width // 64,
        vocab_size=args.vocab,
        tie_word_embeddings=False,
        architectures=["LlamaForCausalLM"],
    )


def write_random_llama(args, directory: Path) -> int:
    """Shards of a random Llama, written group by group; returns the bytes on disk."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    config = llama_config(args)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in LlamaForCausalLM(config).state_dict().items()}
    groups: dict[str, list[str]] = {}
    for key in shapes:
        parts = key.split(".")
        group = ".".join(parts[:3]) if parts[1] == "layers" else key
        groups.setdefault(group, []).append(key)
    directory.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    weight_map = {}
    for i, keys in enumerate(groups.values()):
        tensors = {
            k: torch.ones(shapes[k]) if "norm" in k else torch.randn(shapes[k], generator=g) * 0.02
            for k in keys
        }
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file(tensors, str(directory / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, file))
        del tensors
    total = sum(p.stat().st_size for p in directory.glob("*.safetensors"))
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    config.save_pretrained(str(directory))
    return total


def calib_tokens(args):
    import torch

    g = torch.Generator().manual_seed(1)
    return torch.randint(0, args.vocab, (args.calib, args.seq), generator=g)


def child(mode: str, args) -> None:
    """Run one side in this (child) process; print a JSON line."""
    import torch

    torch.set_num_threads(2)
    from edgeslim.prune import Wanda

    cfg = Wanda(sparsity=0.5, batch_size=4)
    start = time.perf_counter()
    if mode == "stream":
        from edgeslim.oneshot.streaming import compress_sharded

        log = compress_sharded(args.dir / "src", args.dir / "out", cfg, calib=calib_tokens(args))
        from safetensors import safe_open

        index = json.loads((args.dir / "out" / "model.safetensors.index.json").read_text())
        from edgeslim.core.models.hf import decode_state

        with safe_open(str(args.dir / "out" / index["weight_map"][CHECK]), framework="pt") as f:
            meta = json.loads(f.metadata()["edgeslim"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        w = decode_state(tensors, meta, "out")[CHECK]
    else:
        from edgeslim.core.models.hf import load_hf
        from edgeslim.prune import prune_

        model = load_hf(args.dir / "src")
        log = prune_(model, cfg, calib=calib_tokens(args))
        w = model.state_dict()[CHECK]
    torch.save(w.clone(), args.dir / f"{mode}.pt")
    print(
        json.dumps(
            {
                "mode": mode,
                "layers": len(log),
                "seconds": time.perf_counter() - start,
                "sparsity": sum(log.values()) / len(log),
            }
        ),
        flush=True,
    )


def run_child(mode: str, argv: list[str]) -> tuple[dict, int]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    proc = subprocess.run(
        [sys.executable, __file__, "--child", mode, *argv], capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise SystemExit(f"{mode} child failed:\n{proc.stderr[-3000:]}")
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if peak_kb <= before:
        print(f"warning: {mode} peak RSS not above an earlier child's ({before} kB)")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return result, peak_kb * 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", type=Path, default=Path("/tmp/edgeslim-llama-stream"))
    p.add_argument("--layers", type=int, default=36)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--ffn", type=int, default=2816)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--calib", type=int, default=16, help="calibration sequences")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--keep", action="store_true", help="keep the model directories")
    p.add_argument("--child", choices=("stream", "whole"))
    args = p.parse_args()
    if args.child:
        child(args.child, args)
        return
    argv = [a for a in sys.argv[1:] if a != "--keep"]
    if args.dir.exists():
        shutil.rmtree(args.dir)
    try:
        start = time.perf_counter()
        size = write_random_llama(args, args.dir / "src")
        print(
            f"random Llama written: {size / 1e9:.2f} GB in {time.perf_counter() - start:.0f} s",
            flush=True,
        )
        # the streaming child runs first: ru_maxrss of children is a running maximum
        stream, stream_peak = run_child("stream", argv)
        whole, whole_peak = run_child("whole", argv)
        import torch

        same = torch.equal(torch.load(args.dir / "stream.pt"), torch.load(args.dir / "whole.pt"))
        out_size = sum(p.stat().st_size for p in (args.dir / "out").glob("*.safetensors"))
        rows = [
            ("edgeslim compress_sharded (streaming)", stream, stream_peak),
            ("prune_ on the model loaded whole", whole, whole_peak),
        ]
        print(
            f"\nWanda 50% on a random Llama ({args.layers} x {args.width}, vocab {args.vocab}), "
            f"{size / 1e9:.2f} GB on disk; {args.calib} x {args.seq} calibration tokens"
        )
        print(f"{'method':40s} {'peak RSS MB':>12s} {'/ model size':>13s} {'seconds':>8s}")
        for label, res, peak in rows:
            print(f"{label:40s} {peak / 1e6:12.0f} {peak / size:13.2f} {res['seconds']:8.1f}")
        print(
            f"pruned output {out_size / 1e9:.2f} GB (sparse storage); layer sparsity "
            f"{stream['sparsity']:.3f}; {CHECK} identical in both: {same}"
        )
        print(
            json.dumps(
                {
                    "model_bytes": size,
                    "out_bytes": out_size,
                    "stream": stream,
                    "stream_peak_rss": stream_peak,
                    "whole": whole,
                    "whole_peak_rss": whole_peak,
                    "identical": same,
                }
            )
        )
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
