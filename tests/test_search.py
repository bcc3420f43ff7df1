"""The compression search: space, cost tables, reproducibility, resume, infeasible budgets."""

from __future__ import annotations

import json
import random

import pytest
import torch
from torch import nn

import edgeslim as es
from edgeslim.search import Budget, SearchSpace
from edgeslim.search.cost import LatencyTable, RuntimeTarget, Unit, layer_units
from edgeslim.search.engine import search

pytest.importorskip("optuna")


@pytest.fixture(scope="module")
def small(mnist):
    return mnist.limit(300)


@pytest.fixture(scope="module")
def lenet(small):
    torch.manual_seed(0)
    model = es.zoo.create("lenet5")
    es.fit(model, small, epochs=1, progress=False)
    return model.eval()


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("latency-cache")


def _run(model, data, budget, out, cache, **kw):
    args = dict(
        target="torch",
        space=SearchSpace(keep=[1.0, 0.5, 0.25], sparsity=[0.0], rank=[1.0, 0.25]),
        trials=4,
        batch=2,
        seed=3,
        proxy_steps=2,
        proxy_val=100,
        batch_size=32,
        finetune_top=1,
        finetune_epochs=1,
        workers=0,
        cache=cache,
        export=False,
        progress=False,
    )
    args.update(kw)
    return search(model, data, budget, out=out, **args)


# ----------------------------------------------------------------------------- space


def test_space_defaults_from_the_model(lenet):
    x = torch.zeros(1, 1, 28, 28)
    knobs = SearchSpace().bind(lenet, x).knobs
    assert {k for k in knobs if k.startswith("keep:")} == {"keep:conv1", "keep:conv2", "keep:fc1"}
    assert {k for k in knobs if k.startswith("bits:")} == {
        "bits:conv1",
        "bits:conv2",
        "bits:fc1",
        "bits:fc2",
    }
    assert [k for k in knobs if k.startswith("rank:")] == ["rank:fc1", "rank:fc2"]  # Linear only
    assert "2:4" in knobs["sparsity:fc1"] and knobs["sparsity:fc1"][0] == 0.0
    assert knobs["keep:conv1"][0] == 1.0 and min(knobs["keep:conv1"]) == 0.25
    # a dense runtime: only what changes shapes
    ort = SearchSpace().bind(lenet, x, RuntimeTarget.techniques).knobs
    assert {k.split(":")[0] for k in ort} == {"keep", "rank"}


def test_space_restrictions(lenet):
    x = torch.zeros(1, 1, 28, 28)
    space = SearchSpace(
        techniques=["channel", "bits"], exclude=["conv1"], fixed={"keep:conv2": 0.5, "bits:fc*": 4}
    )
    b = space.bind(lenet, x)
    assert "keep:conv1" not in b.knobs and "bits:conv1" not in b.knobs
    assert b.knobs["keep:conv2"] == [0.5]
    assert b.knobs["bits:fc1"] == [4] and b.knobs["bits:fc2"] == [4]
    assert not any(k.startswith(("sparsity:", "rank:")) for k in b.knobs)
    c = b.sample(random.Random(0))
    assert b.decode(json.loads(json.dumps(b.encode(c)))) == c


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"keep": [0.0, 0.5]}, "must be in"),
        ({"bits": [9]}, "2..8"),
        ({"sparsity": [1.0]}, "must be in"),
        ({"nm": ["4:2"]}, "N:M"),
        ({"techniques": []}, "techniques is empty"),
        ({"techniques": ["pruning"]}, "techniques"),
        ({"unknown": 1}, "unknown"),
    ],
)
def test_space_validation(kwargs, match):
    with pytest.raises(es.ConfigError, match=match):
        SearchSpace(**kwargs)


def test_space_bind_errors(lenet):
    x = torch.zeros(1, 1, 28, 28)
    with pytest.raises(es.ConfigError, match="matches no knob"):
        SearchSpace(fixed={"keep:nothing": 0.5}).bind(lenet, x)
    with pytest.raises(es.ConfigError, match="not valid"):
        SearchSpace(fixed={"bits:fc1": 12}).bind(lenet, x)
    with pytest.raises(es.ConfigError, match="target supports"):
        SearchSpace(techniques=["bits"]).bind(lenet, x, RuntimeTarget.techniques)
    with pytest.raises(es.ConfigError, match="empty"):
        SearchSpace(techniques=["channel"], exclude=["*"]).bind(lenet, x)
    b = SearchSpace().bind(lenet, x)
    good = b.dense()
    with pytest.raises(es.ConfigError, match="unknown knob"):
        b.decode({**good, "keep:fc9": 1.0})
    with pytest.raises(es.ConfigError, match="missing knob"):
        b.decode({k: v for k, v in good.items() if k != "keep:conv1"})
    with pytest.raises(es.ConfigError, match="not on its menu"):
        b.decode({**good, "keep:conv1": 0.333})
    with pytest.raises(es.ConfigError, match="dict"):
        b.decode([1, 2])


def test_budget_validation(lenet, small, tmp_path, cache):
    with pytest.raises(es.ConfigError, match="at least one limit"):
        Budget(target="ort")
    with pytest.raises(es.ConfigError, match="max_latency_ms"):
        Budget(max_latency_ms=-1)
    with pytest.raises(es.ConfigError, match="has no flash_kb"):
        _run(lenet, small, Budget(max_flash_kb=100), tmp_path, cache)
    with pytest.raises(es.ConfigError, match="unknown device"):
        _run(
            lenet,
            small,
            Budget(max_flash_kb=100, target="no-such-board"),
            tmp_path,
            cache,
            target=None,
        )


# ----------------------------------------------------------------------------- cost


def test_layer_units_fuse_bn_and_activation():
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU6(),
        nn.Conv2d(4, 4, 3, groups=4),
        nn.Flatten(),
        nn.Linear(4 * 24 * 24, 3),
    )
    units = layer_units(model, torch.zeros(2, 1, 28, 28))
    assert [n for n, _ in units] == ["0", "3", "5"]
    first = units[0][1]
    assert (first.op, first.act, first.bias, first.in_shape, first.out) == (
        "conv",
        "relu6",
        True,
        (1, 28, 28),
        4,
    )
    assert units[1][1].groups == 4 and units[1][1].act == ""
    assert units[2][1] == Unit("linear", (2304,), 3)


def test_latency_table_is_cached_per_machine_and_runtime(tmp_path):
    unit = Unit("conv", (3, 8, 8), 4, (3, 3), (1, 1), (1, 1))
    table = LatencyTable("torch", 1, tmp_path)
    ms = table.entry(unit)
    assert ms >= 0 and table.measured == 1
    table.entry(unit)
    assert table.measured == 1  # measured once
    table.save()
    again = LatencyTable("torch", 1, tmp_path)
    assert again.entry(unit) == ms and again.measured == 0  # read from disk
    assert LatencyTable("torch", 2, tmp_path).path != table.path  # threads are part of the key
    assert "torch" in table.path.name and table.machine["cpu"] is not None


def test_predictor_ranks_configurations(cache):
    from edgeslim.search.predictor_eval import evaluate_predictor, spearman

    assert spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    model = nn.Sequential(
        nn.Conv2d(1, 64, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    ).eval()
    x = torch.zeros(1, 1, 28, 28)
    target = RuntimeTarget("torch", cache=cache)
    target.repeats = 50
    space = SearchSpace(keep=[1.0, 0.25]).bind(model, x, target.techniques)
    target.calibrate([model], x, "convs-test")
    report = evaluate_predictor(target, space, model, x, n=6, seed=1)
    assert len(report.rows) == 6
    # the configurations differ up to 16x in MACs: the prediction must order them
    assert report.rank_correlation >= 0.6, report.rows
    assert 0 <= report.within_10 <= 1


@pytest.mark.parametrize(
    ("slope", "expected"),
    [(2.6, 2.6), (0.4, 0.4), (9.0, 4.0), (0.01, 0.25)],
)
def test_the_calibrated_line_keeps_a_steep_measured_slope(tmp_path, slope, expected):
    """The line through (summed table entries, measured ms) keeps the measured slope, even
    above 2 (int8 MiniLM in ONNX Runtime); only a degenerate one is clamped to [0.25, 4]."""
    target = RuntimeTarget("ort", cache=tmp_path)
    models = [nn.Linear(2, 2) for _ in range(4)]
    sums = dict(zip(map(id, models), [1.0, 2.0, 3.0, 4.0], strict=True))
    target.units_ms = lambda m, x: sums[id(m)]  # type: ignore[method-assign]
    target.measure_ms = lambda m, x: 0.5 + slope * sums[id(m)]  # type: ignore[method-assign]
    scale, overhead = target.calibrate(models, torch.zeros(1, 2), "line-test")
    assert scale == pytest.approx(expected)
    if expected == slope:  # an exact line: its overhead too
        assert overhead == pytest.approx(0.5)
        assert target.line_ms(10.0) == pytest.approx(0.5 + slope * 10.0)


def test_mcu_cost_model_predicts_the_c_exports_own_numbers(tmp_path):
    """calibrate (code size), predict and measure on a microcontroller profile: the
    prediction's SRAM is the C export's, its flash close (code size measured once)."""
    from edgeslim.search.cost import McuTarget

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 26 * 26, 10)
    ).eval()  # fmt: skip
    calib = torch.rand(8, 1, 28, 28)
    target = McuTarget("stm32f446")
    code = target.calibrate([model], calib[:1], "", calib=calib)
    assert code >= 0 and target.code_bytes == code
    predicted = target.predict(model, calib[:1], calib)
    measured = target.measure(model, calib[:1], calib, out=tmp_path / "c")
    assert (tmp_path / "c" / "model.c").exists()
    assert predicted["sram_kb"] == pytest.approx(measured["sram_kb"], rel=1e-6)
    assert predicted["flash_kb"] == pytest.approx(measured["flash_kb"], rel=0.25)
    assert predicted["latency_ms"] == pytest.approx(measured["latency_ms"])


def test_int8_on_onnx_runtime_only_when_asked(tmp_path):
    """ORT runs int8 (QDQ): bits are a knob there when named (not by default, not on
    PyTorch); a quantized candidate's units are keyed and timed as int8."""
    pytest.importorskip("onnxruntime")
    from edgeslim.core.errors import ConfigError
    from edgeslim.search.apply import build

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10),
    ).eval()  # fmt: skip
    x, calib = torch.rand(1, 1, 28, 28), torch.rand(16, 1, 28, 28)
    ort = RuntimeTarget("ort", cache=tmp_path)
    default = SearchSpace().bind(model, x, ort.techniques, ort.optional)
    assert not any(k.startswith("bits:") for k in default.knobs)
    space = SearchSpace(techniques=["channel", "bits"], bits=[8], keep=[1.0, 0.5])
    bound = space.bind(model, x, ort.techniques, ort.optional)
    assert bound.knobs["bits:0"] == [8] and "keep:0" in bound.knobs
    torch_target = RuntimeTarget("torch", cache=tmp_path)
    with pytest.raises(ConfigError, match="bits"):
        space.bind(model, x, torch_target.techniques, torch_target.optional)
    quantized = build(model, bound.dense(), x, calib)
    units = layer_units(quantized, x)
    assert [u.bits for _, u in units] == [8, 8, 8] and units[0][1].act == "relu"
    assert [u.bits for _, u in layer_units(model, x)] == [32, 32, 32]
    int8_ms = ort.table.entry(units[1][1])
    assert int8_ms >= 0 and ort.table.measured == 1 and units[1][1].key() in ort.table.entries
    # a quantized model is timed as its int8 QDQ export (a float export would not run int8)
    assert ort.measure(quantized, x)["latency_ms"] > 0


# ----------------------------------------------------------------------------- the search


@pytest.fixture(scope="module")
def straight(lenet, small, tmp_path_factory, cache):
    out = tmp_path_factory.mktemp("straight")
    return out, _run(lenet, small, Budget(max_size_kb=600), out, cache)


def test_search_result_and_run_directory(straight):
    out, result = straight
    assert result.feasible and result.measured["size_kb"] <= 600
    assert result.measured["size_kb"] == pytest.approx(result.predicted["size_kb"])
    assert len(result.trials) == 4 and result.front and result.model is not None
    assert result.trials[0]["candidate"]["keep:conv1"] == 1.0  # the dense anchor
    anchors = json.loads((out / "anchors.json").read_text())  # kept: a resume reuses them
    assert anchors[0] == result.trials[0]["candidate"]
    report = (out / "report.md").read_text()
    assert "Pareto front" in report and "Finalists" in report
    assert (out / "pareto.png").exists()
    lines = (out / "trials.jsonl").read_text().splitlines()
    assert sorted(json.loads(x)["number"] for x in lines) == [0, 1, 2, 3]


@pytest.mark.slow
def test_anchors_dense_smallest_then_uniform_levels_come_first(lenet, straight):
    space = SearchSpace(keep=[1.0, 0.5, 0.25], sparsity=[0.0], rank=[1.0, 0.25])
    bound = space.bind(lenet, torch.zeros(1, 1, 28, 28), ("channel", "lowrank"))
    half = bound.uniform(0.5)
    keeps = [k for k in bound.knobs if k.startswith("keep:")]
    assert keeps and all(half[k] == 0.5 for k in keeps)
    assert all(v == 1.0 for k, v in half.items() if k.startswith("rank:"))
    anchors = bound.anchors(space.keep)
    assert anchors == [bound.dense(), bound.smallest(), half, bound.uniform(0.25)]
    # the search (guided: dense, smallest, the widest uniform point that fits, then
    # proposals) starts with dense, smallest
    _, result = straight
    assert [t["candidate"] for t in result.trials[:2]] == [bound.encode(a) for a in anchors[:2]]


def test_finalists_are_measured_after_every_fine_tune(lenet, small, tmp_path, cache, monkeypatch):
    """A latency is not timed while finalists still train (they would share the CPU)."""
    from edgeslim.search import engine

    log: list[str] = []
    train, measure = engine.run_trial, RuntimeTarget.measure

    def logged_trial(state, job):
        log.append(job["kind"])
        return train(state, job)

    def logged_measure(self, *args, **kwargs):
        log.append("measure")
        return measure(self, *args, **kwargs)

    monkeypatch.setattr(engine, "run_trial", logged_trial)
    monkeypatch.setattr(RuntimeTarget, "measure", logged_measure)
    _run(lenet, small, Budget(max_size_kb=600), tmp_path / "run", cache, finetune_top=2)
    finals = [e for e in log if e != "proxy"]
    assert finals == ["final", "final", "measure", "measure"], log


def test_same_seed_same_trials_and_result(lenet, small, tmp_path, cache, straight):
    a = straight[1]
    b = _run(lenet, small, Budget(max_size_kb=600), tmp_path, cache)
    key = [(t["number"], t["candidate"], t["accuracy"]) for t in a.trials]
    assert key == [(t["number"], t["candidate"], t["accuracy"]) for t in b.trials]
    assert a.candidate == b.candidate and a.accuracy == b.accuracy


def test_resume_after_interruption_gives_the_same_choice(lenet, small, tmp_path, cache, straight):
    straight = straight[1]
    budget = Budget(max_size_kb=600)
    part = _run(lenet, small, budget, tmp_path, cache, stop_after=2)
    assert part.stopped == "stop_after" and len(part.trials) == 2 and part.model is None
    with open(tmp_path / "trials.jsonl", "ab") as f:
        f.write(b'{"number": 3, "cand')  # a line torn by a kill: ignored, the trial reruns
    resumed = _run(lenet, small, budget, tmp_path, cache)
    # a resumed search asks the same trials and gets the same results as a straight one
    assert [(t["candidate"], t["accuracy"]) for t in resumed.trials] == [
        (t["candidate"], t["accuracy"]) for t in straight.trials
    ]
    assert resumed.candidate == straight.candidate
    assert resumed.accuracy == straight.accuracy


def test_resume_refuses_a_different_search(lenet, small, tmp_path, cache):
    _run(lenet, small, Budget(max_size_kb=600), tmp_path, cache, stop_after=1)
    with pytest.raises(es.RunDirError, match="different search"):
        _run(lenet, small, Budget(max_size_kb=500), tmp_path, cache)


def test_infeasible_budget_reports_the_closest_point(lenet, small, tmp_path, cache):
    result = _run(lenet, small, Budget(max_size_kb=1), tmp_path, cache)
    assert not result.feasible and result.model is None
    sizes = {t["number"]: t["cost"]["size_kb"] for t in result.trials}
    assert result.closest["number"] == min(sizes, key=sizes.get)  # the smallest point
    assert result.closest["number"] == 1  # ... which is the smallest-anchor trial
    assert "INFEASIBLE" in result.summary()
    assert "INFEASIBLE" in (tmp_path / "report.md").read_text()


def test_max_time_returns_the_best_feasible_found(lenet, small, tmp_path, cache):
    result = _run(lenet, small, Budget(max_size_kb=600), tmp_path, cache, max_time=1e-6)
    assert result.stopped == "max_time"
    assert len(result.trials) == 2  # the first generation only
    assert result.feasible and result.candidate is not None


def test_a_finalist_that_cannot_be_exported_is_not_the_answer(
    lenet, small, tmp_path, cache, monkeypatch
):
    """The target's measurement refusing a finalist (an export error) marks it as not
    fitting (reported), instead of ending the search."""
    from edgeslim.core.errors import ExportError

    def refuse(self, model, example, calib=None):
        raise ExportError("the int32 accumulator overflows (test)")

    monkeypatch.setattr(RuntimeTarget, "measure", refuse)
    out = tmp_path / "run"
    result = _run(lenet, small, Budget(max_size_kb=600), out, cache, finetune_top=2)
    assert not result.feasible and len(result.finalists) == 2
    assert all(f["fits"] is False and "overflows" in f["error"] for f in result.finalists)
    assert "INFEASIBLE" in result.summary()
    assert "not exportable" in (out / "report.md").read_text()


def test_facade_exports():
    import edgeslim.search as package

    assert callable(es.search) and callable(package)  # the package calls the search
    assert es.Budget is Budget and es.SearchSpace is SearchSpace
    with pytest.raises(es.ConfigError, match="trials and batch"):
        package(nn.Linear(2, 2), None, Budget(max_size_kb=1), trials=0)


def test_the_widest_uniform_point_that_fits_is_always_a_finalist(
    lenet, small, tmp_path, cache, monkeypatch
):
    # the proxy scores every anchor (dense, smallest, the widest uniform point predicted to
    # fit) 0: by the proxy alone the one finalist would be another trial; the widest
    # anchor that fits must be fine-tuned as well
    from edgeslim.search import engine

    train = engine.run_trial
    run = tmp_path / "run"

    def anchors() -> list[dict]:
        return json.loads((run / "anchors.json").read_text())

    def proxy_hates_anchors(state, job):
        out = train(state, job)
        if job["kind"] == "proxy" and dict(job["candidate"]) in anchors():
            out = {**out, "accuracy": 0.0}
        return out

    monkeypatch.setattr(engine, "run_trial", proxy_hates_anchors)
    budget = Budget(max_size_kb=150)  # dense (1,684 KB) does not fit
    result = _run(lenet, small, budget, run, cache, trials=8)
    feasible = [t for t in result.trials if t["feasible"] and t["accuracy"] is not None]
    fitting = [t for t in feasible if t["candidate"] in anchors()]
    others = [t for t in feasible if t["candidate"] not in anchors()]
    assert len(fitting) >= 2 and others  # smallest + the widest uniform; other trials
    widest = max(fitting, key=lambda t: t["cost"]["size_kb"])
    numbers = [f["number"] for f in result.finalists]
    assert len(numbers) == 2 and widest["number"] in numbers  # top-1 by proxy + the anchor
    best = max(others, key=lambda t: (t["accuracy"], -t["cost"]["size_kb"], -t["number"]))
    assert best["number"] in numbers
