"""Per-group comparison of the policies of one run, with paired bootstrap intervals over the evaluation prompts.

Input: each policy's per-prompt group rewards `[N, G]` (true rewards of a world, or each EM head on real data),
the reference's among them, all on the same prompts with the same sampling keys. Output (`compare`):

- per policy: each group's reward on the reference-standardised scale (the mean difference from the reference,
  over the reference's std) with its interval; the worst group's reward and the gap between the best and the worst
  group, with intervals; each group's share of the gain over the reference; the win rate against the reference
  and against the single-reward policy, per group, with intervals.
- for the run: the win-rate matrix (every policy against every other, per group) and paired differences between
  policies in the worst group's reward and each group's reward, with intervals and whether they exclude 0.

One matrix of bootstrap counts resamples the prompts for every statistic, so every comparison is paired. The
reference's std is the scale's unit and is held fixed across resamples.
"""

from __future__ import annotations

import numpy as np

from maxmin_jax.evaluation.stats import (LEVEL, RESAMPLES, bootstrap_counts, excludes_zero, percentile_interval,
                                         resampled_means, win_rate)

REFERENCE = "reference"


def gain_shares(gains: np.ndarray) -> np.ndarray:
    """Each group's share of the gain over the reference: gain_g / sum_h |gain_h| (signed: a group that lost has a
    negative share; the absolute shares sum to 1). All zero when no group moved."""
    gains = np.asarray(gains, np.float64)
    total = np.abs(gains).sum()
    return gains / total if total > 0 else np.zeros_like(gains)


def _interval(values: np.ndarray) -> list[float]:
    return [float(v) for v in values]


def _rates(rate: np.ndarray, interval: np.ndarray, groups: list[str]) -> dict:
    return {g: {"rate": float(rate[i]), "ci": _interval(interval[i])} for i, g in enumerate(groups)}


def compare(scores: dict[str, np.ndarray], groups: list[str], *, single: dict[str, str | None] | None = None,
            resamples: int = RESAMPLES, level: float = LEVEL, seed: int = 0) -> dict:
    """Compare the policies in `scores` ({name: [N, G] per-prompt group rewards}, `"reference"` included).

    `single[name]`: the single-reward policy `name` is compared with (None: none; default: no such comparison).
    Returns {"policies": {name: fields}, "win_rates": {group: {a: {b: {rate, ci}}}}, "comparisons": {...}}.
    """
    if REFERENCE not in scores:
        raise ValueError("compare needs the reference policy's scores")
    names = list(scores)
    n = scores[REFERENCE].shape[0]
    for name, s in scores.items():
        if s.shape != (n, len(groups)):
            raise ValueError(f"{name}: scores of shape {s.shape}, expected {(n, len(groups))} (prompts, groups)")
    counts = bootstrap_counts(n, resamples, seed)
    ref = np.asarray(scores[REFERENCE], np.float64)
    scale = np.maximum(ref.std(0), 1e-6)
    # [P, N, G] standardised differences from the reference, prompt by prompt.
    diffs = np.stack([(np.asarray(scores[p], np.float64) - ref) / scale for p in names])
    point = diffs.mean(1)  # [P, G]
    boot = resampled_means(np.moveaxis(diffs, 1, 0), counts)  # [R, P, G]
    worst, worst_boot = point.min(-1), boot.min(-1)
    gap, gap_boot = point.max(-1) - worst, boot.max(-1) - worst_boot

    single = single or {}
    policies = {}
    for i, name in enumerate(names):
        entry = {"group_reward": dict(zip(groups, point[i].tolist())),
                 "group_reward_ci": {g: _interval(percentile_interval(boot[:, i, j], level))
                                     for j, g in enumerate(groups)},
                 "worst_group_reward": float(worst[i]),
                 "worst_group_reward_ci": _interval(percentile_interval(worst_boot[:, i], level)),
                 "best_worst_gap": float(gap[i]),
                 "best_worst_gap_ci": _interval(percentile_interval(gap_boot[:, i], level)),
                 "gain_share": dict(zip(groups, gain_shares(point[i]).tolist()))}
        entry["win_rate_vs_reference"] = entry["win_rate_vs_single"] = None
        if name != REFERENCE:
            entry["win_rate_vs_reference"] = _rates(*win_rate(scores[name], ref, counts, level), groups)
            baseline = single.get(name)
            entry["win_rate_vs_single"] = (_rates(*win_rate(scores[name], scores[baseline], counts, level), groups)
                                           if baseline is not None and baseline != name else None)
        policies[name] = entry

    matrix = {g: {a: {} for a in names} for g in groups}
    for a in names:
        for b in names:
            if a == b:
                continue
            rate, interval = win_rate(scores[a], scores[b], counts, level)
            for j, g in enumerate(groups):
                matrix[g][a][b] = {"rate": float(rate[j]), "ci": _interval(interval[j])}

    def differences(point_stat: np.ndarray, boot_stat: np.ndarray) -> dict:
        out: dict = {}
        for i, a in enumerate(names):
            for k in range(i + 1, len(names)):
                interval = percentile_interval(boot_stat[:, i] - boot_stat[:, k], level)
                out.setdefault(a, {})[names[k]] = {"difference": float(point_stat[i] - point_stat[k]),
                                                   "ci": _interval(interval),
                                                   "significant": excludes_zero(interval)}
        return out

    comparisons = {"worst_group_reward": differences(worst, worst_boot),
                   "group_reward": {g: differences(point[:, j], boot[:, :, j]) for j, g in enumerate(groups)}}
    return {"policies": policies, "win_rates": matrix, "comparisons": comparisons}


def single_baselines(policies: dict[str, tuple[str, str]]) -> dict[str, str | None]:
    """{policy name: the single-reward policy it is compared with} from {name: (objective, algorithm)}: the
    `single` policy trained with the same algorithm, else the first `single` policy, else None."""
    singles = {algorithm: name for name, (objective, algorithm) in policies.items() if objective == "single"}
    first = next(iter(singles.values()), None)
    return {name: singles.get(algorithm, first) for name, (_, algorithm) in policies.items()}


COMPARISON_TEST = ("paired bootstrap over the evaluation prompts: a difference is significant when its {level:.0%} "
                   "interval excludes 0")

__all__ = ["COMPARISON_TEST", "REFERENCE", "compare", "gain_shares", "single_baselines"]
