"""benchmarks/nas.py's paired comparison: per seed, McNemar, Student's t, per image, per digit."""

from __future__ import annotations

import pytest

from conftest import import_benchmark


@pytest.fixture(scope="module")
def bench():
    return import_benchmark("nas")  # benchmarks/nas.py


def test_exact_mcnemar_and_students_t_match_their_tables(bench):
    assert bench._mcnemar_p(10, 2) == pytest.approx(2 * (1 + 12 + 66) / 4096)
    assert bench._mcnemar_p(0, 0) == 1.0 and bench._mcnemar_p(5, 5) == 1.0
    assert bench._t_p(4.303, 2) == pytest.approx(0.05, abs=2e-4)  # t tables, 97.5%
    assert bench._t_p(2.776, 4) == pytest.approx(0.05, abs=2e-4)
    assert bench._t_p(0.0, 3) == pytest.approx(1.0)


def test_paired_compares_common_seeds_image_by_image(bench):
    labels = [0, 1, 2, 3]
    a = {"net": "A", "seeds": [0, 1], "test_pred_seeds": ["0123", "0120"]}
    b = {"net": "B", "seeds": [0, 1, 2], "test_pred_seeds": ["0000", "0123", "3333"]}
    got = bench.paired(a, b, labels)
    assert got["seeds"] == [0, 1]  # seed 2: only B has it
    assert [(r["only_a"], r["only_b"]) for r in got["per_seed"]] == [(3, 0), (0, 1)]
    assert [r["diff"] for r in got["per_seed"]] == [0.75, -0.25]
    assert got["mean_diff"] == pytest.approx(0.25) and got["sd_diff"] == pytest.approx(2**0.5 / 2)
    assert got["t"] == pytest.approx(0.5)
    # per image, the seeds averaged: (0, 0.5, 0.5, 0), mean 0.25
    assert got["image_mean_diff"] == pytest.approx(0.25)
    assert bench.paired(a, {"net": "C", "seeds": [0]}, labels) is None  # no predictions


def test_paired_counts_the_copies_of_one_digit_once(bench):
    # 4 test images of 2 digits (image i is digit i % 2), per image (0, 0.5, 0.5, 0)
    a = {"net": "A", "seeds": [0, 1], "test_pred_seeds": ["0123", "0120"]}
    b = {"net": "B", "seeds": [0, 1], "test_pred_seeds": ["0000", "0123"]}
    got = bench.paired(a, b, [0, 1, 2, 3], digits=2)
    assert got["digit_mean_diff"] == pytest.approx(0.25)
    assert got["digit_se"] == pytest.approx(0.0)  # both digits average 0.25
    # the seed term alone: sd 0.707 over 2 seeds -> se 0.5; z = 0.5, two-sided p 0.617
    assert got["combined_se"] == pytest.approx(0.5)
    assert got["combined_p"] == pytest.approx(0.6171, abs=1e-4)
    # every image its own digit: the digit test is the per-image one
    each = bench.paired(a, b, [0, 1, 2, 3], digits=4)
    assert each["digit_se"] == pytest.approx(each["image_se"])
