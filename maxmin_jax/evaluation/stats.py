"""Statistics of an evaluation: paired bootstrap over prompts, win rates, intervals across seeds (numpy, scipy).

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


def t_interval(values: np.ndarray, level: float = LEVEL) -> tuple[np.ndarray, np.ndarray]:
    """Mean over the first axis (seeds) of `values` [S, ...] and its Student-t interval [..., 2]; with one seed the
    interval is (nan, nan): one value says nothing about the spread across seeds."""
    values = np.asarray(values, np.float64)
    mean = values.mean(0)
    s = values.shape[0]
    if s < 2:
        return mean, np.full(mean.shape + (2,), np.nan)
    from scipy.stats import t as student_t

    half = float(student_t.ppf(0.5 + level / 2, s - 1)) * values.std(0, ddof=1) / math.sqrt(s)
    return mean, np.stack([mean - half, mean + half], -1)


def excludes_zero(interval) -> bool:
    """Whether an interval (low, high) lies wholly on one side of 0 (nan: unknown, so not significant)."""
    lo, hi = (float(v) for v in interval)
    return bool(lo > 0 or hi < 0)


__all__ = ["LEVEL", "RESAMPLES", "bootstrap_counts", "excludes_zero", "percentile_interval", "resampled_means",
           "t_interval", "win_rate", "wins"]
