"""float32 .tflite (``export_tflite(..., dtype="float32")``): float builtin ops without
quantization, run in LiteRT (and TFLite Micro) and held to the fp32 rule of every exporter
(max |runtime - torch| <= 1e-4 + 1e-3 max |torch|) before the file counts as written."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import edgeslim as es
from edgeslim.core.errors import ExportError, LoweringError, ShapeError
from edgeslim.export import tflite, tflite_float
from edgeslim.export.tflite_format import serialize
from edgeslim.quant import Int8PTQ, quantize

needs_litert = pytest.mark.skipif(
    importlib.util.find_spec("ai_edge_litert") is None,
    reason="needs ai-edge-litert (pip install 'edgeslim[litert]')",
)
needs_tflm = pytest.mark.skipif(
    importlib.util.find_spec("tflite_micro") is None,
    reason="needs tflite-micro (pip install 'edgeslim[mcu]')",
)


class Everything(nn.Module):
    """Each layer the float file lowers: stride-2 conv + BN + ReLU6, max pool with PyTorch
    padding (PADV2), depthwise conv, Hardswish, a squeeze-and-excite gate (mean, 1x1 conv,
    sigmoid, MUL), SiLU (LOGISTIC + MUL), a residual add, cat, asymmetric zero padding (PAD),
    a flatten that permutes the FC's columns, softmax."""

    input_shape = (3, 15, 15)

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(3, 2, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(8, 8, 1), nn.Sigmoid())
        self.hswish, self.silu = nn.Hardswish(), nn.SiLU()
        self.pad = nn.ZeroPad2d((1, 0, 1, 0))
        self.mix = nn.Conv2d(16, 4, 2)
        self.fc = nn.Linear(4 * 4 * 4, 5)

    def forward(self, x):
        y = self.pool(F.relu6(self.bn(self.stem(x))))
        z = self.hswish(self.dw(y))
        z = self.silu(z * self.gate(z)) + y
        z = self.mix(self.pad(torch.cat([z, y], 1)))
        return torch.softmax(self.fc(torch.flatten(z, 1)), dim=1)


def _float_model(name: str) -> nn.Module:
    """A zoo model (or :class:`Everything`) with non-trivial BatchNorm statistics."""
    torch.manual_seed(0)
    model = Everything() if name == "everything" else es.load_model(f"zoo:{name}")
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return model.eval()


def _inputs(model: nn.Module, n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, *model.input_shape, generator=torch.Generator().manual_seed(seed))


def _ops_and_dtypes(blob: bytes) -> tuple[set[str], set[str], int]:
    """Op names, tensor dtypes and the number of quantized tensors of a .tflite file."""
    interp = tflite.litert_interpreter(blob)
    details = interp.get_tensor_details()
    ops = {d["op_name"] for d in interp._get_ops_details()} - {"DELEGATE"}
    quantized = sum(len(d["quantization_parameters"]["scales"]) > 0 for d in details)
    return ops, {np.dtype(d["dtype"]).name for d in details}, quantized


@needs_litert
@pytest.mark.parametrize(
    ("name", "expected_ops"),
    [
        ("mobilenetv2", {"CONV_2D", "DEPTHWISE_CONV_2D", "ADD", "FULLY_CONNECTED"}),
        ("lenet5", {"CONV_2D", "MAX_POOL_2D", "RESHAPE", "FULLY_CONNECTED"}),
        ("resnet8", {"CONV_2D", "ADD", "AVERAGE_POOL_2D", "FULLY_CONNECTED"}),
    ],
)
def test_float32_tflite_of_zoo_models_runs_in_litert_like_pytorch(tmp_path, name, expected_ops):
    model = _float_model(name)
    path = tflite.export_tflite(
        model, tmp_path / "m.tflite", example=_inputs(model, 8, 0), dtype="float32"
    )
    blob = path.read_bytes()
    assert blob[4:8] == b"TFL3"
    ops, dtypes, quantized = _ops_and_dtypes(blob)
    assert expected_ops <= ops and "QUANTIZE" not in ops
    assert dtypes <= {"float32", "int32"} and quantized == 0  # int32: shape operands only
    # fresh inputs, another batch size (the file's batch dimension resizes)
    x = _inputs(model, 5, 7)
    got = tflite_float.run_litert_float(blob, tflite_float.to_nhwc(x.numpy()))
    with torch.no_grad():
        want = model(x).numpy()
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-4 + 1e-3 * np.abs(want).max()
    assert (got.argmax(1) == want.argmax(1)).all()


@needs_litert
@needs_tflm
def test_every_lowered_layer_agrees_in_litert_and_tflite_micro(tmp_path):
    model = _float_model("everything")
    x = _inputs(model, 6, 3)
    path = tflite.export_tflite(
        model, tmp_path / "e.tflite", calib=x, dtype="float32", runtime="all"
    )
    blob = path.read_bytes()
    ops, _, quantized = _ops_and_dtypes(blob)
    assert {"PADV2", "PAD", "HARD_SWISH", "LOGISTIC", "MUL", "CONCATENATION", "SOFTMAX"} <= ops
    assert quantized == 0
    with torch.no_grad():
        want = model(x).numpy()
    nhwc = tflite_float.to_nhwc(x.numpy())
    for got in (
        tflite_float.run_litert_float(blob, nhwc),
        tflite_float.run_tflm_float(blob, nhwc),
    ):
        assert np.abs(got - want).max() <= 1e-6  # softmax outputs: within float rounding


def test_a_feature_map_output_and_conv1d_inputs_come_back_in_pytorchs_layout():
    x = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)
    assert np.array_equal(tflite_float.from_nhwc(tflite_float.to_nhwc(x), x.shape), x)
    seq = x[:, :, 0]  # (N, C, L) -> (N, 1, L, C)
    assert tflite_float.to_nhwc(seq).shape == (2, 1, 5, 3)
    assert np.array_equal(tflite_float.from_nhwc(tflite_float.to_nhwc(seq), seq.shape), seq)


class CumSum(nn.Module):
    input_shape = (1, 8, 8)

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)

    def forward(self, x):
        return torch.cumsum(self.conv(x), dim=1)


def test_an_unsupported_layer_is_a_lowering_error_naming_it(tmp_path):
    model = CumSum().eval()
    with pytest.raises(LoweringError, match=r"(?s)float32 \.tflite of CumSum.*cumsum.*supported:"):
        tflite.export_tflite(
            model, tmp_path / "c.tflite", example=_inputs(model, 2, 0), dtype="float32"
        )
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments_are_export_errors(tmp_path):
    model = _float_model("lenet5")
    x = _inputs(model, 4, 0)
    with pytest.raises(ExportError, match="dtype must be one of int8, float32; got 'fp16'"):
        tflite.export_tflite(model, tmp_path / "m.tflite", example=x, dtype="fp16")
    with pytest.raises(ExportError, match="runtime must be one of"):
        tflite.export_tflite(model, tmp_path / "m.tflite", example=x, dtype="float32", runtime="x")
    with pytest.raises(ExportError, match="graph= is an int8 graph"):
        tflite.export_tflite(model, tmp_path / "m.tflite", graph=object(), dtype="float32")
    q = quantize(model, Int8PTQ(), calib=x)
    with pytest.raises(ExportError, match=r"LeNet5 is quantized: a float32 \.tflite needs"):
        tflite.export_tflite(q, tmp_path / "q.tflite", calib=x, dtype="float32")
    with pytest.raises(ShapeError, match="example must be a non-empty batch"):
        tflite_float.lower_float(model, torch.zeros(0, 1, 28, 28))
    assert list(tmp_path.iterdir()) == []


@needs_litert
def test_a_disagreeing_runtime_writes_nothing_and_keeps_the_old_file(tmp_path, monkeypatch):
    model = _float_model("lenet5")
    target = tmp_path / "m.tflite"
    target.write_bytes(b"the user's old file")
    real = tflite_float.run_litert_float
    monkeypatch.setattr(tflite_float, "run_litert_float", lambda *a, **k: real(*a, **k) + 0.01)
    with pytest.raises(ExportError, match=r"max \|LiteRT - torch\| = 0\.01.*not written"):
        tflite.export_tflite(model, target, example=_inputs(model, 4, 0), dtype="float32")
    assert target.read_bytes() == b"the user's old file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.tflite"]


@needs_litert
def test_the_file_is_written_atomically_with_the_serialized_graph(tmp_path, monkeypatch):
    model = _float_model("lenet5")
    x = _inputs(model, 4, 0)
    writes = []
    real = tflite_float.atomic_write_bytes
    monkeypatch.setattr(
        tflite_float, "atomic_write_bytes", lambda p, d: writes.append(p) or real(p, d)
    )
    path = tflite.export_tflite(model, tmp_path / "m.tflite", example=x, dtype="float32")
    assert writes == [tmp_path / "m.tflite"]
    assert path.read_bytes() == serialize(tflite_float.lower_float(model, x, name="LeNet5"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.tflite"]  # no temporary left


def test_without_litert_the_float_file_is_refused_by_name(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ai_edge_litert", None)
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)
    model = _float_model("lenet5")
    with pytest.raises(ExportError, match=r"LiteRT is not installed.*edgeslim\[litert\]"):
        tflite.export_tflite(
            model, tmp_path / "m.tflite", example=_inputs(model, 2, 0), dtype="float32"
        )
    assert list(tmp_path.iterdir()) == []
    path = tflite.export_tflite(  # verify=False: written unchecked
        model, tmp_path / "m.tflite", example=_inputs(model, 2, 0), dtype="float32", verify=False
    )
    assert path.read_bytes()[4:8] == b"TFL3"


@needs_litert
def test_cli_export_litert_float32(tmp_path):
    root = Path(__file__).resolve().parents[1]
    paths = [str(root / "src"), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    out = tmp_path / "m.tflite"
    cmd = [sys.executable, "-m", "edgeslim.cli", "export", "litert", "zoo:lenet5"]
    cmd += ["--out", str(out), "--dtype", "float32", "--data", "random", "--calib", "4"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "verified in LiteRT" in proc.stdout and "TFLite Micro" not in proc.stdout
    assert out.read_bytes()[4:8] == b"TFL3"
    _, _, quantized = _ops_and_dtypes(out.read_bytes())
    assert quantized == 0
