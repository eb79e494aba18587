"""Confidence intervals for RSA evaluations: accuracy is a mean over problems, so intervals resample problems.

    from zaya_train.rsa.stats import bootstrap_ci, paired_bootstrap_ci, wilson_ci
    low, high = bootstrap_ci(per_problem_mean_scores)              # percentile bootstrap of the mean
    low, high = wilson_ci(successes=163, trials=200)                # a proportion (majority@N, pass@N)
    low, high = paired_bootstrap_ci(round1_scores, round0_scores)  # mean(a - b), problems resampled together

Percentile bootstrap (Efron & Tibshirani, "An Introduction to the Bootstrap", 1993) with `resamples` draws of the
problems with replacement from a seeded generator, so an interval is reproducible. The Wilson score interval
(Wilson 1927) holds for fractional successes too (a majority vote that splits a tie scores 1/2).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist

import numpy as np

DEFAULT_RESAMPLES = 2000
DEFAULT_LEVEL = 0.95


def _check(level: float, resamples: int) -> None:
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")


def bootstrap_ci(values: Sequence[float], *, resamples: int = DEFAULT_RESAMPLES, level: float = DEFAULT_LEVEL,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (one value per problem)."""
    _check(level, resamples)
    data = np.asarray(values, dtype=np.float64)
    if data.size == 0:
        raise ValueError("values is empty")
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, data.size, size=(resamples, data.size))].mean(axis=1)
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(low), float(high)


def paired_bootstrap_ci(a: Sequence[float], b: Sequence[float], *, resamples: int = DEFAULT_RESAMPLES,
                        level: float = DEFAULT_LEVEL, seed: int = 0) -> tuple[float, float]:
    """Interval of mean(a) - mean(b) where a[i] and b[i] belong to the same problem i (resampled together)."""
    if len(a) != len(b):
        raise ValueError(f"paired values need one pair per problem, got {len(a)} and {len(b)}")
    return bootstrap_ci(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64), resamples=resamples,
                        level=level, seed=seed)


def wilson_ci(successes: float, trials: int, *, level: float = DEFAULT_LEVEL) -> tuple[float, float]:
    """Wilson score interval of a proportion successes / trials."""
    _check(level, 1)
    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}")
    if not 0 <= successes <= trials:
        raise ValueError(f"successes must be in [0, {trials}], got {successes}")
    z = NormalDist().inv_cdf(1 - (1 - level) / 2)
    p = successes / trials
    denominator = 1 + z * z / trials
    center = (p + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    return max(0.0, center - half), min(1.0, center + half)
