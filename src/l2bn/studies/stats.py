"""Is a difference between two arms of seeds larger than the seed-to-seed spread, and what could we detect?

Tests and intervals are scipy's: Welch's unequal-variance t-test and its t-interval for two independent arms
(``scipy.stats.ttest_ind(equal_var=False)``), the paired t-test and interval where both arms ran the same seeds
(``scipy.stats.ttest_rel``: same seed, same data order and augmentation draws). A page's family of tests is
corrected with Holm's step-down method (Holm 1979, "A simple sequentially rejective multiple test procedure").
The smallest difference a comparison could detect is the |δ| at which the same two-sided t-test at level
α = 0.05 has 80 % power, from the noncentral t distribution with the comparison's standard error and degrees
of freedom (Cohen 1988, ch. 2): "not distinguishable" then says how much was ruled out.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np

__all__ = ["Difference", "compare_groups", "detectable_difference", "holm", "paired_seeds"]

ALPHA, POWER = 0.05, 0.80


@dataclass(frozen=True)
class Difference:
    """``mean(a) - mean(b)``: its t-test (Welch's, or paired), interval, detectable difference and, once a family
    is corrected (:func:`holm`), the Holm-adjusted p-value. NaN where undefined."""

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
    paired: bool = False
    se: float = math.nan
    p_holm: float = math.nan
    level: float = 0.95

    @property
    def detectable(self) -> float:
        """The difference this test detects with 80 % power at its standard error and degrees of freedom."""
        return detectable_difference(self.se, self.df, alpha=1 - self.level)

    @property
    def testable(self) -> bool:
        """At least two seeds an arm and a defined p-value."""
        return self.n_a >= 2 and self.n_b >= 2 and math.isfinite(self.p)

    @property
    def beyond_spread(self) -> bool:
        """The (Holm-adjusted, where adjusted) p-value is below 1 - level."""
        p = self.p_holm if math.isfinite(self.p_holm) else self.p
        return self.testable and p < 1 - self.level

    @property
    def test_name(self) -> str:
        return "paired t" if self.paired else "Welch t"


def detectable_difference(se: float, df: float, *, alpha: float = ALPHA, power: float = POWER) -> float:
    """The smallest |δ| a two-sided t-test at level ``alpha`` with standard error ``se`` and ``df`` degrees of
    freedom detects with probability ``power`` (noncentral t); NaN where ``se`` or ``df`` is undefined."""
    from scipy.optimize import brentq
    from scipy.stats import t

    if not (math.isfinite(se) and math.isfinite(df)) or se <= 0 or df <= 0:
        return math.nan
    crit = t.isf(alpha / 2, df)

    def shortfall(delta: float) -> float:
        return rejection_probability(delta / se, crit, df) - power

    high = se * (crit + 2.0)  # the normal approximation's answer is about se·(crit + 0.84)
    while shortfall(high) < 0:
        high *= 2.0
    return float(brentq(shortfall, 0.0, high))


def rejection_probability(shift: float, crit: float, df: float) -> float:
    """P(|T| > crit) for T noncentral t with ``df`` degrees of freedom and noncentrality ``shift``: scipy's
    ``nct``, or, where it returns NaN (Welch degrees of freedom near 1 and large shifts, e.g. 6 seeds against
    2), the same probability as an integral over the chi-square variable V of T = (Z + shift) / sqrt(V / df)."""
    from scipy.integrate import quad
    from scipy.stats import chi2, nct, norm

    p = float(nct.sf(crit, df, shift) + nct.cdf(-crit, df, shift))
    if math.isfinite(p):
        return p

    def given_v(v: float) -> float:
        bound = crit * math.sqrt(v / df)
        return (norm.sf(bound - shift) + norm.cdf(-bound - shift)) * chi2.pdf(v, df)

    return float(quad(given_v, 0.0, math.inf, limit=200)[0])


def _welch(x: np.ndarray, y: np.ndarray, level: float) -> tuple[float, float, float, float, float, float]:
    from scipy.stats import ttest_ind

    va, vb = x.var(ddof=1) / len(x), y.var(ddof=1) / len(y)
    if va + vb == 0:
        return (math.nan,) * 6
    result = ttest_ind(x, y, equal_var=False)
    interval = result.confidence_interval(level)
    return (float(result.statistic), float(result.df), float(result.pvalue), float(interval.low),
            float(interval.high), math.sqrt(va + vb))


def _paired(x: np.ndarray, y: np.ndarray, level: float) -> tuple[float, float, float, float, float, float]:
    from scipy.stats import ttest_rel

    d = x - y
    if d.var(ddof=1) == 0:
        return (math.nan,) * 6
    result = ttest_rel(x, y)
    interval = result.confidence_interval(level)
    return (float(result.statistic), float(result.df), float(result.pvalue), float(interval.low),
            float(interval.high), float(d.std(ddof=1) / math.sqrt(len(d))))


def compare_groups(a: Sequence[float], b: Sequence[float], *, paired: bool = False,
                   level: float = 0.95) -> Difference:
    """The t-test, t-interval and 80 %-power detectable difference of ``mean(a) - mean(b)``; ``paired=True``
    pairs ``a[i]`` with ``b[i]`` (the same seed in both arms)."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if paired and len(x) != len(y):
        raise ValueError(f"a paired comparison needs arms of equal length, got {len(x)} and {len(y)}")
    mean_a = float(x.mean()) if len(x) else math.nan
    mean_b = float(y.mean()) if len(y) else math.nan
    stats = (math.nan,) * 6
    if len(x) >= 2 and len(y) >= 2:
        stats = _paired(x, y, level) if paired else _welch(x, y, level)
    t, df, p, low, high, se = stats
    return Difference(mean_a, mean_b, mean_a - mean_b, t, df, p, low, high, len(x), len(y), paired, se,
                      level=level)


def holm(diffs: Sequence[Difference]) -> list[Difference]:
    """The family ``diffs`` with Holm's step-down adjusted p-values (untestable members stay NaN and do not count
    in the family): the k-th smallest of m p-values becomes max over j ≤ k of min(1, (m − j + 1)·p_(j))."""
    order = sorted((i for i, d in enumerate(diffs) if d.testable), key=lambda i: diffs[i].p)
    adjusted, running = {}, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * diffs[i].p))
        adjusted[i] = running
    return [replace(d, p_holm=adjusted.get(i, math.nan)) for i, d in enumerate(diffs)]


def paired_seeds(a: dict[int, float], b: dict[int, float]) -> tuple[list[float], list[float], bool]:
    """The values of two arms keyed by seed, in one seed order, and whether to pair them: both arms ran exactly
    the same seeds (at least two)."""
    if set(a) == set(b) and len(a) >= 2:
        seeds = sorted(a)
        return [a[s] for s in seeds], [b[s] for s in seeds], True
    return list(a.values()), list(b.values()), False
