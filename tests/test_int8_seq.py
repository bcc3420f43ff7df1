"""Transformer ops in the int8 backends (issue 13 point 3): LayerNorm, GELU, permute /
transpose / reshape, attention (batch matmul, softmax on the last axis), a class token and
position embeddings, a layer scale. Reference interpreter, TFLite Micro and compiled C agree
bit for bit; what is left refuses with a LoweringError naming the op."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgeslim.core.errors import LoweringError
from edgeslim.export import tflite
from edgeslim.export.c import hostbuild
from edgeslim.export.int8 import lower, ops_seq, reference


class TinyViT(nn.Module):
    """Patch conv, tokens, class token, position embeddings, one pre-norm block."""

    def __init__(self, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, 5, dim) * 0.5)
        self.norm1 = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(2 * dim, dim)
        self.head = nn.Linear(dim, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)  # (1, 4, dim)
        b, t, d, h = x.shape[0], 5, 16, self.heads
        x = torch.cat([self.cls.expand(b, -1, -1), x], dim=1) + self.pos
        y = self.norm1(x)
        q, k, v = (m(y).reshape(b, t, h, d // h).transpose(1, 2) for m in (self.q, self.k, self.v))
        att = torch.softmax(q @ k.transpose(-2, -1) * (1 / math.sqrt(d // h)), dim=-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(b, t, d))
        x = x + self.fc2(self.act(self.fc1(self.norm2(x))))
        return self.head(x[:, 0])


class ConvNeXtBlock(nn.Module):
    """Depthwise conv, channels-last LayerNorm, GELU MLP, layer scale, residual."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 2, stride=2)
        self.dw = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.pw1 = nn.Linear(dim, 2 * dim)
        self.pw2 = nn.Linear(2 * dim, dim)
        self.gamma = nn.Parameter(torch.rand(dim) + 0.5)
        self.fc = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.gamma * self.pw2(F.gelu(self.pw1(self.norm(y))))
        x = x + y.permute(0, 3, 1, 2)
        return self.fc(x.mean((2, 3)))


def _tflm_and_c_agree(graph, q: np.ndarray, want: np.ndarray) -> None:
    """TFLite Micro (where installed) and the compiled C (where a compiler is) give the
    reference interpreter's int8 outputs ``want`` for the int8 inputs ``q``."""
    if tflite.tflm_available():
        from edgeslim.export.tflite_format import serialize

        out = tflite.run_tflm(graph, serialize(graph), q)
        assert np.array_equal(out, want.reshape(out.shape))
    if hostbuild.compiler() is not None:
        from edgeslim.export.c import check_c, codegen, planner

        check_c(graph, codegen.generate(graph, planner.plan_memory(graph)), q)  # raises


def _check_all(model: nn.Module, calib: torch.Tensor, kinds: set[str]) -> None:
    graph = lower(model, calib)
    assert kinds <= {op.kind for op in graph.ops}
    q = reference.quantize_input(graph, calib[:8].numpy())
    want = reference.run_batch(graph, q)
    got = reference.dequantize(graph, graph.output, want).reshape(8, -1)
    with torch.no_grad():
        ref = torch.cat([model(x[None]) for x in calib[:8]]).numpy()
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.2
    _tflm_and_c_agree(graph, q, want)


def test_tiny_vit_is_bit_exact_in_tflm_and_c():
    torch.manual_seed(0)
    model = TinyViT().eval()
    kinds = {"Normalize", "Lut", "BatchMatMul", "Softmax", "Transpose", "Constant", "Gather"}
    _check_all(model, torch.randn(24, 3, 8, 8), kinds)


def test_convnext_block_is_bit_exact_in_tflm_and_c():
    torch.manual_seed(1)
    model = ConvNeXtBlock().eval()
    _check_all(model, torch.randn(24, 3, 8, 8), {"Normalize", "Lut"})


def test_convnext_block_quantized_exports_without_calib(tmp_path):
    """Int8PTQ observes LayerNorm / GELU / layer-scale outputs: export needs no calib."""
    from edgeslim import export_c, export_tflite
    from edgeslim.quant import Int8PTQ, quantize

    torch.manual_seed(1)
    calib = torch.randn(32, 3, 8, 8)
    qmodel = quantize(ConvNeXtBlock().eval(), Int8PTQ(), calib=calib)
    if tflite.tflm_available():
        export_tflite(qmodel, tmp_path / "m.tflite", example=calib[:1], runtime="tflm")
        assert (tmp_path / "m.tflite").stat().st_size > 0
    if hostbuild.compiler() is not None:
        out = export_c(qmodel, tmp_path / "c", example=calib[:1])
        assert any("compiled C bit-exact" in v for v in out.verified)


def test_inverse_sqrt_multiplier_matches_float():
    for acc in (2, 3, 17, 1000, 123457, 2**29 + 5, 2**31 - 1):
        m, shift = ops_seq.inv_sqrt_multiplier(acc)
        assert m * 2.0 ** (shift - 31) == pytest.approx(acc**-0.5, rel=1e-5)
    assert ops_seq.inv_sqrt_multiplier(0) == (2**31 - 1, 0)


def test_normalize_rows_have_unit_norm():
    graph_scale = 0.05
    op = ops_seq.Normalize("n", ["x"], "y")
    op.mean_multiplier, op.mean_shift = ops_seq.mean_multiplier(1 << 30, 1, 16)
    from edgeslim.quant import spec

    op.sub = spec.add_params(graph_scale, graph_scale, ops_seq.diff_scale(graph_scale))
    q = np.random.default_rng(0).integers(-100, 100, (5, 16))
    out = ops_seq.normalize_int8(q, 3, op) / 128.0
    x = q - q.mean(axis=1, keepdims=True)
    assert np.allclose(out, x / np.linalg.norm(x, axis=1, keepdims=True), atol=0.03)


class TwoAxisNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.norm = nn.LayerNorm([4, 4])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x)).flatten(1)


def test_layernorm_over_two_dims_is_refused_naming_it():
    with pytest.raises(LoweringError, match=r"norm.*last dimension"):
        lower(TwoAxisNorm().eval(), torch.randn(4, 3, 4, 4))


def test_shufflenet_channel_shuffle_is_one_transpose_and_bit_exact():
    """chunk -> GATHER, view / transpose / view -> one TRANSPOSE per shuffle (was refused)."""
    from edgeslim import zoo

    torch.manual_seed(0)
    model = zoo.shufflenetv2().eval()
    calib = torch.randn(8, *model.input_shape)
    graph = lower(model, calib)
    shuffles = sum(1 for n, _ in model.named_modules() if n.endswith("branch2"))
    assert sum(op.kind == "Transpose" for op in graph.ops) == shuffles > 0
    q = reference.quantize_input(graph, calib[:2].numpy())
    want = reference.run_batch(graph, q)
    _tflm_and_c_agree(graph, q, want)


def test_quantized_shufflenet_lowers_its_split_half_through_the_shuffle():
    """Int8PTQ puts no quantizer on the channel split's half that goes straight into the
    next concat: its qparams are found through chunk / getitem / reshape / transpose (was
    "cat_1: no quantizer gives this tensor int8 qparams")."""
    from edgeslim import zoo
    from edgeslim.quant import Int8PTQ, quantize

    torch.manual_seed(0)
    calib = torch.randn(16, 1, 28, 28)
    qmodel = quantize(zoo.shufflenetv2().eval(), Int8PTQ(), calib=calib)
    graph = lower(qmodel, calib)
    got = reference.dequantize(
        graph,
        graph.output,
        reference.run_batch(graph, reference.quantize_input(graph, calib[:4].numpy())),
    ).reshape(4, -1)
    want = qmodel(calib[:4]).detach().numpy()
    assert np.linalg.norm(got - want) <= 0.05 * np.linalg.norm(want)


def test_float32_tflite_refuses_transformer_ops_cleanly():
    from edgeslim.export.tflite_float import lower_float

    with pytest.raises(LoweringError, match=r"no float32 \.tflite form"):
        lower_float(ConvNeXtBlock().eval(), torch.randn(2, 3, 8, 8))


def test_batch_matmul_macs_are_counted():
    torch.manual_seed(0)
    graph = lower(TinyViT().eval(), torch.randn(4, 3, 8, 8))
    mm = [op for op in graph.ops if op.kind == "BatchMatMul"]
    assert len(mm) == 2
    # q @ k^T: 2 heads x 5 x 5 outputs x 8 steps; p @ v: 2 x 5 x 8 outputs x 5 steps
    assert [graph.macs_of(op) for op in mm] == [2 * 5 * 5 * 8, 2 * 5 * 8 * 5]


def test_zoo_vit_tiny_with_fx_traced_sdpa_is_bit_exact():
    """F.scaled_dot_product_attention in a torch.fx graph is decomposed too (head-size
    scale as the softmax's beta); q, k, v = qkv.permute(...) unpacks with GATHER."""
    from edgeslim import zoo

    torch.manual_seed(0)
    model = zoo.vit_tiny().eval()
    calib = torch.randn(8, *model.input_shape)
    graph = lower(model, calib)
    assert {"BatchMatMul", "Softmax", "Normalize", "Gather"} <= {op.kind for op in graph.ops}
    q = reference.quantize_input(graph, calib[:2].numpy())
    want = reference.run_batch(graph, q)
    _tflm_and_c_agree(graph, q, want)


def test_tiny_vit_cortex_m4_build_is_bit_exact_on_qemu():
    from edgeslim.export.c import arm, codegen, planner

    if arm.toolchain() is None or arm.qemu() is None:
        pytest.skip("needs arm-none-eabi-gcc and qemu-system-arm")
    torch.manual_seed(0)
    model = TinyViT().eval()
    calib = torch.randn(8, 3, 8, 8)
    graph = lower(model, calib)
    q = reference.quantize_input(graph, calib[:2].numpy())
    result = arm.build(graph, codegen.generate(graph, planner.plan_memory(graph)), "cortex-m4", q)
    assert "bit-exact on QEMU" in result.verified[0]  # build() raises on a mismatch


class LSTMHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(6, 8, batch_first=True)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.fc(out[:, -1])


def test_lstm_is_refused_naming_the_layer():
    with pytest.raises(LoweringError, match=r"rnn \(LSTM\): not supported"):
        lower(LSTMHead().eval(), torch.randn(4, 5, 6))
