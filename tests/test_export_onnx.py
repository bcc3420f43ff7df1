"""ONNX export: fp32 and int8 QDQ files checked in ONNX Runtime against PyTorch."""

import numpy as np
import onnxruntime as ort
import pytest
import torch

from edgeslim import zoo
from edgeslim.core.errors import ExportError
from edgeslim.export import onnx as onnx_export
from edgeslim.export.onnx import export_onnx
from edgeslim.quant import Int8PTQ, quantize


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(0)
    return torch.rand(64, 1, 28, 28, generator=g)


def _run(path, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x.numpy()})[0]


def test_fp32_export_matches_torch(tmp_path, inputs):
    torch.manual_seed(0)
    model = zoo.create("lenet5").eval()
    res = export_onnx(model, tmp_path / "m.onnx", inputs[:4])
    assert res.path.is_file() and res.size_bytes == res.path.stat().st_size
    assert not res.quantized and res.max_abs_diff <= res.tolerance
    # the batch dimension is dynamic: another batch size runs and agrees
    got = _run(res.path, inputs[:7])
    assert np.allclose(got, model(inputs[:7]).detach().numpy(), atol=1e-4)


def test_int8_qdq_export_fuses_into_integer_kernels(tmp_path, inputs):
    torch.manual_seed(0)
    q = quantize(zoo.create("lenet5").eval(), Int8PTQ(), calib=inputs)
    res = export_onnx(q, tmp_path / "q.onnx", inputs[:8])
    assert res.quantized
    assert res.integer_ops == {"QLinearConv": 2, "QGemm": 2}  # every layer runs in int8
    assert res.max_abs_diff <= res.tolerance
    # int8 weights: the file is about a quarter of the fp32 one
    fp32 = export_onnx(zoo.create("lenet5").eval(), tmp_path / "f.onnx", inputs[:2], verify=False)
    assert res.size_bytes < 0.3 * fp32.size_bytes
    # ORT agrees with the integer simulation on other inputs too (within 2 output steps)
    with torch.no_grad():
        ref = q(inputs).numpy()
    got = _run(res.path, inputs)
    assert np.abs(got - ref).max() <= res.tolerance
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.98


@pytest.mark.slow
def test_int8_residual_net_exports(tmp_path, inputs):
    torch.manual_seed(0)
    q = quantize(zoo.create("mobilenetv2").eval(), Int8PTQ(), calib=inputs)
    res = export_onnx(q, tmp_path / "q.onnx", inputs[:4])
    assert res.integer_ops.get("QLinearConv", 0) >= 14
    assert res.max_abs_diff <= res.tolerance


def test_mismatch_raises_and_writes_nothing(tmp_path, inputs, monkeypatch):
    model = zoo.create("lenet5").eval()
    real = onnx_export._first_output
    monkeypatch.setattr(onnx_export, "_first_output", lambda out: real(out) + 1.0)
    with pytest.raises(ExportError, match="disagrees with PyTorch"):
        export_onnx(model, tmp_path / "m.onnx", inputs[:2])
    assert not (tmp_path / "m.onnx").exists()
    assert list(tmp_path.iterdir()) == []  # no temporary left behind


def test_bad_example_raises(tmp_path):
    with pytest.raises(ExportError, match="example must be a tensor"):
        export_onnx(zoo.create("lenet5"), tmp_path / "m.onnx", "not a tensor")
    with pytest.raises(ExportError, match=r"torch\.onnx\.export failed"):
        export_onnx(zoo.create("lenet5"), tmp_path / "m.onnx", torch.zeros(1, 3, 5, 5))


def test_cli_export_onnx_int8(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "EDGESLIM_QUIET": "1", "COLUMNS": "200"}
    out = tmp_path / "m.onnx"
    cmd = [
        sys.executable,
        "-m",
        "edgeslim.cli",
        "export",
        "onnx",
        "zoo:lenet300",
        "--out",
        str(out),
    ]
    proc = subprocess.run(
        [*cmd, "--int8", "--calib-size", "64"], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert "int8 QDQ" in proc.stdout and "QGemm x3" in proc.stdout
    assert out.is_file()
    bad = subprocess.run(
        [*cmd[:5], "zoo:nope", "--out", str(out)], capture_output=True, text=True, env=env
    )
    assert bad.returncode == 2 and "unknown zoo model" in bad.stderr


@pytest.mark.parametrize(
    ("mask", "causal", "gqa"),
    [(None, False, False), ("float", False, False), ("bool", False, False), (None, True, True)],
)
def test_attention_math_is_scaled_dot_product_attention(mask, causal, gqa):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 5, 8, generator=g)
    k, v = (torch.randn(2, 2 if gqa else 4, 5, 8, generator=g) for _ in range(2))
    m = {"float": torch.randn(1, 4, 5, 5, generator=g), "bool": torch.rand(5, 5) > 0.3}.get(mask)
    if mask == "bool":
        m[:, 0] = True  # every row keeps a key
    kw = {"attn_mask": m, "is_causal": causal, "enable_gqa": gqa, "scale": 0.3}
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, **kw)
    torch.testing.assert_close(onnx_export.attention_math(q, k, v, **kw), want)


def _tiny_swin():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.SwinConfig(
        image_size=16, patch_size=4, embed_dim=8, depths=[1], num_heads=[2], window_size=2,
        num_labels=3,
    )  # fmt: skip
    return transformers.SwinForImageClassification(cfg).eval()


def test_swin_exports_through_eager_attention(tmp_path):
    # torch.onnx cannot decompose Swin's masked SDPA (a view of the fused kernel's strides)
    model = _tiny_swin()
    res = export_onnx(model, tmp_path / "swin.onnx", torch.randn(2, 3, 16, 16))
    assert res.max_abs_diff <= res.tolerance
    assert model.config._attn_implementation == "sdpa"  # restored


@pytest.mark.slow
def test_int8_swin_graph_exports_through_math_attention(tmp_path):
    model = _tiny_swin()
    q = quantize(model, Int8PTQ(), calib=torch.randn(8, 3, 16, 16))
    sdpa = torch.ops.aten.scaled_dot_product_attention.default
    before = [n.target for n in q.graph.nodes]
    assert sdpa in before  # a captured graph holding the fused attention kernel
    res = export_onnx(q, tmp_path / "swin.onnx", torch.randn(2, 3, 16, 16))
    assert res.quantized and res.max_abs_diff is not None
    assert [n.target for n in q.graph.nodes] == before  # the graph is left as it was
