"""table.txt: the report as plain-text tables (group rewards with intervals, then win rates)."""

from __future__ import annotations

import math

from maxmin_jax.evaluation.heads import flagged
from maxmin_jax.evaluation.heads import summary as head_summary

NAN = float("nan")


def _signed(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:+.2f}"


def _with_interval(value, interval) -> str:
    if interval is None or any(v is None or math.isnan(v) for v in interval):
        return _signed(value)
    return f"{_signed(value)} [{_signed(interval[0])}, {_signed(interval[1])}]"


def _rate(entry) -> str:
    if entry is None:
        return "-"
    lo, hi = entry["ci"]
    if any(v is None or math.isnan(v) for v in (lo, hi)):
        return f"{entry['rate']:.2f}"
    return f"{entry['rate']:.2f} [{lo:.2f}, {hi:.2f}]"


def _grid(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).rjust(w) for c, w in zip(r, widths))  # noqa: E731
    return [line(header), line(["-" * w for w in widths]), *map(line, rows)]


def best_marks(report: dict) -> dict[str, str]:
    """Marks of the worst-group column: "*" the policy with the highest worst-group reward, "=" a policy whose
    difference from it is not significant (the report's `comparison_test`), "" the rest."""
    policies = report["policies"]
    names = [n for n in policies if n != "reference"] or list(policies)
    best = max(names, key=lambda n: policies[n].get("worst_group_reward", -math.inf))
    comparisons = report.get("comparisons", {}).get("worst_group_reward", {})
    marks = {}
    for name in policies:
        if name == best:
            marks[name] = "*"
            continue
        pair = comparisons.get(best, {}).get(name) or comparisons.get(name, {}).get(best)
        marks[name] = "=" if pair is not None and not pair["significant"] else ""
    return marks


def format_table(report: dict) -> str:
    """Per policy: each group's reward (reference-standardised) and the worst group's, with intervals, KL and
    response length; then each group's win rate against the reference and against the single-reward policy."""
    groups, policies = report["groups"], report["policies"]
    marks = best_marks(report)
    header = ["policy", *groups, "worst", "gap", "KL", "length"]
    rows = []
    for name, p in policies.items():
        rewards, intervals = p.get("group_reward", {}), p.get("group_reward_ci", {})
        rows.append([name, *(_with_interval(rewards.get(g, NAN), intervals.get(g)) for g in groups),
                     _with_interval(p.get("worst_group_reward", NAN), p.get("worst_group_reward_ci")) + marks[name],
                     _signed(p.get("best_worst_gap")), f"{p.get('kl', NAN):.2f}",
                     f"{p.get('response_length', NAN):.1f}"])
    lines = [f"Group reward (reference = 0, units of the reference's std); {report.get('interval_kind', '')}",
             *_grid(header, rows),
             "worst: * highest; = not significantly different from it (" + report.get("comparison_test", "") + ")"]
    for group, why in flagged(report).items():  # groups no objective could have protected (docs/report.md)
        lines.append(f"! {group}: {why}")
    if any(p.get("win_rate_vs_reference") for p in policies.values()):
        header = ["policy", *(f"{g} vs ref" for g in groups), *(f"{g} vs single" for g in groups)]
        rows = [[name, *(_rate((p.get("win_rate_vs_reference") or {}).get(g)) for g in groups),
                 *(_rate((p.get("win_rate_vs_single") or {}).get(g)) for g in groups)]
                for name, p in policies.items() if name != "reference"]
        lines += ["", "Win rate: share of prompts on which the group prefers the policy's response (ties count half)",
                  *_grid(header, rows)]
    return "\n".join(lines)


def format_sweep(sweep: dict) -> str:
    """One row per setting: group sizes, EM's ARI, and each policy's minority reward, worst-group reward and
    minority win rate against the reference."""
    settings = sweep["settings"]
    policies = [p for p in (settings[0]["policies"] if settings else {}) if p != "reference"]
    header = ["setting", "sizes", "ARI", "minority acc.", "minority head", *(f"{p} minority" for p in policies),
              *(f"{p} worst" for p in policies), *(f"{p} win" for p in policies)]
    rows = []
    for entry in settings:
        minority, sizes = entry["minority"], entry.get("group_sizes") or {}
        ari = entry.get("em_ari")
        ari = ari if not isinstance(ari, list) else (sum(a for a in ari if a is not None) / len(ari) if ari else None)
        p, head = entry["policies"], (entry.get("group_heads") or {}).get(minority)
        accuracy = entry.get("heldout_accuracy") or {}
        accuracy = "/".join("n/a" if minority not in accuracy.get(m, {}) else f"{accuracy[m][minority]:.2f}"
                            for m in ("single", "mixture"))
        rows.append([entry["directory"], ":".join(str(sizes.get(g, "?")) for g in entry["groups"]),
                     "n/a" if ari is None else f"{ari:.2f}", accuracy, head_summary(head),
                     *(_signed(p[n]["group_reward"][minority]) for n in policies),
                     *(_signed(p[n].get("worst_group_reward")) for n in policies),
                     *(f"{p[n]['win_rate_vs_reference'][minority]['rate']:.2f}"
                       if p[n].get("win_rate_vs_reference") else "-" for n in policies)])
    return "\n".join([f"Sweep over {', '.join(sweep['keys'])}: rewards in reference stds, win rate vs the "
                      "reference (minority: the group smallest in most settings); minority acc.: the single reward's "
                      "and the mixture's accuracy on the minority's held-out pairs; minority head: whether its reward "
                      "head beat chance on them (docs/report.md)", *_grid(header, rows)])


__all__ = ["best_marks", "format_sweep", "format_table"]
