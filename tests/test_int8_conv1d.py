"""Conv1d in the int8 graph (issue 13): a Conv2d with H = 1, so (N, C, L) is NHWC
(1, 1, L, C); BatchNorm1d folded, depthwise, "same" padding, mean over L and flatten."""

import numpy as np
import pytest
import torch
from torch import nn

from edgeslim.export import int8, tflite
from edgeslim.export.c import hostbuild
from edgeslim.export.int8 import reference
from mcu_helpers import check_every_tensor

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")


class AudioNet(nn.Module):
    def __init__(self, bn: bool = True, head: str = "flatten"):
        super().__init__()
        self.c1 = nn.Conv1d(2, 8, 9, stride=4, padding=4)
        self.bn = nn.BatchNorm1d(8) if bn else nn.Identity()
        self.dw = nn.Conv1d(8, 8, 5, padding=2, groups=8)
        self.c2 = nn.Conv1d(8, 6, 4, padding="same")
        self.head_kind = head
        self.fc = nn.Linear(6 * 16 if head == "flatten" else 6, 3)

    def forward(self, x):
        x = torch.relu(self.bn(self.c1(x)))
        x = torch.relu(self.dw(x)) + x
        x = self.c2(x)
        return self.fc(x.flatten(1) if self.head_kind == "flatten" else x.mean(-1))


def _net(**kw):
    torch.manual_seed(0)
    model = AudioNet(**kw).eval()
    if isinstance(model.bn, nn.BatchNorm1d):
        with torch.no_grad():
            model.bn.running_mean.uniform_(-0.2, 0.2)
            model.bn.running_var.uniform_(0.5, 1.5)
    return model, torch.randn(24, 2, 64)


def test_a_conv1d_net_agrees_with_pytorch_c_and_tflite_micro():
    model, calib = _net()
    graph = int8.lower(model, calib)
    assert graph[graph.input].shape == (1, 1, 64, 2)
    assert [op.kind for op in graph.ops][:3] == ["Conv2D", "Conv2D", "Add"]
    assert graph.ops[0].stride == (1, 4) and graph.ops[0].padding == (0, 4, 0, 4)
    assert graph.ops[1].depthwise and graph.ops[3].padding == (0, 1, 0, 2)  # "same", even k
    q = reference.quantize_input(graph, calib[:4].numpy())
    got = reference.dequantize(graph, graph.output, reference.run_batch(graph, q))
    with torch.no_grad():
        want = model(calib[:4]).double().numpy()
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.05
    check_every_tensor(graph, q)


def test_ptq_quantizes_conv1d_and_exports_without_calib(tmp_path):
    from edgeslim import export_c, export_tflite
    from edgeslim.quant import Int8PTQ, quantize

    model, calib = _net(head="mean")
    q = quantize(model, Int8PTQ(), calib=calib)
    assert {"c1", "dw", "c2", "fc"} <= set(q.quant_info["quantized"])
    assert q.quant_info["folded_bn"] == ["c1"]
    if hostbuild.compiler() is not None:
        out = export_c(q, tmp_path / "c", example=calib[:1])
        assert any("compiled C bit-exact" in v for v in out.verified)
    if tflite.tflm_available():  # raises unless TFLite Micro is bit-exact
        export_tflite(q, tmp_path / "m.tflite", example=calib[:1], runtime="tflm")
        assert (tmp_path / "m.tflite").exists()
