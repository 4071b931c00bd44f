"""Is a difference between two groups of seeds larger than the seed-to-seed spread?

Welch's unequal-variance t-test (Welch 1947; degrees of freedom by the Welch–Satterthwaite equation) with a
two-sided p-value from Student's t distribution (scipy), and a percentile bootstrap interval of the
difference of means (Efron & Tibshirani 1993, ch. 13: each group resampled with replacement on its own).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = ["Difference", "bootstrap_interval", "compare_groups", "welch_t_test"]


@dataclass(frozen=True)
class Difference:
    """``mean(a) - mean(b)`` with Welch's test and a bootstrap interval (NaN where undefined)."""

    mean_a: float
    mean_b: float
    diff: float
    t: float
    df: float
    p: float
    low: float
    high: float
    n_a: int
    n_b: int
    level: float = 0.95

    @property
    def testable(self) -> bool:
        """At least two seeds a group and a defined p-value."""
        return self.n_a >= 2 and self.n_b >= 2 and math.isfinite(self.p)

    @property
    def beyond_spread(self) -> bool:
        """p < 1 - level and the bootstrap interval excludes 0."""
        return self.testable and self.p < 1 - self.level and (self.low > 0 or self.high < 0)


def welch_t_test(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, float]:
    """``(t, df, p)`` of Welch's test of mean(a) = mean(b), two-sided; NaNs with fewer than two values a
    group, or when both groups have zero variance (then t is 0/0 or ±inf: no spread to compare with)."""
    from scipy.stats import t as student_t

    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(x) < 2 or len(y) < 2:
        return math.nan, math.nan, math.nan
    va, vb = x.var(ddof=1) / len(x), y.var(ddof=1) / len(y)
    if va + vb == 0:
        return math.nan, math.nan, math.nan
    t = (x.mean() - y.mean()) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(x) - 1) + vb**2 / (len(y) - 1))
    return float(t), float(df), float(2 * student_t.sf(abs(t), df))


def bootstrap_interval(a: Sequence[float], b: Sequence[float], *, level: float = 0.95, resamples: int = 10_000,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile interval of mean(a*) - mean(b*) over ``resamples`` bootstrap resamples (seeded: the same
    numbers every time); NaNs if a group is empty."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(x) == 0 or len(y) == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    diffs = (rng.choice(x, (resamples, len(x))).mean(axis=1) - rng.choice(y, (resamples, len(y))).mean(axis=1))
    low, high = np.quantile(diffs, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def compare_groups(a: Sequence[float], b: Sequence[float], *, level: float = 0.95) -> Difference:
    """Welch's test and the bootstrap interval of ``mean(a) - mean(b)`` in one record."""
    t, df, p = welch_t_test(a, b)
    low, high = bootstrap_interval(a, b, level=level)
    mean_a = float(np.mean(a)) if len(a) else math.nan
    mean_b = float(np.mean(b)) if len(b) else math.nan
    return Difference(mean_a, mean_b, mean_a - mean_b, t, df, p, low, high, len(a), len(b), level)
