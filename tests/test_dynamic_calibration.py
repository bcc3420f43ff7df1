"""Exit calibration on constructed results: the accuracy targets, measured costs, errors."""

import math

import pytest
import torch

from edgeslim import ConfigError
from edgeslim.dynamic import ExitCalibration, ExitCosts, choose_thresholds

# one early exit + the final exit, 10 samples; exit 0's confidence of sample i is i / 10,
# and exit 0 is right on samples 5..9 only; the final exit is right on every sample
SCORES = torch.arange(10, dtype=torch.float32).div(10).unsqueeze(0)
CORRECT = torch.stack([torch.arange(10) >= 5, torch.ones(10, dtype=torch.bool)])
MACS = ([10, 90], [5])  # segments, head: exit 0 costs 15, the final exit 105


def choose(**kw) -> dict:  # the point estimate (margin 0) unless a test says otherwise
    return choose_thresholds(SCORES, CORRECT, MACS, ExitCalibration(**{"margin": 0, **kw}))


def test_reference_accuracy_moves_the_target():
    # against the final exit (100%): no loss allowed, only samples 5..9 may leave
    strict = choose(max_loss=0.0)
    assert strict["target"] == 1.0 and strict["accuracy"] == 1.0
    assert strict["shares"] == [0.5, 0.5] and 0.4 < strict["thresholds"][0] <= 0.5
    # against a reference of 95% with 5 points allowed: one wrong exit is fine
    loose = choose(max_loss=0.05, reference_accuracy=0.95)
    assert math.isclose(loose["target"], 0.9)
    assert math.isclose(loose["accuracy"], 0.9) and loose["shares"] == [0.6, 0.4]
    assert 0.3 < loose["thresholds"][0] <= 0.4 < strict["thresholds"][0]
    assert loose["macs"] < strict["macs"]
    assert math.isclose(loose["macs"], 0.6 * 15 + 0.4 * 105)
    # min_accuracy is the same target given directly
    assert choose(min_accuracy=0.8)["shares"] == [0.7, 0.3]
    # a reference above what the exits reach: the target is refused, not silently missed
    final_wrong_once = CORRECT & (torch.arange(10) > 0)  # the final exit: 90%
    with pytest.raises(ConfigError, match=r"out of reach.*0\.9000"):
        choose_thresholds(
            SCORES, final_wrong_once, MACS, ExitCalibration(max_loss=0.05, reference_accuracy=1)
        )
    with pytest.raises(ConfigError, match="min_accuracy"):
        choose_thresholds(SCORES, final_wrong_once, MACS, ExitCalibration(min_accuracy=0.95))


def test_measured_costs_replace_macs():
    by_macs = choose(min_accuracy=1.0)
    assert by_macs["shares"] == [0.5, 0.5]
    # a head that costs more than the whole network saves nothing: every exit stays off
    costly = choose(min_accuracy=1.0, costs=ExitCosts(segments=[10, 90], heads=[200]))
    assert costly["thresholds"] == [math.inf] and costly["shares"] == [0.0, 1.0]
    assert costly["cost"] == costly["static_cost"] == 100 and costly["macs"] == 100
    # the budget is a share of the static cost in the costs' unit
    cheap = ExitCosts(segments=[1, 99], heads=[1])
    res = choose(budget=0.5, costs=cheap)
    assert res["cost"] <= 50 and res["shares"][0] >= 0.5
    with pytest.raises(ConfigError, match="budget"):
        choose(budget=0.01, costs=cheap)


BAD_CALIBRATIONS = [  # (ExitCalibration keyword arguments, what the error says)
    ({}, "exactly one"),
    ({"max_loss": 0.01, "min_accuracy": 0.9}, "exactly one"),
    ({"min_accuracy": 0.9, "budget": 0.5}, "exactly one"),
    ({"budget": 0.5, "reference_accuracy": 0.9}, "goes with max_loss"),
    ({"min_accuracy": 0.9, "reference_accuracy": 0.9}, "goes with max_loss"),
    ({"max_loss": 0.01, "reference_accuracy": 1.5}, "reference_accuracy"),
    ({"max_loss": 0.5, "reference_accuracy": 0.2}, "above reference_accuracy"),
    ({"min_accuracy": -0.1}, "min_accuracy"),
    ({"max_loss": 0.01, "margin": -1}, "margin"),
    ({"max_loss": 0.01, "margin": 11}, "margin"),
    ({"budget": 0.5, "margin": 1}, "not with budget"),
]
BAD_COSTS = [  # (ExitCosts segments, heads, what the error says)
    ([1, 2, 3], [1], "head costs"),
    ([1, 2], [-1], "finite"),
    ([1, math.nan], [1], "finite"),
    ([0, 0], [1], "all be 0"),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD_CALIBRATIONS)
def test_calibration_validation_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        ExitCalibration(**kwargs)


@pytest.mark.parametrize(("segments", "heads", "message"), BAD_COSTS)
def test_cost_validation_errors(segments, heads, message):
    with pytest.raises(ConfigError, match=message):
        ExitCosts(segments=segments, heads=heads)


def test_budget_ignores_the_default_margin():
    assert choose_thresholds(SCORES, CORRECT, MACS, ExitCalibration(budget=0.5))["cost"] <= 50
    assert ExitCalibration(budget=0.5, margin=0).budget == 0.5


def test_costs_must_match_the_exits():
    with pytest.raises(ConfigError, match="2 head costs"):
        choose(max_loss=0.0, costs=ExitCosts(segments=[1, 1, 1], heads=[1, 1]))


def test_measure_exit_costs_shapes_and_use():
    from edgeslim.core.models import zoo
    from edgeslim.dynamic import Exits, add_exits_, measure_exit_costs

    em = add_exits_(zoo.create("lenet5"), Exits(after=["conv1", "conv2"]))
    em.train()
    costs = measure_exit_costs(em, torch.randn(4, 1, 28, 28), samples=3, repeats=1, warmup=1)
    assert len(costs.segments) == 3 and len(costs.heads) == 2
    assert all(c > 0 for c in [*costs.segments, *costs.heads]) and em.training
    with pytest.raises(ConfigError, match="at least one"):
        measure_exit_costs(em, torch.randn(4, 1, 28, 28), repeats=0)


def test_margin_keeps_the_spoilt_answers_bounded():
    # margin 0 spends the whole 10-point budget: one spoilt answer (sample 4) is fine
    point = choose(max_loss=0.1)
    assert point["shares"] == [0.6, 0.4] and point["margin"] == 0
    # margin 1: 6 early, 1 spoilt -> Wilson excess 0.6 * (0.363 - 1/6) = 0.118 > 0.1;
    # 5 early, none spoilt -> 0.5 * 1 / (5 + 1) = 0.083 <= 0.1: the safer threshold
    safe = choose(max_loss=0.1, margin=1)
    assert safe["shares"] == [0.5, 0.5] and safe["accuracy"] == 1.0
    assert math.isclose(safe["margin"], 0.5 / 6) and 0.4 < safe["thresholds"][0] <= 0.5
    assert math.isclose(safe["accuracy_bound"], 1 - 0.5 / 6)
    # no loss allowed: even a clean exit carries a margin, so every exit stays off (the
    # final exit alone has no margin: a target it reaches stays reachable)
    off = choose(max_loss=0.0, margin=1)
    assert off["thresholds"] == [math.inf] and off["shares"] == [0.0, 1.0]
    assert off["margin"] == 0 and off["accuracy_bound"] == 1.0
    # the default is margin 1
    default = choose_thresholds(SCORES, CORRECT, MACS, ExitCalibration(max_loss=0.1))
    assert default["thresholds"] == safe["thresholds"]


def test_harm_margin_is_the_wilson_excess():
    from edgeslim.dynamic.calibration import harm_margin

    correct = torch.stack([torch.arange(10) >= 2, torch.ones(10, dtype=torch.bool)])
    exit_at = torch.tensor([0] * 8 + [1] * 2)  # 8 leave early, 2 of them spoilt
    z, m, p = 1.5, 8, 2 / 8
    upper = (p + z * z / (2 * m) + z * math.sqrt(p * (1 - p) / m + z**2 / (4 * m * m))) / (
        1 + z * z / m
    )
    assert math.isclose(harm_margin(correct, exit_at, z), 0.8 * (upper - p))
    assert harm_margin(correct, exit_at, 0) == 0
    assert harm_margin(correct, torch.ones(10, dtype=torch.long), 2.0) == 0  # none early
    # a sample the exit gets right but the final exit gets wrong spoils nothing
    helped = torch.stack([torch.ones(10, dtype=torch.bool), torch.arange(10) > 0])
    assert math.isclose(harm_margin(helped, torch.zeros(10, dtype=torch.long), 1), 1 / 11)
