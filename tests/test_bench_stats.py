"""benchmarks/_stats.py (paired tests of benchmarks/search_seeds.py) and the larger test set
of benchmarks/_tasks.py's cluttered MNIST."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from conftest import import_benchmark


@pytest.fixture(scope="module")
def stats():
    return import_benchmark("_stats")  # benchmarks/_stats.py


def test_paired_t_matches_the_closed_form_for_one_degree_of_freedom(stats):
    # differences 1 and 3: mean 2, sd sqrt(2), se 1, t = 2; with 1 df t is Cauchy:
    # p = 1 - (2 / pi) * atan(2)
    r = stats.paired_t([5.0, 7.0], [4.0, 4.0])
    assert r["diffs"] == [1.0, 3.0]
    assert (r["mean"], r["se"], r["t"], r["df"]) == pytest.approx((2.0, 1.0, 2.0, 1))
    assert r["p"] == pytest.approx(1 - 2 / math.pi * math.atan(2.0))
    # 95% interval: mean +- t_{0.975, 1} * se, t_{0.975, 1} = tan(0.475 pi)
    half = math.tan(0.475 * math.pi)
    assert r["ci95"] == pytest.approx([2 - half, 2 + half])


def test_paired_t_agrees_with_scipy_ttest_rel(stats):
    from scipy import stats as sp

    a, b = [61.05, 61.4, 60.35, 60.9, 62.0], [59.4, 59.55, 59.8, 57.7, 60.1]
    r = stats.paired_t(a, b)
    ref = sp.ttest_rel(a, b)
    assert (r["t"], r["p"], r["df"]) == (pytest.approx(ref.statistic), pytest.approx(ref.pvalue), 4)
    assert r["ci95"][0] < r["mean"] < r["ci95"][1]


def test_paired_t_rejects_fewer_than_two_pairs(stats):
    with pytest.raises(ValueError, match=">= 2 pairs"):
        stats.paired_t([1.0], [0.0])


def test_mcnemar_exact_is_the_two_sided_binomial_on_the_discordant_images(stats):
    a = torch.tensor([1] * 9 + [0] * 1 + [1] * 5 + [0] * 3, dtype=torch.bool)
    b = torch.tensor([0] * 9 + [1] * 1 + [1] * 5 + [0] * 3, dtype=torch.bool)
    r = stats.mcnemar_exact(a, b)
    # 9 vs 1 discordant: p = 2 * P(X <= 1), X ~ Bin(10, 1/2) = 2 * 11 / 1024
    assert (r["a_only"], r["b_only"]) == (9, 1)
    assert r["p"] == pytest.approx(22 / 1024)
    assert stats.mcnemar_exact(a, a)["p"] == 1.0


def test_clustered_t_tests_the_cluster_means(stats):
    # two copies per cluster: the cluster means are 1, 0, 2, 1 -> mean 1, sd sqrt(2/3)
    diff = torch.tensor([1.0, 1.0, 0.0, 0.0, 2.0, 2.0, 1.0, 1.0])
    r = stats.clustered_t(diff, torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))
    se = math.sqrt(2 / 3) / 2
    assert (r["clusters"], r["mean"], r["se"]) == (4, pytest.approx(1.0), pytest.approx(se))
    from scipy import stats as sp

    assert r["p"] == pytest.approx(2 * sp.t.sf(1 / se, 3))


def test_combined_z_adds_the_two_variances(stats):
    r = stats.combined(1.96 * 5, 3.0, 4.0)  # se = 5
    assert r["se"] == pytest.approx(5.0)
    assert r["p"] == pytest.approx(0.05, abs=1e-4)


def test_more_test_copies_leave_the_usual_data_unchanged():
    tasks = import_benchmark("_tasks")
    usual = tasks.cluttered_mnist()
    more = tasks.cluttered_mnist(test_copies=3)
    assert torch.equal(usual.train.x, more.train.x) and torch.equal(usual.val.x, more.val.x)
    assert len(more.test) == 3000 and torch.equal(more.test.x[:2000], usual.test.x)
    assert torch.equal(more.test.y, usual.test.y[:1000].repeat(3))
    assert not torch.equal(more.test.x[2000:], more.test.x[:1000])  # a new clutter draw
    # (two calls gave the same first 2,000 test images: the data are deterministic)


def test_test_copies_below_one_are_rejected():
    tasks = import_benchmark("_tasks")
    with pytest.raises(ValueError, match="test_copies must be >= 1"):
        tasks.cluttered_mnist(test_copies=0)


def test_search_seeds_compare_pairs_by_seed_on_both_test_sets():
    seeds = import_benchmark("search_seeds")  # benchmarks/search_seeds.py
    g = torch.Generator().manual_seed(0)
    n = 4000  # 4 copies of 1,000 digits; the first 2,000 are the benchmark's test set
    base = [torch.rand(n, generator=g) < 0.6 for _ in range(3)]
    better = [c.clone() for c in base]
    for i, c in enumerate(better):
        c[: 20 * (i + 1)] = True  # seed i: at most 20 (i + 1) more right, all in the first 2,000
    a = [{"correct": c} for c in better]
    b = [{"correct": c} for c in base]
    r = seeds.compare(a, b, copies=4)
    gain = [100 * float((bt & ~bs).sum()) for bt, bs in zip(better, base, strict=True)]
    assert r["std"]["paired_t"]["diffs"] == pytest.approx([x / 2000 for x in gain])
    assert r["big"]["paired_t"]["diffs"] == pytest.approx([x / 4000 for x in gain])
    assert r["big"]["digit_t"]["clusters"] == 1000 and r["std"]["images"] == 2000
    assert [m["b_only"] for m in r["big"]["mcnemar"]] == [0, 0, 0]


def test_search_seeds_shares_a_fine_tune_between_methods_with_the_same_start(tmp_path, monkeypatch):
    seeds = import_benchmark("search_seeds")
    from edgeslim.core.data.datasets import DataSplits, Split

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2000, 4, generator=g), torch.randint(0, 3, (2000,), generator=g)
    data = DataSplits("toy", Split(x[:64], y[:64]), Split(x[:32], y[:32]), Split(x, y), 3)
    calls = []

    def fake_distil(model, teacher, data, epochs, lr, batch, seed=0):  # a seeded "fine-tune"
        calls.append(seed)
        with torch.no_grad():
            model.weight += torch.randn(model.weight.shape, generator=torch.Generator()
                                        .manual_seed(seed))  # fmt: skip
        return model

    monkeypatch.setattr(seeds, "distil", fake_distil)
    torch.manual_seed(1)
    dense = torch.nn.Linear(4, 3)
    scaled = []

    def finish(m, k=1.0):
        scaled.append(k)
        return m

    start = {"build": lambda: copy.deepcopy(dense), "finish": finish}
    other = {"build": lambda: copy.deepcopy(dense), "finish": lambda m: finish(m, 2.0)}
    frozen = {**start, "finetune": False}
    cache = tmp_path / "toy-0.5-seeds"
    cache.mkdir()
    a = [seeds.run_seed("resnet8", "a", start, dense, data, data.test, s, cache) for s in (0, 1)]
    b = [seeds.run_seed("resnet8", "b", other, dense, data, data.test, s, cache) for s in (0, 1)]
    c = [seeds.run_seed("resnet8", "c", frozen, dense, data, data.test, s, cache) for s in (0, 1)]
    assert calls == [0, 1]  # one fine-tune per seed, shared by a and b; none for c
    assert scaled == [1.0, 1.0, 2.0, 2.0, 1.0]  # c's finish ran once, for every seed
    assert torch.equal(a[0]["correct"], b[0]["correct"])  # the same fine-tuned model
    assert not torch.equal(a[0]["correct"], a[1]["correct"])  # another seed, another model
    assert torch.equal(c[0]["correct"], c[1]["correct"])
    with torch.no_grad():
        want = dense(x).argmax(1) == y
    assert torch.equal(c[0]["correct"], want)  # no fine-tune: the dense model's answers
    assert len(list((tmp_path / "resnet8-seeds-ft").glob("*.pt"))) == 2
    # a rerun reads every record back and fine-tunes nothing
    seeds.run_seed("resnet8", "a", start, dense, data, data.test, 1, cache)
    assert calls == [0, 1]
    # a method that does not depend on the budget is kept once per net: another budget's
    # run reads it back
    shared = {**other, "shared": True}
    d = seeds.run_seed("resnet8", "d", shared, dense, data, data.test, 0, cache)
    again = tmp_path / "toy-0.7-seeds"
    again.mkdir()
    e = seeds.run_seed("resnet8", "d", shared, dense, data, data.test, 0, again)
    assert scaled == [1.0, 1.0, 2.0, 2.0, 1.0, 2.0]  # d's finish ran once for both budgets
    assert torch.equal(d["correct"], e["correct"]) and not list(again.iterdir())
    assert (tmp_path / "resnet8-seeds-shared" / "d-seed0.pt").exists()
