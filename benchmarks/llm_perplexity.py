"""A small GPT-2 trained on real English, then pruned and quantized one-shot: perplexity.

    flock /tmp/edgeslim-cpu.lock python benchmarks/llm_perplexity.py

1. Text: the Python standard library's docstrings (:mod:`edgeslim.core.data.text`), split by module
   into train / val / test (disjoint modules; manifest written to ``--out``).
2. Tokenizer: a byte-level BPE (``tokenizers``) of ``--vocab`` tokens trained on the train split.
3. Model: GPT-2 architecture (transformers), ``--layers`` x ``--width``, context ``--seq``,
   trained from scratch on the train split for ``--steps`` AdamW steps on 2 threads (saved in
   ``--cache`` and reused on the next run).
4. Perplexity, WikiText-style as in the SparseGPT / Wanda evaluation code: the test paragraphs
   joined by blank lines are tokenized as one stream, cut into non-overlapping windows of
   ``--seq`` tokens (the remainder dropped), and ppl = exp(mean next-token cross-entropy over
   all windows).
5. Calibration: 128 windows of ``--seq`` tokens at seeded random offsets of the train stream.

Rows: dense; magnitude (per layer), Wanda and SparseGPT at 50% unstructured and 2:4; RTN vs
GPTQ int4 with group size 128; naive W8A8 vs SmoothQuant W8A8 (alpha 0.5), all on the linear
layers of the transformer blocks (embeddings and LM head stay in float, as in the papers).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("EDGESLIM_QUIET", "1")

from _llm_common import magnitude_blocks_
from edgeslim.core.data.text import load_text, perplexity
from edgeslim.core.models.hf import load_hf, save_hf
from edgeslim.prune import SparseGPT, Wanda, prune_
from edgeslim.quant import GPTQ, RTN, SmoothQuant, quantize_

EOS = "<|endoftext|>"


def train_tokenizer(texts: list[str], vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=[EOS],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def stream(tok, texts: list[str]) -> torch.Tensor:
    eos = tok.token_to_id(EOS)
    ids: list[int] = []
    for enc in tok.encode_batch(texts):
        ids.extend(enc.ids)
        ids.append(eos)
    return torch.tensor(ids)


def train(
    model, tokens: torch.Tensor, val: torch.Tensor, args: argparse.Namespace
) -> list[dict[str, float]]:
    """AdamW with warm-up and cosine decay; every ``--eval-every`` steps the validation
    perplexity is measured and the best weights are kept (early stopping: the corpus is
    small, and an over-fitted dense model would make pruning look like a regulariser)."""
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    steps, seq = args.steps, args.seq
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    history: list[dict[str, float]] = []
    best, best_state = math.inf, None
    start = time.perf_counter()
    for step in range(1, steps + 1):
        model.train()
        idx = torch.randint(0, tokens.numel() - seq - 1, (args.batch,), generator=g)
        x = torch.stack([tokens[i : i + seq] for i in idx.tolist()])
        loss = model(x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % args.eval_every == 0 or step == steps:
            model.eval()
            ppl = perplexity(model, val, seq)
            history.append({"step": step, "train_loss": loss.item(), "val_ppl": ppl})
            print(
                f"step {step:4d} loss {loss.item():.3f} val ppl {ppl:.2f} "
                f"({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
            if ppl < best:
                best, best_state = ppl, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    model.eval()
    return history


def fidelity(dense, model, tokens: torch.Tensor, seq: int, windows: int = 128, batch: int = 16):
    """Mean per-token KL(dense || model) of the next-token distributions and the share of
    tokens whose top-1 prediction is unchanged, on the first ``windows`` test windows."""
    n = min(windows, tokens.numel() // seq)
    x_all = tokens[: n * seq].reshape(n, seq)
    kl, agree, count = 0.0, 0, 0
    with torch.inference_mode():
        for i in range(0, n, batch):
            x = x_all[i : i + batch]
            p = torch.log_softmax(dense(x).logits.double(), -1)  # (B, seq, vocab)
            q = torch.log_softmax(model(x).logits.double(), -1)
            kl += float((p.exp() * (p - q)).sum(-1).sum())
            agree += int((p.argmax(-1) == q.argmax(-1)).sum())
            count += x.numel()
    return kl / count, agree / count


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--eval-every", type=int, default=50, help="steps between val checks")
    p.add_argument("--dropout", type=float, default=0.2)
    p.add_argument("--calib", type=int, default=128, help="calibration windows")
    p.add_argument("--cache", default="/tmp/edgeslim-gpt2-docstrings")
    p.add_argument("--out", default="benchmarks/results/llm_perplexity.json")
    args = p.parse_args()
    torch.set_num_threads(2)
    from tokenizers import Tokenizer
    from transformers import GPT2Config, GPT2LMHeadModel

    corpus = load_text("stdlib")
    cache = Path(args.cache)
    key = (
        f"l{args.layers}-w{args.width}-h{args.heads}-s{args.seq}-v{args.vocab}"
        f"-n{args.steps}-b{args.batch}-lr{args.lr}-d{args.dropout}-es"
    )
    model_dir, tok_file = cache / key, cache / key / "bpe.json"
    train_seconds, history = None, None
    if (model_dir / "config.json").is_file():
        tok = Tokenizer.from_file(str(tok_file))
        dense = load_hf(model_dir)
        print(f"reusing the trained model in {model_dir}")
    else:
        tok = train_tokenizer(corpus.train, args.vocab)
        torch.manual_seed(0)
        cfg = GPT2Config(
            n_layer=args.layers,
            n_embd=args.width,
            n_head=args.heads,
            n_positions=args.seq,
            vocab_size=tok.get_vocab_size(),
            bos_token_id=tok.token_to_id(EOS),
            eos_token_id=tok.token_to_id(EOS),
            resid_pdrop=args.dropout,
            embd_pdrop=args.dropout,
            attn_pdrop=args.dropout,
        )
        dense = GPT2LMHeadModel(cfg)
        start = time.perf_counter()
        val_tokens = stream(tok, ["\n\n".join(corpus.val)])
        history = train(dense, stream(tok, corpus.train), val_tokens, args)
        train_seconds = time.perf_counter() - start
        save_hf(dense, model_dir)
        tok.save(str(tok_file))
        from transformers import PreTrainedTokenizerFast  # so that hf:DIR finds its tokenizer

        PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS).save_pretrained(model_dir)
    train_tokens = stream(tok, corpus.train)
    test_tokens = stream(tok, ["\n\n".join(corpus.test)])
    g = torch.Generator().manual_seed(0)
    offsets = torch.randint(0, train_tokens.numel() - args.seq, (args.calib,), generator=g)
    calib = torch.stack([train_tokens[i : i + args.seq] for i in offsets.tolist()])  # (128, seq)

    methods = {
        "dense": None,
        "magnitude 50%": lambda m: magnitude_blocks_(m, 0.5),
        "wanda 50%": lambda m: prune_(m, Wanda(sparsity=0.5), calib=calib),
        "sparsegpt 50%": lambda m: prune_(m, SparseGPT(sparsity=0.5), calib=calib),
        "magnitude 2:4": lambda m: magnitude_blocks_(m, n=2, m=4),
        "wanda 2:4": lambda m: prune_(m, Wanda(n=2, m=4), calib=calib),
        "sparsegpt 2:4": lambda m: prune_(m, SparseGPT(n=2, m=4), calib=calib),
        "RTN int4 g128": lambda m: quantize_(m, RTN(bits=4, group_size=128)),
        "GPTQ int4 g128": lambda m: quantize_(m, GPTQ(bits=4, group_size=128), calib=calib),
        "naive W8A8": lambda m: quantize_(m, SmoothQuant(smooth=False), calib=calib),
        "SmoothQuant W8A8": lambda m: quantize_(m, SmoothQuant(alpha=0.5), calib=calib),
    }
    rows = []
    for label, run in methods.items():
        model = copy.deepcopy(dense)
        start = time.perf_counter()
        if run is not None:
            run(model)
        seconds = time.perf_counter() - start
        ppl = perplexity(model, test_tokens, args.seq)
        kl, agree = fidelity(dense, model, test_tokens, args.seq)
        with tempfile.TemporaryDirectory() as d:
            size = save_hf(model, d).stat().st_size
        rows.append(
            {
                "method": label,
                "perplexity": ppl,
                "kl_to_dense": kl,
                "top1_agreement": agree,
                "seconds": seconds,
                "file_bytes": size,
            }
        )
        print(json.dumps(rows[-1]), flush=True)

    table = Table(
        title=f"GPT-2 {args.layers}x{args.width} on stdlib docstrings: test perplexity "
        f"({test_tokens.numel() // args.seq} windows of {args.seq} tokens)"
    )
    for col in ("method", "perplexity", "x dense", "KL to dense", "top-1 agree", "file KiB", "s"):
        table.add_column(col, justify="right")
    base = rows[0]["perplexity"]
    for r in rows:
        table.add_row(
            r["method"],
            f"{r['perplexity']:.2f}",
            f"{r['perplexity'] / base:.2f}",
            f"{r['kl_to_dense']:.4f}",
            f"{100 * r['top1_agreement']:.1f}%",
            f"{r['file_bytes'] / 1024:,.0f}",
            f"{r['seconds']:.1f}",
        )
    Console().print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "rows": rows,
                "args": vars(args),
                "train_seconds": train_seconds,
                "train_history": history,
                "params": sum(p.numel() for p in dense.parameters()),
                "train_tokens": train_tokens.numel(),
                "test_tokens": test_tokens.numel(),
                "corpus": corpus.manifest(),
            },
            indent=1,
        )
    )
    print(f"results and text manifest: {out}")


if __name__ == "__main__":
    main()
