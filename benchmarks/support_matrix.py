"""The architecture x technique support matrix (issue 13): every cell works or refuses cleanly.

Each architecture is built offline (random weights, tiny sizes): ``transformers`` configs
and networks written the way users write them. Each technique is applied as a user would
call it and its result checked (outputs finite and of the same shape, ONNX Runtime / TFLite
Micro / compiled C agree, pack + unpack gives the same outputs). A cell is

- ``ok``: the technique ran and its check passed;
- ``refused``: it raised an :class:`edgeslim.EdgeslimError` subclass (the reason is kept);
- ``crash``: anything else -- a raw exception or a failed check (a silently wrong model).

``python benchmarks/support_matrix.py`` runs the full matrix and writes ``docs/support.md``;
``tests/test_support_matrix.py`` runs it (a subset by default, all of it under ``-m slow``)
and requires no crash.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import edgeslim as es
from edgeslim.core.errors import EdgeslimError

# --------------------------------------------------------------------------------------
# architectures
# --------------------------------------------------------------------------------------


@dataclass
class Arch:
    """A model to compress: ``example`` (one input batch) and ``calib`` (what users pass)."""

    name: str
    model: nn.Module
    example: Any  # a tensor, or a dict of tensors (a tokenizer's output)
    calib: Any
    kind: str  # "cnn", "seq", "hf_vision" (int8 backends apply), "hf_text"


class MeanHeadCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.c1(x)))
        x = torch.relu(self.c2(x))
        return self.head(x.mean((2, 3)))


class ConcatCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 8, 1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], dim=1)
        return self.fc(torch.flatten(self.pool(x), 1))


class DWResidual(nn.Module):
    """Depthwise conv + BatchNorm + residual add, SiLU and Hardswish (MobileNet style)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(16)
        self.act0 = nn.SiLU()
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.bn1 = nn.BatchNorm2d(16)
        self.act1 = nn.Hardswish()
        self.pw = nn.Conv2d(16, 16, 1)
        self.bn2 = nn.BatchNorm2d(16)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act0(self.bn0(self.stem(x)))
        y = self.bn2(self.pw(self.act1(self.bn1(self.dw(x)))))
        x = x + y
        return self.fc(torch.flatten(self.pool(x), 1))


class Audio1d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(1, 8, 9, stride=4, padding=4)
        self.c2 = nn.Conv1d(8, 16, 5, stride=2, padding=2)
        self.fc = nn.Linear(16, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.c2(torch.relu(self.c1(x))))
        return self.fc(x.mean(-1))


class LNMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(32, 64)
        self.norm = nn.LayerNorm(64)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.norm(self.fc1(x))))


class RNNClassifier(nn.Module):
    def __init__(self, cell: type[nn.Module]) -> None:
        super().__init__()
        self.rnn = cell(12, 24, batch_first=True)
        self.fc = nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.fc(out[:, -1])


def _images(n: int, size: int = 16) -> torch.Tensor:
    return torch.randn(n, 3, size, size)


def _tokens(n: int, vocab: int, length: int = 12) -> dict[str, torch.Tensor]:
    """What ``tokenizer(texts, padding=True, return_tensors="pt")`` returns."""
    ids = torch.randint(3, vocab, (n, length))
    mask = torch.ones(n, length, dtype=torch.long)
    mask[n // 2 :, length - 3 :] = 0  # padded rows
    return {"input_ids": ids, "attention_mask": mask}


def _hf_vision(name: str, n: int) -> Arch:
    import transformers as tf

    size = 32
    common = {"num_labels": 10, "image_size": size, "num_channels": 3}
    if name == "hf-resnet":
        cfg = tf.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=10)
        model = tf.ResNetForImageClassification(cfg)
    elif name == "hf-mobilenetv2":
        cfg = tf.MobileNetV2Config(depth_multiplier=0.35, image_size=size, num_labels=10)
        model = tf.MobileNetV2ForImageClassification(cfg)
    elif name == "hf-vit":
        cfg = tf.ViTConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            patch_size=8,
            **common,
        )
        model = tf.ViTForImageClassification(cfg)
    elif name == "hf-convnext":
        cfg = tf.ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=10)
        model = tf.ConvNextForImageClassification(cfg)
    elif name == "hf-swin":
        cfg = tf.SwinConfig(
            image_size=size,
            patch_size=4,
            embed_dim=16,
            depths=[1, 1],
            num_heads=[2, 2],
            window_size=4,
            num_labels=10,
        )
        model = tf.SwinForImageClassification(cfg)
    elif name == "hf-efficientnet":
        cfg = tf.EfficientNetConfig(
            image_size=size,
            width_coefficient=0.25,
            depth_coefficient=0.25,
            hidden_dim=320,
            num_labels=10,
        )
        model = tf.EfficientNetForImageClassification(cfg)
    else:
        raise KeyError(name)
    return Arch(name, model.eval(), _images(2, size), _images(n, size), "hf_vision")


def _hf_text(name: str, n: int) -> Arch:
    import transformers as tf

    small = {"vocab_size": 128}
    if name == "hf-bert":
        cfg = tf.BertConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            num_labels=3,
            **small,
        )
        model = tf.BertForSequenceClassification(cfg)
    elif name == "hf-gpt2":
        cfg = tf.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=64, **small)
        model = tf.GPT2LMHeadModel(cfg)
    elif name == "hf-llama":
        cfg = tf.LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=64,
            **small,
        )
        model = tf.LlamaForCausalLM(cfg)
    elif name == "hf-opt":
        cfg = tf.OPTConfig(
            hidden_size=32,
            ffn_dim=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            word_embed_proj_dim=32,
            max_position_embeddings=64,
            **small,
        )
        model = tf.OPTForCausalLM(cfg)
    else:
        raise KeyError(name)
    model.config.use_cache = False  # no KV cache in the outputs (as for export)
    return Arch(name, model.eval(), _tokens(2, 128), _tokens(n, 128), "hf_text")


HAND = {
    "mean-head-cnn": (MeanHeadCNN, lambda n: _images(n), "cnn"),
    "concat-cnn": (ConcatCNN, lambda n: _images(n), "cnn"),
    "dw-residual-silu-hswish": (DWResidual, lambda n: _images(n), "cnn"),
    "audio-conv1d": (Audio1d, lambda n: torch.randn(n, 1, 256), "cnn"),
    "layernorm-gelu-mlp": (LNMLP, lambda n: torch.randn(n, 32), "seq"),
    "lstm-classifier": (lambda: RNNClassifier(nn.LSTM), lambda n: torch.randn(n, 10, 12), "seq"),
    "gru-classifier": (lambda: RNNClassifier(nn.GRU), lambda n: torch.randn(n, 10, 12), "seq"),
}
HF_VISION = [
    "hf-resnet",
    "hf-mobilenetv2",
    "hf-vit",
    "hf-convnext",
    "hf-swin",
    "hf-efficientnet",
]
HF_TEXT = ["hf-bert", "hf-gpt2", "hf-llama", "hf-opt"]
ARCHS = [*HAND, *HF_VISION, *HF_TEXT]


def build(name: str, n: int = 32) -> Arch:
    """Architecture ``name`` with seeded random weights and ``n`` calibration inputs."""
    torch.manual_seed(0)
    if name in HAND:
        make, data, kind = HAND[name]
        model = make()
        with torch.no_grad():  # non-trivial BatchNorm statistics
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.2, 0.2)
                    m.running_var.uniform_(0.5, 1.5)
        return Arch(name, model.eval(), data(2), data(n), kind)
    if name in HF_VISION:
        return _hf_vision(name, n)
    return _hf_text(name, n)


# --------------------------------------------------------------------------------------
# techniques and their checks
# --------------------------------------------------------------------------------------


class CheckFailed(AssertionError):
    """A technique ran but its result is wrong: counted as a crash."""


def forward(model: nn.Module, x: Any) -> torch.Tensor:
    """The model's main output (logits) on ``x`` (a tensor or a tokenizer's dict)."""
    model.eval()
    with torch.no_grad():
        out = model(**x) if isinstance(x, dict) else model(x)
    if isinstance(out, tuple):
        out = out[0]
    if not isinstance(out, torch.Tensor):
        out = out.logits if hasattr(out, "logits") else out[0]
    return out


def _same_shape_finite(before: torch.Tensor, model: nn.Module, x: Any) -> torch.Tensor:
    after = forward(model, x)
    if after.shape != before.shape:
        raise CheckFailed(f"output shape {tuple(after.shape)} != {tuple(before.shape)}")
    if not torch.isfinite(after).all():
        raise CheckFailed("non-finite outputs")
    return after


def _onnx_example(a: Arch) -> Any:
    if isinstance(a.example, dict):
        return dict(a.example)  # keyword inputs, as a tokenizer gives them
    return a.example


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def t_magnitude(a: Arch, tmp: Path) -> str:
    before = forward(a.model, a.example)
    es.prune_(a.model, es.MagnitudePrune(sparsity=0.5))
    _same_shape_finite(before, a.model, a.example)
    weights = [m.weight for m in a.model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    weights += [m.weight for m in a.model.modules() if type(m).__name__ == "Conv1D"]
    zeros = sum(int((w == 0).sum()) for w in weights)
    total = sum(w.numel() for w in weights)
    if total and zeros / total < 0.3:
        raise CheckFailed(f"sparsity {zeros / total:.2f} after MagnitudePrune(sparsity=0.5)")
    return f"sparsity {zeros / max(total, 1):.2f}"


def t_channel(a: Arch, tmp: Path) -> str:
    before = forward(a.model, a.example)
    es.prune_(a.model, es.ChannelPrune(ratio=0.25), calib=a.calib, example=a.example)
    _same_shape_finite(before, a.model, a.example)
    es.export_onnx(a.model, tmp / "pruned.onnx", _onnx_example(a), verify=True)
    return "shape kept, ONNX verified"


def t_int8_onnx(a: Arch, tmp: Path) -> str:
    before = forward(a.model, a.example)
    q = es.quantize(a.model, es.Int8PTQ(), calib=a.calib)
    _same_shape_finite(before, q, a.example)
    es.export_onnx(q, tmp / "int8.onnx", _onnx_example(a), verify=True)
    return "ONNX verified"


def _quantized(a: Arch) -> nn.Module:
    return es.quantize(a.model, es.Int8PTQ(), calib=a.calib)


def t_tflite(a: Arch, tmp: Path) -> str:
    from edgeslim.export import tflite

    q = _quantized(a)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        es.export_tflite(q, tmp / "m.tflite", example=a.example[:1])
    return "TFLite Micro bit-exact" if tflite.tflm_available() else "reference checked"


def t_c(a: Arch, tmp: Path) -> str:
    q = _quantized(a)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = es.export_c(q, tmp / "c", example=a.example[:1])
    return "; ".join(out.verified)


def t_kmeans_pack(a: Arch, tmp: Path) -> str:
    es.share_(a.model, es.KMeansShare(bits=4))
    x = a.example["input_ids"] if isinstance(a.example, dict) else a.example
    want = forward(a.model, x)
    es.pack(a.model, tmp / "m.slim", example=x)
    got = forward(es.unpack(tmp / "m.slim"), x)
    if got.shape != want.shape or _rel(got, want) > 1e-5:
        raise CheckFailed("unpacked model's outputs differ from the shared model's")
    return "pack/unpack same outputs"


def t_svd(a: Arch, tmp: Path) -> str:
    before = forward(a.model, a.example)
    es.lowrank_(a.model, es.SVD(energy=0.9), calib=a.calib)
    _same_shape_finite(before, a.model, a.example)
    return "shape kept"


def _oneshot(cfg: Any) -> Callable[[Arch, Path], str]:
    def run(a: Arch, tmp: Path) -> str:
        before = forward(a.model, a.example)
        if isinstance(cfg, es.GPTQ):
            es.quantize_(a.model, cfg, calib=a.calib)
        else:
            es.prune_(a.model, cfg, calib=a.calib)
        after = _same_shape_finite(before, a.model, a.example)
        return f"rel. change {_rel(after, before):.2f}"

    return run


TECHNIQUES: dict[str, Callable[[Arch, Path], str]] = {
    "magnitude": t_magnitude,
    "channel+onnx": t_channel,
    "int8+onnx": t_int8_onnx,
    "int8->tflite": t_tflite,
    "int8->C": t_c,
    "kmeans+pack": t_kmeans_pack,
    "svd": t_svd,
    "wanda": _oneshot(es.Wanda(sparsity=0.5)),
    "sparsegpt": _oneshot(es.SparseGPT(sparsity=0.5)),
    "gptq": _oneshot(es.GPTQ(bits=4, group_size=16)),
}


def kind_of(arch: str) -> str:
    return HAND[arch][2] if arch in HAND else ("hf_vision" if arch in HF_VISION else "hf_text")


def applies(arch: str, technique: str) -> bool:
    """Cells of the matrix: int8 backends for all but the language models, one-shot methods
    for those."""
    kind = kind_of(arch)
    if technique in ("int8->tflite", "int8->C"):
        return kind in ("cnn", "seq", "hf_vision")
    if technique in ("wanda", "sparsegpt", "gptq"):
        return kind == "hf_text"
    return True


def cells(archs: list[str] | None = None) -> list[tuple[str, str]]:
    return [(a, t) for a in archs or ARCHS for t in TECHNIQUES if applies(a, t)]


@dataclass
class Cell:
    arch: str
    technique: str
    status: str  # "ok", "refused", "crash"
    detail: str
    seconds: float


def run_cell(arch: str, technique: str, n: int = 32) -> Cell:
    """Build ``arch``, apply ``technique``, check it; never raises."""
    start = time.perf_counter()
    try:
        a = build(arch, n)
    except Exception as exc:  # the architecture itself is missing (e.g. no such class)
        return Cell(arch, technique, "refused", f"not built: {exc}", 0.0)
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(None):
        try:
            detail = TECHNIQUES[technique](a, Path(tmp))
            status = "ok"
        except EdgeslimError as exc:
            status, detail = "refused", f"{type(exc).__name__}: {_first_line(exc)}"
        except Exception as exc:
            tb = traceback.extract_tb(exc.__traceback__)[-1]
            where = f"{Path(tb.filename).name}:{tb.lineno}"
            status, detail = "crash", f"{type(exc).__name__} at {where}: {_first_line(exc)}"
    return Cell(arch, technique, status, detail, time.perf_counter() - start)


def _first_line(exc: BaseException) -> str:
    """The message on one line (a multi-line refusal lists the layers it cannot handle)."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    text = " ".join(lines[:3]) if lines and lines[0].endswith(":") else (lines or [""])[0]
    return text[:300]


# --------------------------------------------------------------------------------------
# docs/support.md
# --------------------------------------------------------------------------------------

MARK = {"ok": "✓", "refused": "refused", "crash": "**CRASH**"}


def render(results: list[Cell]) -> str:
    counts = {s: sum(c.status == s for c in results) for s in ("ok", "refused", "crash")}
    techs = list(TECHNIQUES)
    archs = list(dict.fromkeys(c.arch for c in results))
    by = {(c.arch, c.technique): c for c in results}
    lines = [
        "# Support matrix: architectures x techniques",
        "",
        "Generated by `python benchmarks/support_matrix.py` (do not edit by hand); the same",
        "cells run in `tests/test_support_matrix.py` (a subset by default, all under",
        "`pytest -m slow`). Tiny configurations with random weights, built offline.",
        "",
        f"**{len(results)} cells: {counts['ok']} work, {counts['refused']} refuse cleanly "
        f"(an `EdgeslimError` naming the layer or op), {counts['crash']} crash.**",
        "",
        "Checks: outputs keep their shape and stay finite; `channel+onnx` exports the pruned",
        "model to ONNX and verifies it in ONNX Runtime; `int8+onnx` quantizes with `Int8PTQ`",
        "(`calib=`) and verifies the QDQ ONNX; `int8->tflite` / `int8->C` quantize, then",
        "export without `calib=` (TFLite Micro bit-exact with the reference interpreter;",
        "compiled C bit-exact); `kmeans+pack` shares weights (4 bits), packs to `.slim`,",
        "unpacks and compares outputs; transformers are calibrated with a tokenizer-style",
        "dict (`input_ids`, `attention_mask`). Blank: the technique does not apply.",
        "",
        "| architecture | " + " | ".join(techs) + " |",
        "|---|" + "---|" * len(techs),
    ]
    for a in archs:
        row = [MARK[by[a, t].status] if (a, t) in by else "" for t in techs]
        lines.append(f"| {a} | " + " | ".join(row) + " |")
    lines += ["", "## Refusals and crashes", ""]
    for c in results:
        if c.status != "ok":
            lines.append(f"- {c.arch} × {c.technique}: {c.status}: {c.detail.replace('|', '/')}")
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/support.md")
    parser.add_argument("--arch", action="append", help="only these architectures")
    args = parser.parse_args()
    results = []
    for arch, tech in cells(args.arch):
        cell = run_cell(arch, tech)
        print(f"{cell.status:8s} {cell.seconds:6.1f}s {arch:26s} {tech:14s} {cell.detail}")
        results.append(cell)
    Path(args.out).write_text(render(results), encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
