"""Statistics of an evaluation: paired bootstrap over prompts, win rates, intervals across seeds (pure numpy).

Every policy of a run is evaluated on the same prompts with the same sampling keys, so comparisons are paired by
prompt. A bootstrap resample is a vector of counts over the N prompts (`bootstrap_counts`); one matrix of counts
serves every statistic that is a mean over prompts (group rewards of every policy, win indicators of every pair),
which keeps them paired within a resample and makes the whole bootstrap a single matrix product.

Intervals are percentile intervals of the resampled statistic (95% by default). Across seeds, a statistic's
interval is Student's t interval over the per-seed values (`t_interval`), and a paired difference between two
policies is significant when its t interval over seeds excludes 0 (seeds pair policies: the same reward models,
prompts and keys within a seed).
"""

from __future__ import annotations

import math

import numpy as np

LEVEL = 0.95
RESAMPLES = 2000


def wins(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-prompt win indicator of `a` over `b` (same shape, e.g. [N, G] rewards): 1 where a > b, 0.5 on ties, 0."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a > b) + 0.5 * (a == b)


def bootstrap_counts(n: int, resamples: int = RESAMPLES, seed: int = 0) -> np.ndarray:
    """[resamples, n] float32: how often each of n items is drawn in each resample (n draws with replacement)."""
    if n < 1 or resamples < 1:
        raise ValueError(f"need n >= 1 and resamples >= 1, got n={n}, resamples={resamples}")
    draws = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    flat = draws + (np.arange(resamples) * n)[:, None]
    return np.bincount(flat.ravel(), minlength=resamples * n).reshape(resamples, n).astype(np.float32)


def resampled_means(values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Means over the first axis of `values` [N, ...] under each resample of `counts` [R, N] -> [R, ...]."""
    values = np.asarray(values)
    flat = values.reshape(values.shape[0], -1).astype(np.float32)  # counts are small integers: exact in float32
    means = (counts @ flat).astype(np.float64) / values.shape[0]
    return means.reshape(counts.shape[0], *values.shape[1:])


def percentile_interval(resampled: np.ndarray, level: float = LEVEL) -> np.ndarray:
    """[..., 2] (low, high) percentile interval of the resampled statistic [R, ...]."""
    tail = 100 * (1 - level) / 2
    return np.moveaxis(np.percentile(resampled, [tail, 100 - tail], axis=0), 0, -1)


def win_rate(a: np.ndarray, b: np.ndarray, counts: np.ndarray, level: float = LEVEL) -> tuple[np.ndarray, np.ndarray]:
    """Win rate of `a` over `b` ([N, G] per-prompt rewards; ties count half) per column, and its bootstrap
    interval: ([G] rates, [G, 2] intervals)."""
    w = wins(a, b)
    return w.mean(0), percentile_interval(resampled_means(w, counts), level)


def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t with df degrees of freedom (bisection on its CDF; p in (0.5, 1))."""
    if not 0.5 < p < 1 or df < 1:
        raise ValueError(f"t_quantile needs 0.5 < p < 1 and df >= 1, got p={p}, df={df}")

    def cdf(t: float) -> float:  # 1 - I_x(df/2, 1/2) / 2 with x = df / (df + t^2), for t >= 0
        return 1.0 - 0.5 * _betainc(df / 2, 0.5, df / (df + t * t))

    lo, hi = 0.0, 1.0
    while cdf(hi) < p:
        hi *= 2
    for _ in range(80):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b) by its continued fraction (Numerical Recipes' Lentz method)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    if x > (a + 1) / (a + b + 2):
        return 1.0 - _betainc(b, a, 1 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) / a
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, 300):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            f *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return front * f


def t_interval(values: np.ndarray, level: float = LEVEL) -> tuple[np.ndarray, np.ndarray]:
    """Mean over the first axis (seeds) of `values` [S, ...] and its Student-t interval [..., 2]; with one seed the
    interval is (nan, nan): one value says nothing about the spread across seeds."""
    values = np.asarray(values, np.float64)
    mean = values.mean(0)
    s = values.shape[0]
    if s < 2:
        return mean, np.full(mean.shape + (2,), np.nan)
    half = t_quantile(0.5 + level / 2, s - 1) * values.std(0, ddof=1) / math.sqrt(s)
    return mean, np.stack([mean - half, mean + half], -1)


def excludes_zero(interval) -> bool:
    """Whether an interval (low, high) lies wholly on one side of 0 (nan: unknown, so not significant)."""
    lo, hi = (float(v) for v in interval)
    return bool(lo > 0 or hi < 0)


__all__ = ["LEVEL", "RESAMPLES", "bootstrap_counts", "excludes_zero", "percentile_interval", "resampled_means",
           "t_interval", "t_quantile", "win_rate", "wins"]
