"""Whether each group had a reward head worth protecting it with: the check behind report.json's `group_heads`.

An egalitarian objective maximises the worst group's *learned* reward. When the head fitted to a group does not
know what the group wants (it is right on its held-out pairs about as often as a coin), raising that head's reward
does not help the group, and the group's true reward under maxmin says nothing about the objective: no objective
trained on that head could have protected it. Nor can a group be protected through a head of its own when EM gave
its users no cluster. The check flags both, per group, so a reader of the report knows which worst-group figures
the objective could not have fixed.

A head is `near_chance` when the Wilson interval of its held-out accuracy on the group's pairs (at the report's
level; ties count half) reaches down to 0.5: with few held-out pairs (a group of few users) that is so even for a
head that is right on most of them, and the report says the pairs were too few to tell.
"""

from __future__ import annotations

import math

from maxmin_jax.evaluation.stats import LEVEL

STATUSES = ("ok", "near_chance", "no_own_head", "no_heldout_pairs")


def wilson_interval(successes: float, n: int, level: float = LEVEL) -> tuple[float, float]:
    """Wilson score interval of a proportion `successes / n` (successes may be fractional: ties count half)."""
    from scipy.stats import norm

    if n < 1:
        return (math.nan, math.nan)
    z = float(norm.ppf(0.5 + level / 2))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def head_check(group: str, *, accuracy: float | None, pairs: int, users: int | None, own_head: bool,
               level: float = LEVEL) -> dict:
    """One group's entry: held-out pairs and accuracy (with its Wilson interval), whether EM gave it a head of its
    own, a status in `STATUSES` and, unless it is "ok", a sentence saying why the objective could not protect it."""
    entry = {"users": users, "heldout_pairs": pairs, "heldout_accuracy": accuracy, "accuracy_ci": None,
             "own_head": own_head}
    if not own_head:
        status = "no_own_head"
        reason = (f"EM gave no cluster of its own to {group}'s users: every objective sees this group only through a "
                  "head fitted mostly to others")
    elif accuracy is None or pairs < 1:
        status = "no_heldout_pairs"
        reason = f"no held-out pairs of {group}: whether its head learned its preference is unknown"
    else:
        lo, hi = wilson_interval(accuracy * pairs, pairs, level)
        entry["accuracy_ci"] = [lo, hi]
        status = "near_chance" if lo <= 0.5 else "ok"
        reason = None if status == "ok" else (
            f"{group}'s reward head is right on {accuracy:.0%} of its {pairs} held-out pairs ({level:.0%} interval "
            f"{lo:.0%}-{hi:.0%}, reaching chance at 50%"
            + (": too few pairs to tell" if accuracy >= 0.75 else "")
            + "): an objective trained on this head cannot be relied on to raise this group's true reward")
    return {**entry, "status": status, "reason": reason}


def group_heads(groups: list[str], *, heldout: dict | None, heldout_pairs: dict[str, int],
                users: dict[str, int] | None, cluster_groups: list[str] | None, level: float = LEVEL) -> dict:
    """`group_heads` of a report: `head_check` of every group. `heldout` is the mixture's held-out scores
    (`accuracy_by_group`), `heldout_pairs` the held-out pairs per group, `cluster_groups` the group each EM
    cluster is named after (None: every group has a head, e.g. no EM)."""
    by_group = (heldout or {}).get("accuracy_by_group") or {}
    return {g: head_check(g, accuracy=by_group.get(g), pairs=int(heldout_pairs.get(g, 0)),
                          users=None if users is None else users.get(g),
                          own_head=cluster_groups is None or g in cluster_groups, level=level)
            for g in groups}


def across_seeds(per_seed: dict[int, dict], groups: list[str]) -> dict:
    """`group_heads` of a report over seeds: each group's per-seed checks and the seeds where it was flagged."""
    out = {}
    for g in groups:
        entries = [(seed, (heads or {}).get(g)) for seed, heads in per_seed.items()]
        out[g] = {"per_seed": [e for _, e in entries],
                  "flagged_seeds": [seed for seed, e in entries if e is not None and e["status"] != "ok"]}
    return out


def flagged(report: dict) -> dict[str, str]:
    """{group: why} for the groups of a report (one run or over seeds) whose head check is not "ok"."""
    heads, seeds = report.get("group_heads") or {}, report.get("seeds")
    out = {}
    for g, entry in heads.items():
        if "per_seed" in entry:
            bad = entry["flagged_seeds"]
            if bad:
                reasons = {e["reason"] for e in entry["per_seed"] if e is not None and e["status"] != "ok"}
                out[g] = (f"seed{'s' if len(bad) > 1 else ''} {', '.join(map(str, bad))} of "
                          f"{', '.join(map(str, seeds or []))}: " + "; ".join(sorted(reasons)))
        elif entry.get("status") != "ok":
            out[g] = entry["reason"]
    return out


def summary(entry: dict | None) -> str:
    """A short cell for one group's check: "ok", "chance", "no head", "no pairs"; over seeds "chance 1/3"."""
    if entry is None:
        return "n/a"
    short = {"ok": "ok", "near_chance": "chance", "no_own_head": "no head", "no_heldout_pairs": "no pairs"}
    if "per_seed" in entry:
        checks = [e for e in entry["per_seed"] if e is not None]
        bad = [e["status"] for e in checks if e["status"] != "ok"]
        return "ok" if not bad else f"{short[max(set(bad), key=bad.count)]} {len(bad)}/{len(checks)}"
    return short[entry["status"]]


__all__ = ["STATUSES", "across_seeds", "flagged", "group_heads", "head_check", "summary", "wilson_interval"]
