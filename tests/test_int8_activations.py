"""SiLU, Hardswish, Sigmoid and multiply in the int8 graph (issue 13, point 3).

TFLite writes SiLU as LOGISTIC then MUL, Hardswish as HARD_SWISH; the reference
interpreter transcribes TFLite Micro's fixed-point kernels (:mod:`edgeslim.quant.spec`), the
C backend indexes a 256-entry table computed from them. Every int8 input value, on several
qparams, must give the same bits in the reference, the compiled C and TFLite Micro.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgeslim.core.errors import ExportError
from edgeslim.export import int8, tflite
from edgeslim.export.c import hostbuild
from edgeslim.export.int8 import ir
from edgeslim.quant import spec_nonlinear as nl
from mcu_helpers import GraphBuilder, check_every_tensor

ALL_INT8 = np.arange(-128, 128, dtype=np.int64).reshape(1, 16, 16, 1)

# (input scale, input zp, output scale, output zp): narrow, wide, one-sided, extreme
QPARAMS = [
    (0.02, -10, 0.015, -100),
    (0.1, 5, 0.08, -90),
    (0.5, -128, 0.4, -128),
    (0.003, 60, 0.002, 0),
]


def _activation_graph(s_in, zp_in, s_out, zp_out) -> ir.Graph:
    """input -> hard swish, input -> SiLU (logistic, mul), gate = logistic(mean) -> x * gate;
    all concatenated, on 16 channels."""
    b = GraphBuilder((1, 16, 16, 1), scale=s_in, zp=zp_in)
    b.ops.append(ir.HardSwish("hs", [b.input], b.act("hs", (1, 16, 16, 1), s_out, zp_out)))
    sig = b.act("sig", (1, 16, 16, 1), 1 / 256, -128)
    b.ops.append(ir.Logistic("sig", [b.input], sig))
    b.ops.append(ir.Mul("silu", [b.input, sig], b.act("silu", (1, 16, 16, 1), s_out, zp_out)))
    pooled = b.pool("pool", b.input, "avg", 16, 16)  # (1, 1, 1, 1): a gate
    gate = b.act("gate", (1, 1, 1, 1), 1 / 256, -128)
    b.ops.append(ir.Logistic("gate", [pooled], gate))
    b.ops.append(ir.Mul("gated", [b.input, gate], b.act("gated", (1, 16, 16, 1), s_out, zp_out)))
    cat = b.act("cat", (1, 16, 16, 3), s_out, zp_out)
    b.ops.append(ir.Concat("cat", ["hs", "silu", "gated"], cat, axis=3))
    return b.graph(cat)


def _inputs(graph: ir.Graph) -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.concatenate([ALL_INT8, rng.integers(-128, 128, (2, 16, 16, 1))]).astype(np.int8)


@pytest.mark.parametrize("qp", QPARAMS, ids=lambda q: "s{}_zp{}".format(*q[:2]))
def test_every_int8_value_agrees_in_reference_c_and_tflite_micro(qp):
    graph = _activation_graph(*qp)
    q = _inputs(graph)
    check_every_tensor(graph, q)


@pytest.mark.parametrize("qp", QPARAMS, ids=lambda q: "s{}_zp{}".format(*q[:2]))
def test_the_integer_kernels_are_within_a_step_of_the_float_functions(qp):
    s_in, zp_in, s_out, zp_out = qp
    q = ALL_INT8.reshape(-1)
    x = (q - zp_in) * np.float32(s_in)
    sig = nl.logistic_int8(q, nl.logistic_params(s_in, zp_in))
    want = np.clip(np.round(256 / (1 + np.exp(-x))) - 128, -128, 127)
    assert np.abs(sig - want).max() <= 1
    hs = nl.hard_swish_int8(q, nl.hard_swish_params(s_in, zp_in, s_out, zp_out))
    want = np.clip(np.round(x * np.clip(x + 3, 0, 6) / 6 / np.float32(s_out)) + zp_out, -128, 127)
    assert np.abs(hs - want).max() <= 1
    assert np.abs(hs - want).mean() < 0.3


def test_a_logistic_output_off_its_fixed_qparams_is_refused():
    b = GraphBuilder((1, 4, 4, 1))
    b.ops.append(ir.Logistic("sig", [b.input], b.act("sig", (1, 4, 4, 1), 0.01, 0)))
    with pytest.raises(ExportError, match=r"Logistic 'sig'.*1/256"):
        b.graph("sig")


def test_a_hard_swish_whose_output_scale_is_too_small_is_refused():
    b = GraphBuilder((1, 4, 4, 1), scale=1.0)
    b.ops.append(ir.HardSwish("hs", [b.input], b.act("hs", (1, 4, 4, 1), 0.0001, 0)))
    with pytest.raises(ExportError, match="HardSwish 'hs'"):
        b.graph("hs")


class SqueezeExcite(nn.Module):
    """EfficientNet's block: depthwise conv + SiLU, squeeze-and-excite gate (mean, 1x1 convs,
    SiLU, sigmoid, x * gate), projection, Hardswish head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.reduce = nn.Conv2d(8, 4, 1)
        self.expand = nn.Conv2d(4, 8, 1)
        self.proj = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = F.silu(self.stem(x))
        y = F.silu(self.dw(x))
        gate = torch.sigmoid(self.expand(F.silu(self.reduce(y.mean((2, 3), keepdim=True)))))
        y = self.proj(y * gate)
        return self.fc(F.hardswish(x + y).mean((2, 3)))


@pytest.mark.parametrize("quantized", [False, True], ids=["calibrated", "ptq"])
def test_a_squeeze_excite_net_exports_bit_exact(tmp_path, quantized):
    """Float + calib=, and Int8PTQ then export without calib: C and TFLite Micro bit-exact."""
    from edgeslim import export_c, export_tflite
    from edgeslim.quant import Int8PTQ, quantize

    torch.manual_seed(0)
    model = SqueezeExcite().eval()
    calib = torch.randn(32, 3, 12, 12)
    kinds = {op.kind for op in int8.lower(model, calib).ops}
    assert {"Logistic", "Mul", "HardSwish"} <= kinds
    if quantized:
        model = quantize(model, Int8PTQ(), calib=calib)
        example, calib = calib[:1], None
    else:
        example = None
    if hostbuild.compiler() is not None:
        out = export_c(model, tmp_path / "c", calib=calib, example=example)
        assert any("compiled C bit-exact" in v for v in out.verified)
    if tflite.tflm_available():  # raises unless TFLite Micro is bit-exact
        export_tflite(model, tmp_path / "m.tflite", calib=calib, example=example, runtime="tflm")
        assert (tmp_path / "m.tflite").stat().st_size > 0
