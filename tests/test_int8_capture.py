"""The int8 graph of a model torch.fx cannot trace, captured with torch.export (issue 13,
point 3): transformers-style code (the input's channels checked in Python, TF "same"
padding computed from the input's size, ``x += residual`` then ReLU, a max-pool with
padding, a ``ModelOutput``) quantizes in graph mode and exports bit-exact."""

from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from edgeslim.core.capture import CaptureError, capture, torch_leaf
from edgeslim.export import int8, tflite
from edgeslim.export.c import hostbuild


class Output(OrderedDict):
    """A minimal ``ModelOutput``: a dict with attribute access, a pytree node."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


torch.utils._pytree.register_pytree_node(
    Output,
    lambda o: (list(o.values()), list(o.keys())),
    lambda values, keys: Output(zip(keys, values, strict=True)),
)


class UntraceableNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.num_channels = 3
        self.stem = nn.Conv2d(3, 8, 3, stride=2)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU()
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        if x.shape[1] != self.num_channels:  # torch.fx: a Proxy in control flow
            raise ValueError("wrong channels")
        h = x.shape[-2]
        pad_h = max((int(h) + 1) // 2 * 2 - 2 + 3 - int(h), 0)  # TF "same", from the size
        x = F.pad(x, (pad_h // 2, pad_h - pad_h // 2, pad_h // 2, pad_h - pad_h // 2))
        x = self.act(self.bn(self.stem(x)))
        x = self.pool(x)
        y = self.conv(x)
        y += x  # in place, as transformers' ResNet
        y = self.act(y)  # one ReLU module called twice
        return Output(logits=self.head(y.mean((2, 3))))


def _calib():
    torch.manual_seed(0)
    return torch.randn(16, 3, 16, 16)


def test_torch_fx_cannot_trace_it_and_capture_can():
    model = UntraceableNet().eval()
    with pytest.raises(Exception):  # noqa: B017 - fx raises several types here
        fx.symbolic_trace(model)
    x = _calib()
    gm = capture(model, x[:1], torch_leaf)
    calls = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert calls.count("act") == 2  # the ReLU module's two calls stay two calls
    assert {"stem", "bn", "pool", "conv", "head"} <= set(calls)
    with torch.no_grad():
        out, want = gm(x[:5]), model(x[:5])  # another batch size than the example's
    assert isinstance(out, Output) and torch.equal(out.logits, want.logits)


def test_in_place_ops_become_out_of_place_with_the_same_results():
    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            y = self.conv(x)
            z = y.clone()
            z += y  # later reads of z and y see the mutated values
            return z + y.relu_() + y

    model = InPlace().eval()
    gm = capture(model, _calib()[:1], torch_leaf)
    targets = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert torch.ops.aten.add_.Tensor not in targets and torch.ops.aten.relu_.default not in targets
    x = _calib()[:3]
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))


def test_ptq_then_export_of_an_untraceable_net_is_bit_exact(tmp_path):
    """Int8PTQ quantizes it in graph mode (captured); export without calib checks itself."""
    from edgeslim import export_c, export_tflite
    from edgeslim.quant import Int8PTQ, quantize

    torch.manual_seed(0)
    model = UntraceableNet().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.2, 0.2)
        model.bn.running_var.uniform_(0.5, 1.5)
    calib = _calib()
    q = quantize(model, Int8PTQ(), calib=calib)
    assert q.quant_info["graph"] == "fx" and len(q.quant_info["quantized"]) == 3
    with torch.no_grad():
        got, want = q(calib).logits, model(calib).logits
    assert float((got - want).norm() / want.norm()) < 0.1
    graph = int8.lower(q, calib)
    kinds = [op.kind for op in graph.ops]
    assert kinds.count("Add") == 1 and graph.ops[kinds.index("Add")].activation == "relu"
    if hostbuild.compiler() is not None:
        out = export_c(q, tmp_path / "c", example=calib[:1])
        assert any("compiled C bit-exact" in v for v in out.verified)
    if tflite.tflm_available():  # raises unless TFLite Micro is bit-exact
        export_tflite(q, tmp_path / "m.tflite", example=calib[:1], runtime="tflm")
        data = (tmp_path / "m.tflite").read_bytes()
        assert np.frombuffer(data[4:8], np.uint8).tobytes() == b"TFL3"


def test_a_module_call_with_several_outputs_is_refused_not_misread():
    """An LSTM returns (out, (h, c)): one call_module node cannot stand for it; the captured
    graph is checked against the model, so PTQ falls back to module mode instead."""

    class RNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.LSTM(4, 6, batch_first=True)
            self.fc = nn.Linear(6, 2)

        def forward(self, x):
            out, _ = self.rnn(x)
            return self.fc(out[:, -1])

    with pytest.raises(CaptureError, match=r"RNN|rnn"):
        capture(RNN().eval(), torch.randn(1, 5, 4), torch_leaf)
