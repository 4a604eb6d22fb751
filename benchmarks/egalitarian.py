"""Diagnostics of the egalitarian objectives over the runs of a sweep (or any tree of run directories).

    python -m benchmarks.egalitarian OUT [OUT ...]

For every run (a directory with report.json and metrics, e.g. OUT/SETTING/seed-N) it prints, per policy: each
group's true reward and the worst group's (reference-standardised), the KL and response length at evaluation beside
those of the last training iteration's rollouts (the policy before its last update: a large jump means the last
update moved the policy somewhere its rollouts never went), and from the training curves: how often the
objective's group weights switched group between consecutive iterations, the learned reward of each head at the
end of training, and in how many iterations the update's KL early stop undid a step (`update_steps` below the
most any iteration kept). The run's EM line gives the ARI, the mixing weights and the clusters' group names, which say
whether a minority head exists at all.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def switch_rate(curve: list[dict]) -> float | None:
    """Share of consecutive iterations whose most-weighted group differs (maxmin's argmin flipping)."""
    weights = [np.asarray(m["group_weights"]) for m in curve if "group_weights" in m]
    if len(weights) < 2 or weights[0].size < 2:
        return None
    top = [int(np.argmax(w)) for w in weights]
    return float(np.mean([a != b for a, b in zip(top, top[1:])]))


def final_learned(curve: list[dict], last: int = 5) -> list[float] | None:
    """Each head's standardised learned reward, averaged over the last `last` iterations."""
    rows = [m["group_reward_std"] for m in curve[-last:] if "group_reward_std" in m]
    return np.mean(rows, axis=0).round(2).tolist() if rows else None


def describe(run: Path) -> str:
    report = json.loads((run / "report.json").read_text())
    em = report.get("em", {})
    lines = [f"{run}: ARI {em.get('ari')}, weights {np.round(em.get('weights', []), 3).tolist()}, "
             f"clusters {em.get('cluster_groups')}, sizes {report.get('group_sizes')}"]
    groups = report["groups"]
    for name, p in report["policies"].items():
        if name == "reference":
            continue
        curve = report.get("curves", {}).get(name, [])
        rewards = " ".join(f"{g} {p['group_reward'][g]:+.2f}" for g in groups)
        lo, hi = p.get("worst_group_reward_ci", [np.nan, np.nan])
        last = curve[-1] if curve else {}
        switches = switch_rate(curve)
        stops = [m["update_steps"] for m in curve if "update_steps" in m]
        full = max(stops, default=0)
        stopped = f"  early stops {sum(k < full for k in stops)}/{len(stops)}" if stops else ""
        lines.append(f"  {name:12s} {rewards}  worst {p['worst_group_reward']:+.2f} [{lo:+.2f}, {hi:+.2f}]  "
                     f"KL {p['kl']:5.1f} (last it. {last.get('kl', np.nan):4.1f})  "
                     f"len {p['response_length']:4.1f} (last it. {last.get('response_length', np.nan):4.1f})  "
                     f"switches {'-' if switches is None else f'{switches:.2f}'}  learned(end) {final_learned(curve)}"
                     f"{stopped}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    for root in map(Path, argv):
        for report in sorted(root.rglob("report.json")):
            if (report.parent / "metrics.jsonl").exists():  # a run, not an aggregate
                print(describe(report.parent))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
