"""The runtimes people deploy to: OpenVINO IR run in OpenVINO Runtime, .tflite run in LiteRT,
each checked against PyTorch (or the int8 reference) before the file counts as written; the
``edgeslim export`` commands for them."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from edgeslim.core.errors import ExportError
from edgeslim.export import onnx as onnx_export
from edgeslim.export import tflite, tflite_format
from edgeslim.export.int8 import reference
from edgeslim.quant import Int8PTQ, quantize


class Tiny(nn.Module):
    """Conv, depthwise conv, residual add, pooling, linear: small enough to export quickly."""

    input_shape = (3, 12, 12)

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = torch.relu(self.c1(x))
        x = x + torch.relu(self.dw(x))
        return self.fc(torch.flatten(self.pool(x), 1))


@pytest.fixture(scope="module")
def data():
    torch.manual_seed(0)
    model = Tiny().eval()
    x = torch.rand(32, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    return model, x, quantize(model, Int8PTQ(), calib=x)


# --------------------------------------------------------------------------------------
# OpenVINO
# --------------------------------------------------------------------------------------


needs_openvino = pytest.mark.skipif(
    importlib.util.find_spec("openvino") is None,
    reason="needs openvino (pip install 'edgeslim[openvino]')",
)


@needs_openvino
def test_openvino_int8_runs_and_agrees(tmp_path, data):
    from edgeslim.export.openvino import compile_ir, export_openvino, run_ir

    _, x, q = data
    int8 = export_openvino(q, tmp_path / "q.xml", x[:8])
    assert int8.path.is_file() and int8.bin_path == tmp_path / "q.bin"
    assert int8.size_bytes == int8.path.stat().st_size + int8.bin_path.stat().st_size
    assert int8.quantized and int8.max_abs_diff <= int8.tolerance
    # OpenVINO runs the convolutions and the linear layer with int8 kernels
    assert int8.integer_ops.get("Convolution", 0) >= 2 and "FullyConnected" in int8.integer_ops
    # the batch is dynamic: the written IR runs another batch size and agrees with PyTorch's
    # integer simulation within the tolerance the check used
    from edgeslim.quant.modules import set_mode

    got = run_ir(compile_ir(int8.path), (x,))
    set_mode(q, "exact")
    with torch.no_grad():
        want = q(x).numpy()
    assert np.abs(got - want).max() <= int8.tolerance
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.95
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.bin", "q.xml"]


@pytest.mark.slow
@needs_openvino
def test_openvino_fp32_and_int8_mobilenetv2(tmp_path):
    from edgeslim import zoo
    from edgeslim.export.openvino import export_openvino

    torch.manual_seed(0)
    model = zoo.create("mobilenetv2").eval()
    x = torch.rand(32, *model.input_shape)
    fp32 = export_openvino(model, tmp_path / "f.xml", x[:4])
    assert not fp32.quantized and fp32.max_abs_diff <= fp32.tolerance < 1e-2
    int8 = export_openvino(quantize(model, Int8PTQ(), calib=x), tmp_path / "q.xml", x[:4])
    assert int8.max_abs_diff <= int8.tolerance or int8.rel_l2_error <= int8.tolerance
    assert int8.integer_ops.get("Convolution", 0) >= 14
    assert int8.bin_path.stat().st_size < 0.4 * fp32.bin_path.stat().st_size


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory, data):
    """The fp32 ONNX file of ``Tiny`` (exported once; the failure tests start from it)."""
    return onnx_export.export_onnx(data[0], tmp_path_factory.mktemp("onnx") / "t.onnx", data[1][:2])


@needs_openvino
def test_openvino_mismatch_and_bad_input_write_nothing(tmp_path, data, tiny_onnx, monkeypatch):
    import shutil

    from edgeslim.export import openvino as ov_export

    def cached_onnx(model, path, *args, **kwargs):
        shutil.copy(tiny_onnx.path, path)
        return onnx_export.ExportResult(Path(path), tiny_onnx.size_bytes, False)

    monkeypatch.setattr(ov_export, "export_onnx", cached_onnx)
    model, x, _ = data
    real = onnx_export._first_output
    monkeypatch.setattr(onnx_export, "_first_output", lambda out: real(out) + 1.0)
    with pytest.raises(ExportError, match="fp32 OpenVINO export of Tiny disagrees with PyTorch"):
        ov_export.export_openvino(model, tmp_path / "m.xml", x[:2])
    monkeypatch.setattr(onnx_export, "_first_output", real)
    with pytest.raises(ExportError, match=r"must end in \.xml"):
        ov_export.export_openvino(model, tmp_path / "m.onnx", x[:2])
    with pytest.raises(ExportError, match="example must be a tensor"):
        ov_export.export_openvino(model, tmp_path / "m.xml", "not a tensor")

    def broken(*args, **kwargs):
        raise RuntimeError("unsupported operation\nmore detail")

    monkeypatch.setattr("openvino.convert_model", broken)
    with pytest.raises(ExportError, match="OpenVINO could not convert Tiny: RuntimeError"):
        ov_export.export_openvino(model, tmp_path / "m.xml", x[:2])
    assert list(tmp_path.iterdir()) == []  # neither file, no temporary left behind


def test_openvino_missing_is_a_clear_error(tmp_path, data, monkeypatch):
    from edgeslim.export.openvino import export_openvino

    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino -> ImportError
    with pytest.raises(ExportError, match=r"edgeslim\[openvino\]"):
        export_openvino(data[0], tmp_path / "m.xml", data[1][:2])


# --------------------------------------------------------------------------------------
# LiteRT
# --------------------------------------------------------------------------------------


needs_litert = pytest.mark.skipif(
    importlib.util.find_spec("ai_edge_litert") is None,
    reason="needs ai-edge-litert (pip install 'edgeslim[litert]')",
)


@needs_litert
def test_tflite_runs_in_litert(tmp_path, data):
    _, x, q = data
    path = tflite.export_tflite(q, tmp_path / "q.tflite", calib=x, runtime="litert")
    blob = path.read_bytes()
    from edgeslim.export.int8 import lower

    graph = lower(q, x, name=type(q).__name__)
    assert tflite_format.serialize(graph) == blob
    qx = reference.quantize_input(graph, x.numpy())
    got = tflite.run_litert(blob, qx)
    want = reference.run_batch(graph, qx).reshape(got.shape)
    assert np.abs(got - want).max() <= tflite.LITERT_STEPS
    stats = tflite.check_litert(graph, blob, qx)
    assert stats["max_steps"] == np.abs(got - want).max()
    # and it agrees with the PyTorch int8 model on the top-1 class
    with torch.no_grad():
        top1 = q(x).argmax(1).numpy()
    assert (got.argmax(1) == top1).mean() >= 0.9


@needs_litert
def test_tflite_litert_mismatch_writes_nothing(tmp_path, data, monkeypatch):
    model, x, _ = data
    real = tflite.run_litert
    monkeypatch.setattr(tflite, "run_litert", lambda *a, **kw: real(*a, **kw) + 10)
    with pytest.raises(ExportError, match="LiteRT's outputs differ from the reference"):
        tflite.export_tflite(model, tmp_path / "m.tflite", calib=x, runtime="litert")
    assert list(tmp_path.iterdir()) == []


def test_tflite_runtime_choice_is_validated(tmp_path, data, monkeypatch):
    model, x, _ = data
    with pytest.raises(ExportError, match="runtime must be one of auto, tflm, litert, all"):
        tflite.export_tflite(model, tmp_path / "m.tflite", calib=x, runtime="tpu")
    monkeypatch.setitem(sys.modules, "ai_edge_litert", None)
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)
    assert not tflite.litert_available()
    with pytest.raises(ExportError, match=r"LiteRT is not installed.*edgeslim\[litert\]"):
        tflite.export_tflite(model, tmp_path / "m.tflite", calib=x, runtime="litert")
    monkeypatch.setattr(tflite, "tflm_available", lambda: False)
    with pytest.warns(UserWarning, match="not run in TFLite Micro or LiteRT"):
        tflite.export_tflite(model, tmp_path / "m.tflite", calib=x)
    assert (tmp_path / "m.tflite").is_file()


# --------------------------------------------------------------------------------------
# ExecuTorch (optional extra, not in dev: see docs/runtimes.md)
# --------------------------------------------------------------------------------------

needs_executorch = pytest.mark.skipif(
    importlib.util.find_spec("executorch") is None,
    reason="needs executorch (pip install 'edgeslim[executorch]')",
)


@needs_executorch
def test_executorch_fp32_pte_runs_and_agrees(tmp_path, data, monkeypatch):
    from edgeslim.export.executorch import export_executorch, load_pte

    model, x, _ = data
    res = export_executorch(model, tmp_path / "m.pte", x[:4])
    assert res.path.is_file() and res.size_bytes == res.path.stat().st_size
    assert not res.quantized and res.max_abs_diff <= res.tolerance < 1e-3
    got = load_pte(res.path).execute([x[4:8]])[0]
    assert torch.allclose(got, model(x[4:8]), atol=res.tolerance)
    real = onnx_export._first_output
    monkeypatch.setattr(onnx_export, "_first_output", lambda out: real(out) + 1.0)
    with pytest.raises(ExportError, match="fp32 ExecuTorch export of Tiny disagrees"):
        export_executorch(model, tmp_path / "bad.pte", x[:4])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pte"]


def test_executorch_refuses_quantized_and_names_the_extra(tmp_path, data, monkeypatch):
    from edgeslim.export.executorch import export_executorch

    model, x, q = data
    with pytest.raises(ExportError, match="Tiny is quantized: ExecuTorch export takes float"):
        export_executorch(q, tmp_path / "q.pte", x[:1])
    monkeypatch.setitem(sys.modules, "executorch", None)
    monkeypatch.setitem(sys.modules, "executorch.exir", None)
    with pytest.raises(ExportError, match=r"edgeslim\[executorch\]"):
        export_executorch(model, tmp_path / "m.pte", x[:1])
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------
# the CLI
# --------------------------------------------------------------------------------------


def _cli(*args):
    paths = [str(Path(__file__).parents[1] / "src"), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    cmd = [sys.executable, "-m", "edgeslim.cli", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


@needs_openvino
@needs_litert
def test_cli_export_openvino_and_litert(tmp_path):
    proc = _cli("export", "openvino", "zoo:lenet5", "--out", tmp_path / "m.xml")
    assert proc.returncode == 0, proc.stderr
    assert "wrote fp32 OpenVINO IR" in proc.stdout
    assert "verified in OpenVINO Runtime: max |openvino - torch|" in proc.stdout
    assert (tmp_path / "m.xml").is_file() and (tmp_path / "m.bin").is_file()
    proc = _cli(
        "export", "litert", "zoo:lenet5", "--out", tmp_path / "m.tflite", "--calib", "8",
        "--data", "random",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "verified in LiteRT" in proc.stdout and (tmp_path / "m.tflite").is_file()
    assert (tmp_path / "m.tflite").read_bytes()[4:8] == b"TFL3"
    proc = _cli("export", "openvino", "zoo:lenet5", "--out", tmp_path / "m.onnx")
    assert proc.returncode == 2 and "must end in .xml" in proc.stderr


def test_cli_export_executorch(tmp_path):
    proc = _cli("export", "executorch", "zoo:lenet5", "--out", tmp_path / "m.pte")
    if importlib.util.find_spec("executorch") is None:
        assert proc.returncode == 2 and "edgeslim[executorch]" in proc.stderr
        assert not (tmp_path / "m.pte").exists()
    else:
        assert proc.returncode == 0, proc.stderr
        assert "verified in ExecuTorch: max |pte - torch|" in proc.stdout
        assert (tmp_path / "m.pte").is_file()
