"""Models with several tensor inputs and outputs in the int8 backend: lowering, the reference
interpreter, the memory planner, the C (host and, where the toolchain is installed, Cortex-M4
on QEMU) and the .tflite file in TFLite Micro, every output bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from edgeslim.core.errors import EdgeslimError, ShapeError
from edgeslim.export import tflite, tflite_format
from edgeslim.export.c import arm, codegen, export_c, hostbuild, plan_for, planner
from edgeslim.export.int8 import lower, reference
from mcu_helpers import check_no_overlap

needs_tflm = pytest.mark.skipif(not tflite.tflm_available(), reason="tflite-micro not installed")
needs_cc = pytest.mark.skipif(hostbuild.compiler() is None, reason="no C compiler")
needs_arm = pytest.mark.skipif(bool(arm.missing()), reason=f"no ARM run here: {arm.missing()}")


class TwoInputs(nn.Module):
    """An image and a second image-like tensor (2 channels), each through a conv, added."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 6, 3, padding=1)
        self.b = nn.Conv2d(2, 6, 3, padding=1)
        self.mix = nn.Conv2d(6, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8 * 6 * 6, 10)

    def forward(self, image: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.a(image)) + torch.relu(self.b(aux))
        return self.fc(torch.flatten(torch.relu(self.mix(x)), 1))


class TwoHeads(nn.Module):
    """A shared trunk and two Linear heads; also returns the trunk's features, which the
    heads read after they are written (an output that is live in the middle)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.trunk = nn.Linear(4 * 6 * 6, 16)
        self.digit = nn.Linear(16, 10)
        self.parity = nn.Linear(16, 2)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = torch.nn.functional.max_pool2d(torch.relu(self.conv(image)), 2)
        f = torch.relu(self.trunk(torch.flatten(x, 1)))
        return self.digit(f), self.parity(f), f


class TwoInTwoOut(nn.Module):
    """Two inputs and two outputs (a dict), for the whole path to QEMU."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 4, 3, padding=1)
        self.b = nn.Conv2d(1, 4, 3, padding=1)
        self.head = nn.Linear(8 * 8 * 8, 6)
        self.side = nn.Linear(4 * 8 * 8, 3)

    def forward(self, image: torch.Tensor, aux: torch.Tensor) -> dict[str, torch.Tensor]:
        a, b = torch.relu(self.a(image)), torch.relu(self.b(aux))
        x = torch.cat([a, b], 1)
        return {"main": self.head(torch.flatten(x, 1)), "side": self.side(torch.flatten(b, 1))}


def _calib(*shapes, n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.rand(n, *s, generator=g) * 2 - 0.5 for s in shapes)


def _model(cls):
    torch.manual_seed(0)
    return cls().eval()


def test_two_inputs_lower_to_a_graph_with_two_inputs_that_runs_like_the_model():
    model = _model(TwoInputs)
    calib = _calib((1, 12, 12), (2, 12, 12))
    g = lower(model, calib)
    assert g.inputs == ["input0", "input1"] and g.input == "input0"
    assert [g[n].shape for n in g.inputs] == [(1, 12, 12, 1), (1, 12, 12, 2)]
    assert len(g.outputs) == 1 and g[g.output].shape == (1, 10)
    q = reference.quantize_input(g, tuple(x.numpy() for x in calib))
    assert isinstance(q, tuple) and [x.shape for x in q] == [(12, 12, 12, 1), (12, 12, 12, 2)]
    got = reference.dequantize(g, g.output, reference.run_batch(g, q))
    with torch.no_grad():
        want = model(*calib).numpy()
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.1
    assert g.io_bytes() == 144 + 288 + 10


def test_two_outputs_keep_their_order_and_an_output_read_later_is_never_overwritten():
    model = _model(TwoHeads)
    (calib,) = _calib((1, 12, 12))
    g = lower(model, calib)
    assert len(g.inputs) == 1 and [g[n].shape for n in g.outputs] == [(1, 10), (1, 2), (1, 16)]
    q = reference.quantize_input(g, calib.numpy())
    outs = reference.run_outputs(g, q)
    with torch.no_grad():
        wants = model(calib)
    for name, got, want in zip(g.outputs, outs, wants, strict=True):
        have = reference.dequantize(g, name, got)
        assert np.linalg.norm(have - want.numpy()) / np.linalg.norm(want.numpy()) < 0.1
    packed = reference.run_batch(g, q)
    assert packed.shape == (12, 28) and reference.output_size(g) == 28
    assert all(
        np.array_equal(a, b) for a, b in zip(reference.split_outputs(g, packed), outs, strict=True)
    )
    plan = planner.plan_memory(g)
    check_no_overlap(g, plan)
    kinds = {n: plan.buffer(n).kind for n in g.outputs}
    assert kinds == dict.fromkeys(g.outputs, "output")
    assert [plan.buffer(n).port for n in g.outputs] == [0, 1, 2]
    features = plan.buffer(g.outputs[2]).members[g.outputs[2]]
    assert features.end == len(g.ops)  # live to the end, though both heads read it earlier


@needs_tflm
def test_tflite_of_a_two_input_model_runs_bit_exact_in_tflite_micro(tmp_path):
    model = _model(TwoInputs)
    calib = _calib((1, 12, 12), (2, 12, 12))
    path = tflite.export_tflite(model, tmp_path / "m.tflite", calib=calib, runtime="tflm")
    data = path.read_bytes()
    g = lower(model, calib, name="TwoInputs")
    q = reference.quantize_input(g, tuple(x.numpy() for x in calib))
    got = tflite.run_tflm(g, data, q)
    assert got.shape == (12, 10)
    assert np.array_equal(got, reference.run_batch(g, q))
    interp = tflite.tflm_interpreter(data)
    shapes = [tuple(interp.get_input_details(k)["shape"]) for k in (0, 1)]
    assert shapes == [(1, 12, 12, 1), (1, 12, 12, 2)]
    assert tflite_format.io_counts(data) == (2, 1)
    assert tflite.tflm_arena(data)["total"] > 0


@needs_tflm
def test_tflite_of_a_two_output_model_checks_every_output_in_tflite_micro(tmp_path):
    model = _model(TwoHeads)
    (calib,) = _calib((1, 12, 12))
    path = tflite.export_tflite(model, tmp_path / "m.tflite", calib=calib, runtime="tflm")
    g = lower(model, calib, name="TwoHeads")
    q = reference.quantize_input(g, calib.numpy())
    got = tflite.run_tflm(g, path.read_bytes(), q)
    assert tflite_format.io_counts(path.read_bytes()) == (1, 3)
    assert got.shape == (12, 28)
    assert np.array_equal(got, reference.run_batch(g, q))
    if tflite.litert_available():  # batched, every output within LiteRT's tolerance
        assert tflite.check_litert(g, path.read_bytes(), q)["max_steps"] <= tflite.LITERT_STEPS


@needs_cc
def test_c_of_a_model_with_two_inputs_and_two_outputs_is_bit_exact(tmp_path):
    model = _model(TwoInTwoOut)
    calib = _calib((1, 8, 8), (1, 8, 8))
    result = export_c(model, tmp_path, calib=calib)
    assert any("compiled C bit-exact on 12 inputs" in v for v in result.verified)
    header = (tmp_path / "model.h").read_text()
    assert (
        "int model_run(const int8_t *input0, const int8_t *input1, int8_t *output0, "
        "int8_t *output1);" in header
    )
    assert "#define MODEL_INPUT1_SIZE 64" in header and "#define MODEL_OUTPUT1_SIZE 3" in header
    assert "#define MODEL_INPUT_SIZE 128" in header and "#define MODEL_OUTPUT_SIZE 9" in header
    g = result.graph
    assert result.io_bytes == 64 + 64 + 6 + 3
    # the files as written, compiled again by the test driver, on other inputs
    q = reference.quantize_input(g, tuple(x.numpy() for x in _calib((1, 8, 8), (1, 8, 8), seed=5)))
    sources = {p.name: p.read_text() for p in result.files}
    with hostbuild.Build(sources) as build:
        got = build.run(q, reference.output_size(g))
    assert np.array_equal(got, reference.run_batch(g, q))


@needs_cc
def test_patch_plans_of_a_two_input_graph_stay_bit_exact():
    model = _model(TwoInputs)
    calib = _calib((1, 12, 12), (2, 12, 12))
    g = lower(model, calib)
    plan = plan_for(g, patch=True, max_mac_overhead=2.0)
    check_no_overlap(g, plan)
    q = reference.quantize_input(g, tuple(x.numpy() for x in calib))
    with hostbuild.Build(codegen.generate(g, plan)) as build:
        got = build.run(q, reference.output_size(g))
    assert np.array_equal(got, reference.run_batch(g, q).reshape(got.shape))


def test_single_io_models_keep_the_one_pointer_signature():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    g = lower(model, torch.rand(6, 16))
    files = codegen.generate(g, plan_for(g))
    assert "int model_run(const int8_t *input, int8_t *output);" in files["model.h"]
    assert "MODEL_RUN_PACKED" not in files["model.h"] and "MODEL_INPUTS" not in files["model.h"]


@pytest.mark.parametrize(
    ("calib", "match"),
    [
        (lambda: _calib((1, 12, 12))[0], r"takes 2 tensor input\(s\) \(image, aux\), got 1"),
        (lambda: _calib((1, 12, 12), (2, 12, 12), (2, 12, 12)), r"takes 2 tensor input"),
        (lambda: _calib((1, 12, 12), (3, 12, 12)), r"cannot run on input of shape"),
        (lambda: (torch.rand(4, 1, 12, 12), torch.rand(5, 2, 12, 12)), "same size N"),
    ],
    ids=["one-for-two", "three-for-two", "wrong-shape", "different-N"],
)
def test_inputs_that_do_not_fit_the_model_are_refused_cleanly(calib, match, tmp_path):
    model = _model(TwoInputs)
    with pytest.raises(ShapeError, match=match):
        export_c(model, tmp_path, calib=calib(), verify=False)
    assert not list(tmp_path.iterdir())  # nothing written


def test_the_reference_refuses_the_wrong_number_of_inputs():
    model = _model(TwoInputs)
    calib = _calib((1, 12, 12), (2, 12, 12))
    g = lower(model, calib)
    q = reference.quantize_input(g, tuple(x.numpy() for x in calib))
    with pytest.raises(ShapeError, match=r"2 inputs \(input0, input1\); got 1"):
        reference.run_batch(g, q[0])
    with pytest.raises(ShapeError, match="input 'input1' must have shape"):
        reference.run(g, (q[0][:1], q[0][:1]))
    with pytest.raises(EdgeslimError, match="same tensor is returned twice"):

        class Twice(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.fc = nn.Linear(4, 2)

            def forward(self, x):
                y = self.fc(x)
                return y, y

        lower(Twice(), torch.rand(3, 4))


@needs_arm
def test_a_two_input_two_output_model_is_bit_exact_on_qemu(tmp_path):
    model = _model(TwoInTwoOut)
    calib = _calib((1, 8, 8), (1, 8, 8), n=4)
    result = export_c(model, tmp_path, "stm32f446", calib=calib, arm=True)
    assert any("bit-exact on QEMU mps2-an386, 4 inputs" in v for v in result.verified)
    assert result.arm.io_bytes == result.graph.io_bytes() == 137
    assert result.arm.run.outputs.shape == (4, 9)


class Branchy(nn.Module):
    """Two inputs, two outputs, and Python control flow on a shape: captured with
    torch.export (torch.fx cannot trace it)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 4, 3, padding=1)
        self.b = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 5)
        self.fc2 = nn.Linear(4 * 8 * 8, 2)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.shape[1] == 1:
            x = torch.relu(self.a(x))
        z = torch.flatten(x + torch.relu(self.b(y)), 1)
        return self.fc(z), self.fc2(z)


@needs_cc
def test_a_two_input_model_torch_fx_cannot_trace_is_captured(tmp_path):
    model = _model(Branchy)
    calib = _calib((1, 8, 8), (1, 8, 8))
    result = export_c(model, tmp_path, calib=calib)
    assert len(result.graph.inputs) == 2 and len(result.graph.outputs) == 2
    assert any("compiled C bit-exact" in v for v in result.verified)


def test_the_float32_tflite_exporter_refuses_several_inputs_and_outputs(tmp_path):
    with pytest.raises(EdgeslimError, match="one input; export a model with several"):
        tflite.export_tflite(
            _model(TwoInputs),
            tmp_path / "f.tflite",
            calib=_calib((1, 12, 12), (2, 12, 12)),
            dtype="float32",
        )
    with pytest.raises(EdgeslimError, match="one tensor input and one tensor output"):
        tflite.export_tflite(
            _model(TwoHeads), tmp_path / "f.tflite", calib=_calib((1, 12, 12))[0], dtype="float32"
        )
    assert not list(tmp_path.iterdir())
