"""Lowering PyTorch models to the integer graph, and the reference interpreter."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgeslim import zoo
from edgeslim.core.errors import LoweringError, ShapeError
from edgeslim.core.models.kws import ds_cnn
from edgeslim.export import int8
from edgeslim.export.c import export_c
from edgeslim.export.int8 import ir, reference
from edgeslim.export.tflite_format import PADDING_SAME, tflite_padding
from mcu_helpers import AllOps


def rel_error(graph, model, x):
    q = reference.quantize_input(graph, x.numpy())
    got = reference.dequantize(graph, graph.output, reference.run_batch(graph, q))
    with torch.no_grad():
        want = model(x).numpy().reshape(got.shape)
    return np.linalg.norm(got - want) / np.linalg.norm(want)


@pytest.fixture(scope="module")
def calib():
    return torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(1))


def test_lenet5_graph(calib):
    model = zoo.create("lenet5").eval()
    g = int8.lower(model, calib)
    assert [op.kind for op in g.ops] == [
        "Conv2D",
        "Pool2D",
        "Conv2D",
        "Pool2D",
        "Reshape",
        "FullyConnected",
        "FullyConnected",
    ]
    assert g[g.input].shape == (1, 28, 28, 1) and g[g.output].shape == (1, 10)
    assert g[g.ops[2].output].shape == (1, 8, 8, 50)
    w = g[g.ops[0].weight]
    assert w.shape == (20, 5, 5, 1) and w.axis == 0 and len(w.scale) == 20
    assert w.data.min() >= -127 and w.data.max() <= 127
    fc = g[g.ops[5].weight]
    assert fc.shape == (500, 800) and len(fc.scale) == 1  # per tensor, TFLite's default
    assert g[g.ops[5].bias].dtype == "int32"
    for t in g.tensors.values():  # scales are float32 values (what a .tflite stores)
        assert np.array_equal(t.scale, t.scale.astype(np.float32).astype(np.float64))
    assert g.macs() == 2_293_000
    assert rel_error(g, model, calib) < 0.05


def test_batchnorm_folded_relu6_fused_and_depthwise(calib):
    torch.manual_seed(0)
    model = zoo.create("mobilenetv2").eval()
    with torch.no_grad():  # non-trivial BN statistics
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
    g = int8.lower(model, calib)
    kinds = {op.kind for op in g.ops}
    assert kinds == {"Conv2D", "Add", "Pool2D", "Reshape", "FullyConnected"}
    convs = [op for op in g.ops if isinstance(op, ir.Conv2D)]
    assert sum(op.depthwise for op in convs) == 7
    assert {op.activation for op in convs} == {"relu6", None}
    assert len([op for op in g.ops if isinstance(op, ir.Add)]) == 4  # residual blocks
    assert rel_error(g, model, calib) < 0.1


def test_flatten_of_a_feature_map_permutes_the_linear_weights(calib):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, stride=2)
            self.fc = nn.Linear(4 * 13 * 13, 10)

        def forward(self, x):
            return self.fc(self.conv(x).view(x.size(0), -1))

    torch.manual_seed(0)
    model = Net().eval()
    g = int8.lower(model, calib)
    w = model.fc.weight.detach().numpy().reshape(10, 4, 13, 13).transpose(0, 2, 3, 1)
    fc = g[g.ops[-1].weight]
    assert np.corrcoef(fc.data.reshape(-1), w.reshape(-1))[0, 1] > 0.999
    assert rel_error(g, model, calib) < 0.05


def test_every_op_kind_lowers_and_matches_pytorch(calib):
    torch.manual_seed(0)
    model = AllOps().eval()
    g = int8.lower(model, calib)
    kinds = [op.kind for op in g.ops]
    for kind in (
        "Conv2D",
        "Pool2D",
        "Concat",
        "Requantize",
        "Add",
        "Reshape",
        "FullyConnected",
        "Softmax",
    ):
        assert kind in kinds
    dw = next(op for op in g.ops if isinstance(op, ir.Conv2D) and op.depthwise)
    assert g[dw.weight].shape == (1, 3, 3, 16)  # depth multiplier 2
    concat = next(op for op in g.ops if isinstance(op, ir.Concat))
    assert concat.axis == 3
    assert all(g[n].qscale == g[concat.output].qscale for n in concat.inputs)
    out = g[g.output]
    assert (out.qscale, out.qzero) == (1 / 256, -128)
    assert rel_error(g, model, calib) < 0.1


def test_zero_padding_folds_into_the_conv_as_tflite_same():
    model = ds_cnn().eval()
    g = int8.lower(model, torch.randn(8, 1, 49, 10))
    stem = g.ops[0]
    assert stem.padding == (4, 1, 5, 1) and stem.stride == (2, 2)
    assert g[stem.output].shape == (1, 25, 5, 64)
    code = tflite_padding((49, 10), (25, 5), (10, 4), (2, 2), stem.padding)
    assert code == PADDING_SAME


def test_unsupported_layers_are_all_named_before_anything_is_written(tmp_path, calib):
    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, groups=1)
            self.grouped = nn.Conv2d(4, 4, 3, groups=2)
            self.act = nn.ELU()

        def forward(self, x):
            x = self.act(self.grouped(self.conv(x)))
            return torch.tanh(x * -2).flatten(1)

    out = tmp_path / "c"
    with pytest.raises(LoweringError) as info:
        export_c(Bad(), out, calib=calib)
    msg = str(info.value)
    for what in (
        "grouped (Conv2d): grouped conv with groups=2",
        "act (ELU): not supported",
        "tanh",
        "mul (mul): only a multiply by a positive number",
    ):
        assert what in msg
    assert "supported:" in msg
    assert not out.exists()


def test_layer_norm_over_channels_exports_bit_exact(tmp_path, calib):
    class ChannelsLast(nn.Module):  # ConvNeXt's block: NCHW -> NHWC, LayerNorm, back
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)
            self.norm = nn.LayerNorm(4)

        def forward(self, x):
            x = self.norm(self.conv(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
            return x.mean((2, 3))

    # the permutes are layouts (no data moves), LayerNorm is MEAN / SUB / L2_NORMALIZATION and
    # a depthwise affine; export_c raises unless the compiled C is bit-exact
    model = ChannelsLast().eval()
    kinds = [op.kind for op in int8.lower(model, calib).ops]
    assert "Normalize" in kinds and "Transpose" not in kinds
    export_c(model, tmp_path / "c", calib=calib)
    assert (tmp_path / "c" / "model.c").exists()


def test_activation_must_follow_a_layer_and_bad_calibration(calib):
    class ReluAfterPool(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)

        def forward(self, x):
            return torch.relu(F.max_pool2d(self.conv(x), 2)).flatten(1)

    with pytest.raises(LoweringError, match="must directly follow a conv, linear or add"):
        int8.lower(ReluAfterPool(), calib)
    with pytest.raises(ShapeError, match="non-empty batch"):
        int8.lower(zoo.create("lenet5"), torch.zeros(0, 1, 28, 28))
    with pytest.raises(ShapeError, match="cannot run on input"):
        int8.lower(zoo.create("lenet5"), torch.zeros(2, 3, 32, 32))


def test_reference_rejects_bad_inputs(calib):
    g = int8.lower(zoo.create("lenet5").eval(), calib)
    with pytest.raises(ShapeError, match="shape"):
        reference.run(g, np.zeros((1, 1, 28, 28)))
    with pytest.raises(ShapeError, match="int8"):
        reference.run(g, np.full((1, 28, 28, 1), 300))


# ---------------------------------------------------------------- models quantized by quantize_


def _ptq(model, calib, **cfg):
    from edgeslim.quant import Int8PTQ, quantize

    return quantize(model.eval(), Int8PTQ(**cfg), calib=calib)


@pytest.mark.parametrize("name", ["lenet5", "mobilenetv2", "ds_cnn", "resnet8"])
def test_a_ptq_model_lowers_to_exactly_its_own_integer_simulation(name):
    from edgeslim.quant.modules import set_mode

    torch.manual_seed(0)
    model = ds_cnn() if name == "ds_cnn" else zoo.create(name)
    shape = model.input_shape
    gen = torch.Generator().manual_seed(2)
    calib, x = torch.rand(32, *shape, generator=gen), torch.rand(8, *shape, generator=gen)
    qmodel = _ptq(model, calib, calibration="mse" if name == "ds_cnn" else "minmax")
    g = int8.lower(qmodel, calib)
    assert not any(op.kind == "Requantize" for op in g.ops)  # quantizers map onto tensors
    first = g.ops[0]
    layer = qmodel.get_submodule(first.name)
    assert np.array_equal(g[first.weight].data, layer.weight_int8.numpy().transpose(0, 2, 3, 1))
    assert np.array_equal(g[first.bias].data, layer.bias_int32.numpy())
    q = reference.quantize_input(g, x.numpy())
    got = reference.run_batch(g, q)
    set_mode(qmodel, "exact")
    with torch.no_grad():
        y = qmodel(x).double().numpy()
    out = g[g.output]
    assert np.array_equal(np.round(y / out.qscale) + out.qzero, got.reshape(y.shape))


def test_a_relu_after_a_quantized_add_is_fused_into_it(calib):
    """PTQ quantizes after the ReLU of ``relu(x + y)`` (TFLite's ADD with a fused ReLU)."""
    torch.manual_seed(0)
    qmodel = _ptq(zoo.create("resnet8"), calib)
    adds = [op for op in int8.lower(qmodel, calib).ops if op.kind == "Add"]
    assert adds and all(op.activation == "relu" for op in adds)


def test_an_accumulator_that_would_overflow_int32_is_refused():
    from edgeslim.core.errors import ExportError
    from mcu_helpers import GraphBuilder

    b = GraphBuilder((1, 4), zp=-128)
    out = b.fc("fc", b.input, 3)
    g = b.graph(out)
    g[g.ops[0].bias].data[:] = 2**31 - 100  # a saturated int32 bias (degenerate scales)
    g[g.ops[0].weight].data[:] = 127
    with pytest.raises(ExportError, match="'fc': the int32 accumulator overflows"):
        reference.run(g, np.full((1, 4), 127))
