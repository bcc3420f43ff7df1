"""The search's hardware-aware parts: fine keep menus, the float/int8 switch, shapes by
arithmetic, the predictor-guided sampler, widest-uniform anchors, finalists measured first."""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from edgeslim.search import Budget, SearchSpace
from edgeslim.search.apply import build
from edgeslim.search.cost import RuntimeTarget, layer_units
from edgeslim.search.engine import _measured_first, widest_uniform
from edgeslim.search.sampler import mutate, propose
from edgeslim.search.shapes import ShapeModel
from edgeslim.search.space import PRECISION_KNOB, BoundSpace, keep_menu
from edgeslim.search.store import RunStore


class _Res(nn.Module):
    """Conv stem, a residual block (a coupled group), a stride-2 conv, flatten + Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.a = nn.Conv2d(16, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.fc = nn.Linear(32 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(self.a(x) + x)
        x = torch.relu(self.b(x))
        return self.fc(torch.flatten(x, 1))


@pytest.fixture(scope="module")
def res():
    torch.manual_seed(0)
    return _Res().eval(), torch.rand(1, 1, 8, 8), torch.rand(16, 1, 8, 8)


def test_keep_menu_holds_multiples_of_four_and_every_uniform_width():
    levels = [1.0, 0.75, 0.5, 0.375, 0.25]
    for channels in (16, 32, 64, 24):
        widths = {round(v * channels) for v in keep_menu(channels, levels, 4, 0.05)}
        assert {w for w in range(4, channels + 1, 4) if w >= channels / 4} <= widths
        for step in range(5, 21):  # keep 0.25 .. 1.0: what a uniform pruner leaves
            assert max(1, round(channels * step * 0.05)) in widths
        assert min(widths) == round(channels * 0.25) and max(widths) == channels
    # Torch-Pruning's uniform ratio 0.7 on ResNet-8: 5 / 10 / 19 channels, now on the menu
    assert [19 in {round(v * 64) for v in keep_menu(64, levels, 4, 0.05)}] == [True]
    # the menus off: the levels alone (as before)
    assert keep_menu(16, levels, 0, 0) == [1.0, 0.75, 0.5, 0.375, 0.25]
    # restricting the levels restricts the menu
    assert max(keep_menu(64, [0.5, 0.25], 4, 0.05)) == 0.5


def test_uniform_points_of_any_ratio_are_reachable(res):
    model, x, _ = res
    bound = SearchSpace(techniques=["channel"]).bind(model, x)
    for step in range(5, 21):
        keep = step * 0.05
        point = bound.uniform(keep)
        for knob, info in bound.info.items():
            assert round(point[knob] * info["channels"]) == max(1, round(info["channels"] * keep))


def test_float_int8_switch_on_onnx_runtime_builds_exports_and_predicts(res, tmp_path):
    pytest.importorskip("onnxruntime")
    from edgeslim.export.onnx import export_onnx

    model, x, calib = res
    ort = RuntimeTarget("ort", cache=tmp_path)
    bound = SearchSpace().bind(model, x, ort.techniques, ort.optional)
    assert bound.knobs[PRECISION_KNOB] == ["float", "int8"]
    assert bound.dense()[PRECISION_KNOB] == "float"
    assert bound.smallest()[PRECISION_KNOB] == "int8"
    # not on PyTorch, and per-layer bits replace the switch where they are searched
    assert PRECISION_KNOB not in SearchSpace().bind(model, x, RuntimeTarget.techniques).knobs
    bits = SearchSpace(techniques=["channel", "bits"], bits=[8])
    assert PRECISION_KNOB not in bits.bind(model, x, ort.techniques, ort.optional).knobs
    half = bound.uniform(0.5, "int8")
    q = build(model, half, x, calib)
    assert {u.bits for _, u in layer_units(q, x)} == {8}
    assert build(model, bound.uniform(0.5, "float"), x, calib) is not None
    path = tmp_path / "q.onnx"
    export_onnx(q, path, x)  # checked against the PyTorch model by the exporter
    import onnx

    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    # the shapes by arithmetic agree with the built models, float and int8
    shapes = ShapeModel(model, bound, x, build(model, bound.uniform(1.0, "int8"), x, calib))
    rng = random.Random(0)
    for _ in range(4):
        c = {**bound.sample(rng), "rank:fc": 1.0}
        exact = [u for _, u in layer_units(build(model, c, x, calib), x)]
        assert shapes.units(c) == exact, c
    assert shapes.units({**bound.dense(), "rank:fc": 0.5}) is None  # low rank: build it


def _toy() -> BoundSpace:
    menu = [1.0, 0.75, 0.5, 0.25]
    return BoundSpace({"keep:a": menu, "keep:b": menu, "keep:c": menu})


def _cost(c: dict) -> dict:  # a made-up latency: 'a' twice as costly per channel
    return {"latency_ms": 2 * c["keep:a"] + c["keep:b"] + c["keep:c"]}


def test_guided_sampler_never_proposes_a_predicted_infeasible_candidate():
    space = _toy()
    limit = 2.5

    def fits(cost: dict) -> bool:
        return cost["latency_ms"] <= limit

    prior = [
        {"number": 0, "candidate": space.uniform(0.5), "feasible": True, "accuracy": 0.7,
         "cost": _cost(space.uniform(0.5))},
        {"number": 1, "candidate": space.dense(), "feasible": False, "accuracy": None,
         "cost": _cost(space.dense())},
    ]  # fmt: skip
    screened: list[dict] = []

    def screen(c: dict) -> dict:
        screened.append(c)
        return _cost(c)

    out = propose(space, prior, [], random.Random(0), screen, fits, "latency_ms", 4, pool=32)
    assert len(out) == 4 and len(screened) > 4  # many screened, few proposed
    assert all(fits(_cost(c)) for c in out)
    assert any(not fits(_cost(c)) for c in screened)  # the infeasible ones were dropped
    keys = [sorted(c.items()) for c in out]
    assert len({str(k) for k in keys}) == 4
    assert all(c not in (prior[0]["candidate"], prior[1]["candidate"]) for c in out)
    # widest first: the first proposal is the costliest feasible neighbour drawn
    first = _cost(out[0])["latency_ms"]
    assert first == max(_cost(c)["latency_ms"] for c in screened if fits(_cost(c)))
    # the same arguments, the same proposals (a resumed search asks the same)
    again = propose(space, prior, [], random.Random(0), _cost, fits, "latency_ms", 4, pool=32)
    assert again == out


def test_mutation_trades_channels_between_groups():
    space = _toy()
    start = space.uniform(0.5)
    seen = set()
    rng = random.Random(1)
    for _ in range(200):
        child = mutate(space, start, rng)
        assert all(child[k] in space.knobs[k] for k in child)
        diff = {k: child[k] for k in child if child[k] != start[k]}
        seen.add(tuple(sorted((k, v > start[k]) for k, v in diff.items())))
    # one group wider and another narrower in the same move
    assert any(len(d) == 2 and {up for _, up in d} == {True, False} for d in seen)


def test_widest_uniform_point_that_fits_scan_and_bisection():
    space = _toy()
    opts = SearchSpace(keep=[1.0, 0.75, 0.5, 0.25])

    def fits(c: dict) -> bool:
        return _cost(c)["latency_ms"] <= 2.5

    for scan in (True, False):
        point = widest_uniform(space, None, opts, fits, scan=scan)
        assert point == space.uniform(0.5)
    assert widest_uniform(space, None, opts, lambda c: False) is None


def test_widest_uniform_tries_the_keep_levels_between_grid_points():
    """ResNet-8 on ONNX Runtime: keep 0.375 (6/12/24 channels) ran fast enough where the
    0.05 grid's neighbours (0.35: 6/11/22, 0.40: 6/13/26) did not; it must be tried."""
    group = {"channels": 64}
    menu = keep_menu(64, [1.0, 0.75, 0.5, 0.375, 0.25], 4, 0.05)
    space = BoundSpace({"keep:g": menu}, {"keep:g": group})
    opts = SearchSpace()  # keep levels 1 / 0.75 / 0.5 / 0.375 / 0.25, grid 0.05
    fast = {24, 16}  # widths that run fast enough (made up); 16 = keep 0.25

    def fits(c: dict) -> bool:
        return round(c["keep:g"] * 64) in fast

    assert round(widest_uniform(space, None, opts, fits, scan=True)["keep:g"] * 64) == 24
    # bisection (monotone costs): the widest width <= 24 is 24 itself, not the grid's 22
    point = widest_uniform(space, None, opts, lambda c: c["keep:g"] * 64 <= 24.5, scan=False)
    assert round(point["keep:g"] * 64) == 24


def test_finalists_are_those_that_fit_as_measured(tmp_path):
    store = RunStore(tmp_path, {"x": 1})
    ranked = [{"number": n, "candidate": {"n": n}} for n in range(6)]
    measured = {0: 2.0, 1: 0.5, 2: 3.0, 3: 0.7, 4: 0.9, 5: 0.1}
    calls: list[int] = []

    def measure(c: dict) -> tuple[dict, None]:
        calls.append(c["n"])
        return {"latency_ms": measured[c["n"]]}, None

    budget = Budget(max_latency_ms=1.0)
    top = _measured_first(ranked, 2, store, budget, measure)
    assert [r["number"] for r in top] == [1, 3]  # 0 and 2 do not fit as measured
    assert calls == [0, 1, 2, 3]
    # persisted: a resume measures nothing again
    again = _measured_first(ranked, 2, RunStore(tmp_path, {"x": 1}), budget, measure)
    assert [r["number"] for r in again] == [1, 3] and calls == [0, 1, 2, 3]
    # too few fit within 3 x top measured: the best-ranked of the rest fill up
    tight = Budget(max_latency_ms=0.4)  # none of the first 3 x top fits
    short = _measured_first(ranked, 1, RunStore(tmp_path / "b", {"x": 1}), tight, measure)
    assert [r["number"] for r in short] == [0] and calls[-3:] == [0, 1, 2]


def test_candidates_are_quantized_with_mse_scales_and_timed_builds_cheaply(res, tmp_path):
    """The search's int8 is the careful PTQ a user runs (MSE scales for weights and
    activations, the same as the benchmark's uniform-int8 baseline); a model built only to
    be timed gets min-max scales on a few inputs (same graph, so the same latency)."""
    from edgeslim.quant import Int8PTQ, quantize
    from edgeslim.search.apply import LATENCY_CALIB_INPUTS

    model, x, _ = res
    torch.manual_seed(1)
    calib = torch.rand(32, 1, 8, 8)
    ort = RuntimeTarget("ort", cache=tmp_path)
    bound = SearchSpace().bind(model, x, ort.techniques, ort.optional)
    point = bound.uniform(0.5, "int8")
    shaped = build(model, point, x)  # the structure alone, float
    probe = torch.rand(8, 1, 8, 8)
    careful = build(model, point, x, calib)
    cheap = build(model, point, x, calib, for_latency=True)
    want_careful = quantize(
        shaped, Int8PTQ(graph="auto", calibration="mse", weight_calibration="mse"), calib=calib
    )
    want_cheap = quantize(shaped, Int8PTQ(graph="auto"), calib=calib[:LATENCY_CALIB_INPUTS])
    with torch.no_grad():
        assert torch.equal(careful(probe), want_careful(probe))
        assert torch.equal(cheap(probe), want_cheap(probe))
        assert not torch.equal(careful(probe), cheap(probe))  # other scales, same graph
    assert [type(m).__name__ for m in careful.modules()] == [
        type(m).__name__ for m in cheap.modules()
    ]
