"""Confidence intervals against hand computation and a second, loop-by-loop implementation."""

import math

import numpy as np
import pytest

from zaya_train.rsa.core import Candidate
from zaya_train.rsa.metrics import round_metrics
from zaya_train.rsa.stats import bootstrap_ci, paired_bootstrap_ci, wilson_ci


def test_wilson_interval_by_hand():
    # 8 of 10, z = 1.959964: p = 0.8, denominator 1 + z^2/10 = 1.384146, centre (0.8 + z^2/20) / 1.384146 =
    # 0.716738, half-width z * sqrt(0.016 + z^2/400) / 1.384146 = 0.226579.
    low, high = wilson_ci(8, 10)
    assert low == pytest.approx(0.490162, abs=1e-5) and high == pytest.approx(0.943317, abs=1e-5)
    assert wilson_ci(0, 20)[0] == pytest.approx(0.0, abs=1e-12) and wilson_ci(20, 20)[1] == pytest.approx(1.0)
    assert wilson_ci(0, 20)[1] == pytest.approx(1.959964**2 / 20 / (1 + 1.959964**2 / 20), abs=1e-6)


def test_bootstrap_matches_a_loop_implementation_of_the_percentile_bootstrap():
    values = [0.0, 0.25, 1.0, 0.5, 0.75, 1.0, 0.0, 0.125]
    rng = np.random.default_rng(7)
    draws = rng.integers(0, len(values), size=(500, len(values)))
    means = sorted(sum(values[i] for i in row) / len(values) for row in draws)
    # numpy's default quantile: linear interpolation at (resamples - 1) * q
    def quantile(q):
        position = (len(means) - 1) * q
        below = math.floor(position)
        return means[below] + (means[min(below + 1, len(means) - 1)] - means[below]) * (position - below)

    assert bootstrap_ci(values, resamples=500, seed=7) == pytest.approx((quantile(0.025), quantile(0.975)), abs=1e-12)


def test_bootstrap_of_a_large_sample_is_close_to_the_normal_interval():
    values = np.random.default_rng(0).binomial(1, 0.6, size=2000).astype(float)
    low, high = bootstrap_ci(values)
    half = 1.959964 * values.std() / math.sqrt(values.size)
    assert low == pytest.approx(values.mean() - half, abs=0.004)
    assert high == pytest.approx(values.mean() + half, abs=0.004)
    assert bootstrap_ci([0.5] * 30) == (0.5, 0.5)


def test_paired_interval_resamples_problems_together():
    a = [0.9, 0.1, 0.8, 0.2, 0.7, 0.3]
    b = [x - 0.05 for x in a]  # a beats b by exactly 0.05 on every problem: no spread at all
    assert paired_bootstrap_ci(a, b) == pytest.approx((0.05, 0.05))
    unpaired_width = np.subtract(*bootstrap_ci(a)[::-1]) + np.subtract(*bootstrap_ci(b)[::-1])
    assert unpaired_width > 0.3
    with pytest.raises(ValueError, match="one pair per problem"):
        paired_bootstrap_ci(a, b[:-1])


def test_round_metrics_carry_intervals_and_per_problem_scores():
    def cand(score, answer):
        return Candidate([1], 1, (), score, answer)

    population = [[cand(1.0, "1"), cand(0.0, "2"), cand(1.0, "1")], [cand(0.0, "3"), cand(0.0, None), cand(0.0, "3")]]
    metrics = round_metrics(0, population)
    assert metrics.problem_mean_scores == pytest.approx((2 / 3, 0.0))
    assert metrics.problem_majority_scores == pytest.approx((1.0, 0.0))  # "1" wins 2-1; "3" wins and is wrong
    assert metrics.majority_accuracy_ci == list(wilson_ci(1, 2))
    assert metrics.pass_at_n_ci == list(wilson_ci(1, 2))
    low, high = metrics.mean_accuracy_ci
    assert 0.0 <= low <= metrics.mean_accuracy <= high <= 2 / 3
