"""The noise-robust latency verdict (search/fit.py) with fake timings, and the search using it
(the least of all measurements, persisted; a finalist re-measured against the reference)."""

from __future__ import annotations

import json

import pytest

from edgeslim.core.errors import ConfigError
from edgeslim.search.budget import Budget
from edgeslim.search.engine import _measured_first, _samples
from edgeslim.search.fit import FitRule, Verdict
from edgeslim.search.store import RunStore


def _timer(values: list[float]):
    """A fake timer returning ``values`` in turn (and logging the calls)."""
    it = iter(values)
    calls: list[float] = []

    def timer() -> float:
        v = next(it)
        calls.append(v)
        return v

    timer.calls = calls  # type: ignore[attr-defined]
    return timer


def test_the_least_measurement_decides_without_re_measuring():
    """A model read slow once (a load spike) and fast once fits: the minimum decides; no
    timer call is needed."""
    rule = FitRule(0.089, _timer([]), 0.178)
    v = rule.decide([0.121, 0.0809], timer=_timer([]))
    assert v.fits and v.latency_ms == 0.0809 and v.samples == [0.121, 0.0809]
    assert "min of 2 measurements" in v.how
    # far over the limit (beyond the noise band): rejected without re-measuring
    cand = _timer([])
    far = FitRule(0.089, _timer([]), 0.178, noise=0.25).decide([0.2], timer=cand)
    assert not far.fits and far.latency_ms == 0.2 and cand.calls == []
    assert "beyond the noise band" in far.how


def test_a_near_miss_is_re_measured_and_a_new_minimum_can_fit():
    ref = _timer([0.18] * 5)
    cand = _timer([0.095, 0.092, 0.087, 0.094, 0.099])
    v = FitRule(0.089, ref, 0.178, rounds=5).decide([0.1], timer=cand)
    assert v.fits and v.latency_ms == 0.087 and len(v.samples) == 6
    assert len(ref.calls) == 5 and len(cand.calls) == 5  # interleaved rounds
    assert v.how.startswith("re-measured 5x")


def test_a_loaded_reference_turns_the_verdict_to_the_ratio():
    """Every round slow by ~1.4x for both: the candidate never reads under the limit, but its
    ratio to the reference (0.48) is under the budget fraction (0.5): it fits, judged at the
    reference's quiet speed."""
    ref = _timer([0.25, 0.25, 0.26, 0.25, 0.25])
    cand = _timer([0.12, 0.12, 0.1248, 0.12, 0.12])
    v = FitRule(0.089, ref, 0.178).decide([0.121], timer=cand)
    assert v.fits and v.ratio == pytest.approx(0.48)
    assert v.latency_ms == pytest.approx(0.48 * 0.178)
    assert "reference loaded" in v.how and "<= budget fraction 0.5000" in v.how
    # the same reading with a ratio over the fraction does not fit
    ref = _timer([0.25] * 5)
    cand = _timer([0.14] * 5)
    v = FitRule(0.089, ref, 0.178).decide([0.121], timer=cand)
    assert not v.fits and v.ratio == pytest.approx(0.56)
    assert v.latency_ms == pytest.approx(0.56 * 0.178) and v.latency_ms > 0.089


def test_a_quiet_reference_keeps_the_absolute_verdict():
    """The reference read at its baseline in a round: the machine was quiet then, so a
    candidate that still reads over the limit does not fit, whatever the ratios."""
    ref = _timer([0.25, 0.18, 0.25, 0.25, 0.25])
    cand = _timer([0.10, 0.095, 0.10, 0.10, 0.10])
    v = FitRule(0.089, ref, 0.178).decide([0.1], timer=cand)
    assert not v.fits and v.latency_ms == 0.095
    assert "quiet" in v.how


def test_without_a_reference_the_re_measured_minimum_decides():
    cand = _timer([0.095] * 5)
    v = FitRule(0.089).decide([0.1], timer=cand)
    assert not v.fits and v.latency_ms == 0.095 and "no reference" in v.how
    assert len(cand.calls) == 5
    # no timer: the samples alone decide
    assert not FitRule(0.089).decide([0.1]).fits


def test_verdict_round_trips_through_json_and_validation():
    v = FitRule(1.0).decide([0.5])
    again = Verdict.from_dict(json.loads(json.dumps(v.as_dict())))
    assert again == v
    with pytest.raises(ConfigError, match="limit_ms"):
        FitRule(0.0)
    with pytest.raises(ConfigError, match="rounds"):
        FitRule(1.0, rounds=0)
    with pytest.raises(ConfigError, match="no measurement"):
        FitRule(1.0).decide([])


def test_finalists_use_every_persisted_measurement(tmp_path):
    """_measured_first keeps each verdict with the premeasured record (so a resume reuses
    it) and the samples of trial and premeasured records are what the final verdict starts
    from."""
    store = RunStore(tmp_path, {"x": 1})
    budget = Budget(max_latency_ms=0.089)
    rule = FitRule(0.089, _timer([0.25] * 10), 0.178)
    readings = {0: [0.121], 1: [0.083]}

    def measure(c: dict):
        v = rule.decide(readings[c["n"]], None)
        return {"latency_ms": v.latency_ms}, v.as_dict()

    ranked = [{"number": n, "candidate": {"n": n}} for n in range(2)]
    top = _measured_first(ranked, 1, store, budget, measure)
    assert [r["number"] for r in top] == [1]
    pre = RunStore(tmp_path, {"x": 1}).premeasured()
    assert pre[0]["fit"]["fits"] is False and pre[1]["fit"]["samples"] == [0.083]
    trial = {"number": 0, "measured": {"latency_ms": 0.09}, "fit": {"samples": [0.09, 0.081]}}
    assert _samples(trial) + _samples(pre[0]) == [0.09, 0.081, 0.121]
    assert _samples({"number": 2, "measured": {"latency_ms": 0.1}}) == [0.1]  # older runs
    assert _samples(None) == [] and _samples({"number": 3}) == []
    # the final verdict over all of them: 0.081 fits, where the last reading (0.121) alone
    # would not
    final = rule.decide([*_samples(trial), *_samples(pre[0]), 0.121])
    assert final.fits and final.latency_ms == 0.081


# ----------------------------------------------------------------------------- in the search


@pytest.fixture(scope="module")
def lenet_small(mnist):
    import torch

    import edgeslim as es

    small = mnist.limit(300)
    torch.manual_seed(0)
    model = es.zoo.create("lenet5")
    es.fit(model, small, epochs=1, progress=False)
    return model.eval(), small


def test_search_finalist_read_slow_on_a_loaded_machine_still_fits(
    lenet_small, tmp_path, monkeypatch
):
    """Fake timings: every finalist reads over the limit (within the noise), the reference
    reads 1.5x its baseline throughout; the ratio verdict accepts them, the report says how,
    and a resume on the same directory keeps the verdict even when the machine then reads
    everything far too slow (nothing is re-measured)."""
    pytest.importorskip("optuna")
    from edgeslim.search import SearchSpace
    from edgeslim.search.cost import RuntimeTarget
    from edgeslim.search.engine import search

    model, small = lenet_small
    reading = {"ref": 300.0, "cand": [120.0, 135.0]}  # ms: ratio 0.45 < fraction 0.5

    def fake_timer(self, m, example):
        if m is model:
            return lambda: reading["ref"]
        values = iter(reading["cand"])
        return lambda: next(values, reading["cand"][-1])

    def fake_calibrate(self, models, example, key):
        self.scale, self.overhead = 1.0, 0.0  # predictions: summed table entries (< 1 ms)
        return self.scale, self.overhead

    monkeypatch.setattr(RuntimeTarget, "timer", fake_timer)
    monkeypatch.setattr(RuntimeTarget, "calibrate", fake_calibrate)
    kw = dict(
        target="torch",
        space=SearchSpace(keep=[1.0, 0.5, 0.25], sparsity=[0.0], rank=[1.0]),
        trials=4, batch=2, seed=3, proxy_steps=2, proxy_val=100, batch_size=32,
        finetune_top=1, finetune_epochs=1, workers=0, cache=tmp_path / "cache",
        export=False, progress=False, reference_ms=200.0,
    )  # fmt: skip
    out = tmp_path / "run"
    result = search(model, small, Budget(max_latency_ms=100.0), out=out, **kw)
    assert result.feasible and "reference loaded" in result.verdict
    fin = result.finalists[0]
    assert fin["fits"] and fin["fit"]["ratio"] == pytest.approx(0.45)
    assert fin["measured"]["latency_ms"] == pytest.approx(90.0)
    assert min(fin["fit"]["samples"]) == 120.0  # the premeasured reading is among them
    assert "reference loaded" in (out / "report.md").read_text()
    assert json.loads((out / "calibration.json").read_text())["reference_ms"] == 200.0
    reading.update(ref=200.0, cand=[1000.0])  # now: quiet reference, a hopeless candidate
    again = search(model, small, Budget(max_latency_ms=100.0), out=out, **kw)
    assert again.feasible and again.candidate == result.candidate
    assert again.finalists[0]["fit"] == fin["fit"]
