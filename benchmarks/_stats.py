"""Paired significance tests for two models on the same test set (benchmark helpers).

- :func:`paired_t`: two methods' accuracies paired by seed (each seed fine-tunes both with
  the same data order); Student's t on the per-seed differences.
- :func:`mcnemar_exact`: two models' per-image correctness on one test set; the exact
  binomial test on the discordant images (images must be independent).
- :func:`clustered_t`: per-image differences grouped by a cluster (e.g. the source digit of
  several cluttered copies, which are not independent); a one-sample t-test on the cluster
  means.
- :func:`combined`: a conservative z-test for the mean difference when both the fine-tune
  seed and the test sample vary (variance = seed variance / n + test-set variance).

scipy (installed with scikit-learn) supplies the t and binomial distributions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch


def paired_t(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """Two-sided paired t-test of ``a - b`` (one pair per seed): the differences, their mean,
    sample standard deviation, standard error, t, degrees of freedom, p and a 95% interval."""
    from scipy import stats

    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"need >= 2 pairs of equal length, got {len(a)} and {len(b)}")
    d = [float(x) - float(y) for x, y in zip(a, b, strict=True)]
    n = len(d)
    mean = sum(d) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    se = sd / math.sqrt(n)
    half = stats.t.ppf(0.975, n - 1) * se
    if se == 0:
        t, p = (math.inf if mean else 0.0), (0.0 if mean else 1.0)
    else:
        t = mean / se
        p = float(2 * stats.t.sf(abs(t), n - 1))
    return {"diffs": d, "mean": mean, "sd": sd, "se": se, "t": t, "df": n - 1, "p": p,
            "ci95": [mean - half, mean + half]}  # fmt: skip


def mcnemar_exact(a_correct: torch.Tensor, b_correct: torch.Tensor) -> dict[str, Any]:
    """Exact McNemar test: ``a_only`` images only model A gets right, ``b_only`` only B;
    under "no difference" each discordant image is a fair coin, two-sided binomial p."""
    from scipy import stats

    a, b = a_correct.bool(), b_correct.bool()
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    a_only, b_only = int((a & ~b).sum()), int((~a & b).sum())
    n = a_only + b_only
    p = 1.0 if n == 0 else float(stats.binomtest(a_only, n, 0.5).pvalue)
    return {"a_only": a_only, "b_only": b_only, "p": p}


def clustered_t(diff: torch.Tensor, cluster: torch.Tensor) -> dict[str, Any]:
    """One-sample two-sided t-test of the mean of ``diff`` (per image, e.g. correct_A -
    correct_B averaged over seeds) with the images grouped by ``cluster`` ids: the test runs
    on the per-cluster means, so correlated images of one cluster count once."""
    from scipy import stats

    ids, inv = torch.unique(cluster, return_inverse=True)
    k = len(ids)
    if k < 2:
        raise ValueError("need >= 2 clusters")
    sums = torch.zeros(k, dtype=torch.float64).index_add_(0, inv, diff.double())
    counts = torch.bincount(inv, minlength=k).double()
    means = sums / counts
    mean = float(means.mean())
    se = float(means.std(unbiased=True)) / math.sqrt(k)
    t = mean / se if se else (math.inf if mean else 0.0)
    p = float(2 * stats.t.sf(abs(t), k - 1)) if se else (0.0 if mean else 1.0)
    return {"clusters": k, "mean": mean, "se": se, "t": t, "p": p}


def combined(mean: float, se_seed: float, se_test: float) -> dict[str, Any]:
    """Two-sided z-test of ``mean`` with both sources of noise: the seed-to-seed standard
    error (from :func:`paired_t`) and the test-sample one (from :func:`clustered_t`).
    Conservative: each of the two already holds part of the other's noise."""
    se = math.sqrt(se_seed**2 + se_test**2)
    z = mean / se if se else (math.inf if mean else 0.0)
    return {"mean": mean, "se": se, "z": z, "p": math.erfc(abs(z) / math.sqrt(2))}
