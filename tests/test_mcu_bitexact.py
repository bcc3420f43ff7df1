"""Bit-exact agreement at every intermediate tensor among the reference interpreter, the
compiled C (with the in-place rules, and patch-based) and TFLite Micro, on random int8 inputs and on
real MNIST digits (resized to 49x10 for the keyword-spotting net), for LeNet-5, the
MobileNetV2-style net and the DS-CNN."""

import numpy as np
import pytest

from edgeslim.export import tflite, tflite_format
from edgeslim.export.c import codegen, hostbuild, planner
from edgeslim.export.int8 import reference
from mcu_helpers import MODELS, check_every_tensor, compare_tensors, mnist_images, model_and_graph

pytestmark = pytest.mark.skipif(hostbuild.compiler() is None, reason="needs a C compiler")


def inputs(graph, model):
    rng = np.random.default_rng(7)
    random_q = rng.integers(-128, 128, (3, *graph[graph.input].shape[1:]), dtype=np.int64)
    real = mnist_images(tuple(model.input_shape), 3, "test").numpy()
    return np.concatenate([random_q, reference.quantize_input(graph, real)]).astype(np.int8)


@pytest.mark.parametrize("name", MODELS)
def test_reference_c_and_tflite_micro_agree_at_every_tensor(name):
    model, graph = model_and_graph(name)
    q = inputs(graph, model)
    expected = [reference.run(graph, x[None]) for x in q]
    names = graph.activations()
    stage = planner.stage_candidates(graph)[-1]  # the longest patch stage, 2x2 patches
    plans = {
        "in place": planner.plan_memory(graph),
        "patches": planner.plan_memory(graph, patch=planner.patch_plan(graph, stage, (2, 2))),
    }
    for label, plan in plans.items():
        with hostbuild.Build(codegen.generate(graph, plan), trace=True) as build:
            out, trace = build.run(q, graph[graph.output].size, trace=True)
        per_input = len(trace) // len(q)
        for k in range(len(q)):
            assert np.array_equal(out[k], expected[k][graph.output].reshape(-1)), (label, k)
            records = trace[k * per_input : (k + 1) * per_input]
            assert hostbuild.check_trace(graph, expected[k], records) == [], (label, k)
    if not tflite.tflm_available():
        pytest.skip("tflite-micro is not installed: TFLite Micro not compared")
    data = tflite_format.serialize(graph)
    _, tensors = tflite.run_tflm(graph, data, q, every_tensor=True)
    for k in range(len(q)):
        assert compare_tensors(expected[k], tensors[k], names) == [], k


def test_a_wrong_kernel_is_caught_at_the_tensor_where_it_goes_wrong():
    """The trace check is not vacuous: a wrong clamp in one op shows up at that op."""
    model, graph = model_and_graph("lenet5")
    q = inputs(graph, model)[:1]
    expected = reference.run(graph, q)
    sources = codegen.generate(graph, planner.plan_memory(graph))
    good = "static const pool_params_t OP3 = {0, 8, 8, 50, 2, 2, 2, 2, 0, 0, -128, 127};"
    assert good in sources["model.c"]
    sources["model.c"] = sources["model.c"].replace(good, good.replace("127}", "0}"))
    with hostbuild.Build(sources, trace=True) as build:
        _, trace = build.run(q, 10, trace=True)
    problems = hostbuild.check_trace(graph, expected, trace)
    assert problems and problems[0].startswith("op 3 (Pool2D")


def test_a_ptq_model_runs_bit_exact_in_c_and_tflite_micro(tmp_path):
    """quantize_(Int8PTQ) -> export_c / export_tflite: both check themselves bit for bit."""
    import torch

    from edgeslim import export_c, export_tflite
    from edgeslim.core.models.kws import ds_cnn
    from edgeslim.quant import Int8PTQ, quantize

    torch.manual_seed(0)
    calib = mnist_images((1, 49, 10), 32, "train")
    qmodel = quantize(ds_cnn().eval(), Int8PTQ(calibration="mse"), calib=calib)
    result = export_c(qmodel, tmp_path / "c", calib=calib)
    assert "compiled C bit-exact on 32 inputs" in result.verified
    if not tflite.tflm_available():
        pytest.skip("tflite-micro is not installed: C checked, TFLite Micro not compared")
    export_tflite(qmodel, tmp_path / "m.tflite", calib=calib)  # raises unless bit-exact
    export_tflite(qmodel, tmp_path / "n.tflite")  # quantized: checked on random int8
    assert (tmp_path / "n.tflite").read_bytes() == (tmp_path / "m.tflite").read_bytes()


def test_every_op_kind_agrees_at_every_tensor():
    """Concat with requantized inputs, depth multiplier 2, max / avg pooling, mean,
    ReLU6, BatchNorm1d, softmax: reference = C (in place) = TFLite Micro."""
    import torch

    from edgeslim.export import int8
    from mcu_helpers import AllOps

    torch.manual_seed(0)
    calib = mnist_images((1, 28, 28), 32, "train")
    graph = int8.lower(AllOps().eval(), calib)
    kinds = {op.kind for op in graph.ops}
    assert {"Concat", "Requantize", "Softmax", "Pool2D", "Add"} <= kinds
    q = reference.quantize_input(graph, mnist_images((1, 28, 28), 4, "test").numpy())
    check_every_tensor(graph, q)
