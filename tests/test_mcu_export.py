"""export_c / export_tflite as users call them: files, checks, device budgets; the golden C
of LeNet-5; device profiles; the CLI."""

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from edgeslim import export_c, export_tflite, load_device, zoo
from edgeslim.core.errors import ConfigError, ExportError
from edgeslim.export import tflite
from edgeslim.export.c import codegen, hostbuild, planner
from edgeslim.export.int8 import build, fuse, ir, qparams, reference, trace
from mcu_helpers import mnist_images, model_and_graph

GOLDEN = Path(__file__).parent / "golden" / "lenet5"
needs_cc = pytest.mark.skipif(hostbuild.compiler() is None, reason="needs a C compiler")
needs_tflm = pytest.mark.skipif(not tflite.tflm_available(), reason="needs tflite-micro")


@needs_cc
def test_golden_c_of_lenet5():
    """The generated C of LeNet-5 (seeded weights, 64 MNIST calibration digits) is stable.

    Calibrated ranges are rounded to 0.01 first: float convolutions differ in the last bits
    between thread counts and CPUs, the generated code must not. Regenerate with
    EDGESLIM_UPDATE_GOLDEN=1 after an intended change and review the diff. weights.h (2 MB
    of numbers) is pinned by its SHA-256.
    """
    model, _ = model_and_graph("lenet5")
    calib = mnist_images((1, 28, 28), 64, "train")
    gm = trace.trace(model, calib)
    ops, first, last = trace.float_ops(gm)
    ranges = {
        k: (round(lo, 2), round(hi, 2))
        for k, (lo, hi) in qparams.calibrate_ranges(gm, calib).items()
    }
    source = qparams.CalibratedQParams(ranges)
    graph = build.build_graph(fuse.fuse(ops), first, last, (1, 1, 28, 28), source, name="lenet5")
    files = codegen.generate(graph, planner.plan_memory(graph))
    digest = hashlib.sha256(files["weights.h"].encode()).hexdigest()
    if os.environ.get("EDGESLIM_UPDATE_GOLDEN"):
        GOLDEN.mkdir(parents=True, exist_ok=True)
        for name in ("model.h", "model.c"):
            (GOLDEN / name).write_text(files[name])
        (GOLDEN / "weights.h.sha256").write_text(digest + "\n")
    for name in ("model.h", "model.c"):
        assert files[name] == (GOLDEN / name).read_text(), f"{name} differs from {GOLDEN}"
    assert digest == (GOLDEN / "weights.h.sha256").read_text().strip()
    assert "malloc" not in files["model.c"] and "float" not in files["model.c"]
    assert "int model_run(const int8_t *input, int8_t *output)" in files["model.h"]


@needs_cc
def test_export_c_writes_checked_files_and_fits_a_device(tmp_path):
    model, _ = model_and_graph("lenet5")
    calib = mnist_images((1, 28, 28), 16, "train")
    result = export_c(model, tmp_path / "out", calib=calib)
    assert sorted(p.name for p in result.files) == ["model.c", "model.h", "weights.h"]
    assert all(p.is_file() for p in result.files)
    assert "compiled C bit-exact on 16 inputs" in result.verified
    assert result.arena_bytes == 14_400 and result.plan.patch is None
    # a device with too little SRAM for the plain plan: patch-based execution kicks in
    small = tmp_path / "small.yaml"
    small.write_text(
        "name: small\ncore: cortex-m0\nsram_bytes: 10000\nflash_bytes: 1000000\n"
        "clock_mhz: 48\ncycles_per_mac: 8\n"
    )
    result = export_c(model, tmp_path / "small", str(small), calib=calib, verify=False)
    assert result.plan.patch is not None and result.arena_bytes + result.io_bytes <= 10_000
    tiny = tmp_path / "tiny.yaml"
    tiny.write_text(
        small.read_text()
        .replace("name: small", "name: tiny")
        .replace("sram_bytes: 10000", "sram_bytes: 2000")
    )
    with pytest.raises(ExportError, match=r"LeNet5 does not fit tiny: SRAM [\d,]+ B > 2,000 B$"):
        export_c(model, tmp_path / "tiny", str(tiny), calib=calib)
    assert not (tmp_path / "tiny").exists()


@needs_cc
def test_export_c_refuses_code_that_does_not_match(tmp_path, monkeypatch):
    model, _ = model_and_graph("lenet5")
    calib = mnist_images((1, 28, 28), 8, "train")
    real = codegen.generate

    def broken(graph, plan, packed=None):
        files = real(graph, plan, packed)
        files["model.c"] = files["model.c"].replace(
            "acc += ((int32_t)in[ic]", "acc -= ((int32_t)in[ic]"
        )
        return files

    monkeypatch.setattr(codegen, "generate", broken)
    with pytest.raises(ExportError, match="compiled C differs from the reference"):
        export_c(model, tmp_path / "out", calib=calib)
    assert not (tmp_path / "out").exists()


def test_export_refuses_a_graph_that_is_not_the_model(tmp_path):
    model, graph = model_and_graph("lenet5")
    torch.manual_seed(123)
    other = zoo.create("lenet5").eval()  # different weights
    calib = mnist_images((1, 28, 28), 8, "train")
    with pytest.raises(ExportError, match="differ from the PyTorch model's"):
        export_tflite(other, tmp_path / "m.tflite", calib=calib, graph=graph)
    with pytest.raises(Exception, match="calib"):
        export_tflite(model, tmp_path / "m.tflite")
    assert not (tmp_path / "m.tflite").exists()


@needs_tflm
def test_export_tflite_runs_in_tflite_micro(tmp_path, monkeypatch):
    model, graph = model_and_graph("lenet5")
    calib = mnist_images((1, 28, 28), 8, "train")
    path = export_tflite(model, tmp_path / "m.tflite", calib=calib, graph=graph)
    data = path.read_bytes()
    assert data[4:8] == b"TFL3"
    arena = tflite.tflm_arena(data)
    assert arena["head"] > 0 and arena["tail"] > 0
    assert arena["total"] == arena["head"] + arena["tail"]
    q = reference.quantize_input(graph, calib.numpy())
    assert np.array_equal(tflite.run_tflm(graph, data, q), reference.run_batch(graph, q))
    real = tflite.run_tflm
    monkeypatch.setattr(tflite, "run_tflm", lambda *args, **kw: real(*args, **kw) + 1)
    with pytest.raises(ExportError, match="TFLite Micro's outputs differ"):
        export_tflite(model, tmp_path / "bad.tflite", calib=calib, graph=graph, verify=True)
    assert not (tmp_path / "bad.tflite").exists()


def test_export_tflite_without_any_runtime_warns(tmp_path, monkeypatch):
    model, graph = model_and_graph("lenet5")
    monkeypatch.setattr(tflite, "tflm_available", lambda: False)
    monkeypatch.setattr(tflite, "litert_available", lambda: False)
    with pytest.warns(UserWarning, match="not run in TFLite Micro or LiteRT"):
        export_tflite(
            model, tmp_path / "m.tflite", calib=mnist_images((1, 28, 28), 4, "train"), graph=graph
        )
    assert (tmp_path / "m.tflite").stat().st_size > 430_000


def test_device_profiles(tmp_path):
    m4 = load_device("stm32f446")
    assert (m4.sram_bytes, m4.flash_bytes, m4.clock_mhz) == (128 * 1024, 512 * 1024, 180)
    assert load_device("cortex-m4") == m4 and load_device("Cortex-M7").name == "stm32f746"
    h7 = load_device("stm32h743")
    assert (h7.sram_bytes, h7.flash_bytes, h7.clock_mhz) == (512 * 1024, 2 * 1024**2, 480)
    assert {load_device(n).name for n in ("esp32-s3", "rpi4")} == {"esp32-s3", "raspberry-pi-4"}
    per_mac = m4.instructions().per_mac  # a bare MAC count: the one-constant fit
    assert m4.latency_ms(180_000) == pytest.approx(per_mac * m4.cycles_per_instruction)
    assert load_device("esp32-s3").latency_ms(240_000) == pytest.approx(4.0)  # 4 cycles/MAC
    assert m4.check_fit(100_000, 400_000) == []
    assert m4.check_fit(200_000, 600_000) == [
        "SRAM 200,000 B > 131,072 B",
        "flash 600,000 B > 524,288 B",
    ]
    with pytest.raises(ConfigError, match="unknown device 'stm32'; known: esp32-s3"):
        load_device("stm32")
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "name: x\ncore: y\nsram_bytes: 1\nflash_bytes: 1\nclock_mhz: 1\ncycles_per_mac: 1\nram: 5\n"
    )
    with pytest.raises(ConfigError, match="ram"):
        load_device(bad)


def _cli(*args):
    exe = shutil.which("edgeslim")
    cmd = [exe] if exe else [sys.executable, "-m", "edgeslim.cli"]
    env = {**os.environ, "EDGESLIM_QUIET": "1", "COLUMNS": "200"}
    return subprocess.run(
        [*cmd, *map(str, args)], capture_output=True, text=True, env=env, timeout=600
    )


@needs_cc
def test_cli_export_c(tmp_path):
    proc = _cli(
        "export",
        "c",
        "py:edgeslim.core.models.kws:ds_cnn",
        "--out",
        tmp_path / "c",
        "--data",
        "random",
        "--calib",
        "8",
    )
    assert proc.returncode == 0, proc.stderr
    assert "compiled C bit-exact" in proc.stdout
    assert (tmp_path / "c" / "model.c").is_file()


def test_cli_errors_exit_2_with_a_message(tmp_path, capsys):
    from edgeslim.cli import main

    assert main(["fit", "zoo:lenet5", "--device", "nope", "--data", "random"]) == 2
    assert "unknown device 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "onnx-nope", "zoo:lenet5", "--out", str(tmp_path / "x")])
    assert exit_info.value.code == 2 and "invalid choice" in capsys.readouterr().err


@pytest.mark.slow
@needs_cc
def test_cli_export_tflite_and_fit(tmp_path):
    proc = _cli(
        "export",
        "tflite",
        "py:edgeslim.core.models.kws:ds_cnn",
        "--out",
        tmp_path / "k.tflite",
        "--calib",
        "8",
    )
    assert proc.returncode == 0, proc.stderr
    assert "calibrating on random inputs" in proc.stdout and (tmp_path / "k.tflite").is_file()
    proc = _cli("fit", "zoo:lenet5", "--device", "cortex-m4", "--calib", "8")
    assert proc.returncode == 0, proc.stderr
    for text in ("STM32F446", "plain", "patches", "yes", " ms ", "thumb2-scalar-Os"):
        assert text in proc.stdout
    from edgeslim.export.c import arm

    # SRAM adds the stack measured on QEMU where the ARM toolchain and QEMU are installed
    assert ("ARM link" in proc.stdout) == (arm.toolchain() is not None)
    assert ("15,194 B" in proc.stdout) == (arm.missing() != "")


class _MeanHead(torch.nn.Module):
    """A CNN as users write it: global average pool by ``x.mean((2, 3))``, then Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.head = torch.nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.c2(torch.relu(self.c1(x))))
        return self.head(x.mean((2, 3)))


@needs_cc
def test_quantize_then_export_a_mean_head(tmp_path):
    """Regression (issue 13, point 3): PTQ's qparams of the mean head's output reach the
    lowering (the Linear's input quantizer is the source of truth; the pooled tensor is
    requantized to it), so a quantized model exports without ``calib`` to C (bit-exact)
    and ``.tflite`` (TFLite Micro, where installed)."""
    import edgeslim as es

    torch.manual_seed(0)
    x = torch.randn(64, 3, 16, 16)
    q = es.quantize(_MeanHead().eval(), es.Int8PTQ(), calib=x)
    out = export_c(q, tmp_path / "c", example=x[:1])
    assert "compiled C bit-exact on 32 inputs" in out.verified
    assert any(isinstance(op, ir.Requantize) for op in out.graph.ops)
    with torch.no_grad():
        want = q(x[:8])
    assert export_tflite(q, tmp_path / "m.tflite", calib=x[:8]).stat().st_size > 0
    assert torch.equal(q(x[:8]), want)  # exporting does not touch the model


def test_export_tflite_without_input_shape_names_only_arguments_it_takes(tmp_path):
    """Regression (issue 13, point 3): the error for a model without ``input_shape`` names
    ``example=`` / ``calib=``, and ``export_tflite`` takes ``example=``."""
    import inspect

    import edgeslim as es
    from edgeslim.core.errors import EdgeslimError

    q = es.quantize(_MeanHead().eval(), es.Int8PTQ(), calib=torch.randn(16, 3, 16, 16))
    with pytest.raises(EdgeslimError, match="example=") as info:
        export_tflite(q, tmp_path / "m.tflite")
    for fn in (export_tflite, export_c):
        named = {w.rstrip("=") for w in str(info.value).split() if w.endswith("=")}
        assert named <= set(inspect.signature(fn).parameters), (fn.__name__, named)
    export_tflite(q, tmp_path / "m.tflite", example=torch.zeros(1, 3, 16, 16), verify=False)
    assert (tmp_path / "m.tflite").exists()
