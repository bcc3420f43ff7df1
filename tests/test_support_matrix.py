"""The architecture x technique matrix (issue 13): no cell may crash.

A cell works and passes its check, or refuses with an ``EdgeslimError`` subclass naming the
layer or op; a raw exception or a failed check is a crash. The default run covers a
representative subset (every technique, every family of architecture); ``-m slow`` runs the
whole matrix, which ``benchmarks/support_matrix.py`` writes to ``docs/support.md``.
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import support_matrix as sm

pytest.importorskip("transformers")

# (architecture, technique, expected status): what the default run pins down
FAST = [
    ("mean-head-cnn", "int8->tflite", "ok"),  # issue 13 point 3: quantize, then export
    ("mean-head-cnn", "int8->C", "ok"),
    ("mean-head-cnn", "svd", "ok"),
    ("concat-cnn", "int8->C", "ok"),  # a cat no quantizer follows
    ("concat-cnn", "magnitude", "ok"),
    ("dw-residual-silu-hswish", "int8->C", "ok"),  # SiLU (LOGISTIC + MUL), HARD_SWISH
    ("dw-residual-silu-hswish", "kmeans+pack", "ok"),
    ("audio-conv1d", "int8+onnx", "ok"),
    ("audio-conv1d", "int8->tflite", "ok"),  # Conv1d as a Conv2d with H = 1
    ("layernorm-gelu-mlp", "channel+onnx", "ok"),
    ("gru-classifier", "kmeans+pack", "ok"),
    ("hf-vit", "magnitude", "ok"),
    ("hf-resnet", "int8->C", "ok"),  # torch.fx cannot trace it: captured with torch.export
    ("hf-bert", "magnitude", "ok"),
    ("hf-gpt2", "kmeans+pack", "ok"),  # a ModelOutput pytree in the .slim graph
    ("hf-opt", "wanda", "ok"),  # a tokenizer's dict as calib= (issue 13 point 2)
    # issue 13 point 3: transformers' vision models in the int8 backends (slow: ~10 s each)
    *(
        pytest.param(arch, technique, "ok", marks=pytest.mark.slow)
        for arch in ("hf-convnext", "hf-vit", "hf-swin")
        for technique in ("int8->tflite", "int8->C")
    ),
]


@pytest.mark.parametrize(("arch", "technique", "expected"), FAST, ids=lambda v: str(v))
def test_cell(arch, technique, expected):
    cell = sm.run_cell(arch, technique, n=16)
    assert cell.status != "crash", cell.detail
    assert cell.status == expected, cell.detail
    if cell.status == "refused":  # the refusal names the layer / op and a way out
        assert "EdgeslimError" in cell.detail or "Error:" in cell.detail


def test_fast_cells_cover_every_technique_and_family():
    plain = [p.values if hasattr(p, "marks") else p for p in FAST]
    assert {t for _, t, _ in plain} == set(sm.TECHNIQUES) - {"sparsegpt", "gptq"}
    kinds = {sm.kind_of(a) for a, _, _ in plain}
    assert kinds == {"cnn", "seq", "hf_vision", "hf_text"}


@pytest.mark.slow
@pytest.mark.parametrize(("arch", "technique"), sm.cells(), ids=lambda v: str(v))
def test_full_matrix_cell(arch, technique):
    cell = sm.run_cell(arch, technique)
    assert cell.status != "crash", cell.detail
