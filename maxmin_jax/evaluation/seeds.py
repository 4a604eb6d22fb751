"""The reports of several seeds of one config, aggregated: means with Student-t intervals across seeds, and paired
differences between policies tested across seeds.

A seed's run is a whole pipeline (world, reward models, policies, evaluation), so the spread across seeds is the
spread a reader cares about: training and data noise, not only the noise of the evaluation prompts. Within a seed
the policies share reward models, prompts and sampling keys, so a difference between two policies is paired by
seed: it is significant when the t interval of the per-seed differences excludes 0 (a paired t test at the
report's level). The aggregate keeps the schema of a single run's report (`group_reward`, `group_reward_ci`,
`win_rate_vs_reference`, `win_rates`, `comparisons`, ...), with each seed's values beside them (`per_seed`).
"""

from __future__ import annotations

import numpy as np

from maxmin_jax.evaluation.compare import gain_shares
from maxmin_jax.evaluation.heads import across_seeds
from maxmin_jax.evaluation.stats import LEVEL, excludes_zero, t_interval

SEED_TEST = ("paired t test across seeds: a difference is significant when the {level:.0%} Student-t interval of "
             "its per-seed values excludes 0")

_SCALARS = ("worst_group_reward", "best_worst_gap", "kl", "response_length")


def _mean_ci(values, level: float) -> tuple[float, list[float]]:
    mean, interval = t_interval(np.asarray(values, np.float64), level)
    return float(mean), [float(v) for v in interval]


def _rates(entries: list[dict | None], groups: list[str], level: float) -> dict | None:
    if any(e is None for e in entries):
        return None
    out = {}
    for g in groups:
        rate, interval = _mean_ci([e[g]["rate"] for e in entries], level)
        out[g] = {"rate": rate, "ci": interval, "per_seed": [e[g]["rate"] for e in entries]}
    return out


def aggregate_policy(entries: list[dict], groups: list[str], level: float = LEVEL) -> dict:
    """One policy's entries of every seed's report -> means, t intervals and per-seed values."""
    out = {k: entries[0][k] for k in ("objective", "algorithm", "iterations") if k in entries[0]}
    per_seed: dict = {"group_reward": {g: [e["group_reward"][g] for e in entries] for g in groups}}
    out["group_reward"], out["group_reward_ci"] = {}, {}
    for g in groups:
        out["group_reward"][g], out["group_reward_ci"][g] = _mean_ci(per_seed["group_reward"][g], level)
    for key in _SCALARS:
        if all(key in e for e in entries):
            per_seed[key] = [e[key] for e in entries]
            out[key], interval = _mean_ci(per_seed[key], level)
            if key in ("worst_group_reward", "best_worst_gap"):
                out[f"{key}_ci"] = interval
    out["gain_share"] = dict(zip(groups, gain_shares([out["group_reward"][g] for g in groups]).tolist()))
    for key in ("win_rate_vs_reference", "win_rate_vs_single"):
        if all(key in e for e in entries):
            out[key] = _rates([e[key] for e in entries], groups, level)
    out["per_seed"] = per_seed
    return out


def _paired(values_a: list[float], values_b: list[float], level: float) -> dict:
    difference, interval = _mean_ci(np.subtract(values_a, values_b), level)
    return {"difference": difference, "ci": interval, "significant": excludes_zero(interval),
            "per_seed": np.subtract(values_a, values_b).tolist()}


def aggregate(reports: dict[int, dict], level: float = LEVEL) -> dict:
    """Aggregate the reports of a config's seeds ({seed: report}). Policies and groups present in every report are
    aggregated, by name (groups named after EM clusters without known labels are not comparable across seeds and
    are left out, with a note)."""
    if len(reports) < 2:
        raise ValueError(f"aggregating seeds needs at least 2 reports, got {len(reports)}")
    seeds = list(reports)
    runs = [reports[s] for s in seeds]
    groups = [g for g in runs[0]["groups"] if all(g in r["groups"] for r in runs)]
    names = [n for n in runs[0]["policies"] if all(n in r["policies"] for r in runs)]
    policies = {n: aggregate_policy([r["policies"][n] for r in runs], groups, level) for n in names}

    def paired(get) -> dict:
        out: dict = {}
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                out.setdefault(a, {})[b] = _paired([get(r, a) for r in runs], [get(r, b) for r in runs], level)
        return out

    comparisons = {
        "worst_group_reward": paired(lambda r, n: r["policies"][n]["worst_group_reward"]),
        "group_reward": {g: paired(lambda r, n, g=g: r["policies"][n]["group_reward"][g]) for g in groups}}
    matrix: dict = {}
    if all("win_rates" in r for r in runs):
        for g in groups:
            matrix[g] = {}
            for a in names:
                matrix[g][a] = {}
                for b in names:
                    if a != b:
                        values = [r["win_rates"][g][a][b]["rate"] for r in runs]
                        rate, interval = _mean_ci(values, level)
                        matrix[g][a][b] = {"rate": rate, "ci": interval, "per_seed": values}
    first = runs[0]
    report = {
        "seeds": seeds,
        "groups": groups,
        "group_reward_kind": first.get("group_reward_kind"),
        "win_rate_kind": first.get("win_rate_kind"),
        "interval_kind": f"Student t over {len(seeds)} seeds (each seed a whole run), {level:.0%}",
        "group_sizes": first.get("group_sizes"),
        "group_heads": across_seeds({s: r.get("group_heads") for s, r in zip(seeds, runs)}, groups),
        "policies": policies,
        "win_rates": matrix,
        "comparisons": comparisons,
        "comparison_test": SEED_TEST.format(level=level),
        "em": {"ari": [r.get("em", {}).get("ari") for r in runs],
               "cluster_groups": [r.get("em", {}).get("cluster_groups") for r in runs],
               "heldout": [r.get("em", {}).get("heldout") for r in runs]},
        "curves": mean_curves([r.get("curves", {}) for r in runs]),
    }
    if len(groups) < len(first["groups"]):
        report["note"] = ("groups named differently across seeds (EM clusters without known labels) are left out: "
                          f"{sorted(set(first['groups']) - set(groups))}")
    return report


def mean_curves(curves: list[dict]) -> dict:
    """Per policy and iteration, the mean over seeds of every numeric metric (scalars and per-group lists)."""
    out = {}
    for name in curves[0]:
        if not all(name in c for c in curves):
            continue
        length = min(len(c[name]) for c in curves)
        rows = []
        for i in range(length):
            records = [c[name][i] for c in curves]
            row = {}
            for key, value in records[0].items():
                try:
                    row[key] = np.mean([np.asarray(r[key], np.float64) for r in records], axis=0).tolist()
                except (KeyError, TypeError, ValueError):
                    continue
            rows.append(row)
        out[name] = rows
    return out


__all__ = ["SEED_TEST", "aggregate", "aggregate_policy", "mean_curves"]
