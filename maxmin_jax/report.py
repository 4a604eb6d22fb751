"""Reports: report.json, a printed per-group table, and PNG plots (matplotlib, headless)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def format_table(report: dict) -> str:
    """Per-policy true group rewards on the reference-standardised scale, worst group, KL and length."""
    groups = report["groups"]
    header = ["policy", *groups, "worst", "KL", "length"]
    rows = []
    for name, p in report["policies"].items():
        rewards = p.get("group_reward", {})
        rows.append([name, *(f"{rewards.get(g, float('nan')):+.3f}" for g in groups),
                     f"{p.get('worst_group_reward', float('nan')):+.3f}", f"{p['kl']:.2f}",
                     f"{p['response_length']:.1f}"])
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).rjust(w) for c, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def plot_group_rewards(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups, policies = report["groups"], report["policies"]
    names = list(policies)
    x = np.arange(len(names))
    width = 0.8 / len(groups)
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 2, 3.6))
    for i, g in enumerate(groups):
        values = [policies[n].get("group_reward", {}).get(g, np.nan) for n in names]
        ax.bar(x + (i - (len(groups) - 1) / 2) * width, values, width,
               label=f"{g} ({report.get('group_sizes', {}).get(g, '?')} users)")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(x, names)
    ax.set_ylabel("true group reward\n(reference = 0, units of reference std)")
    ax.set_title("Per-group reward of each policy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curves(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = report.get("curves", {})
    if not curves:
        return
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for name, curve in curves.items():
        it = np.arange(1, len(curve) + 1)
        for ax, key in zip(axes, ("score", "kl", "response_length")):
            if curve and key in curve[0]:  # online policies (offline ones sample nothing while training)
                ax.plot(it, [m[key] for m in curve], label=name)
    for ax, title in zip(axes, ["objective reward (standardised)", "KL to reference", "response length"]):
        ax.set_title(title)
        ax.set_xlabel("iteration")
        if ax.has_data():
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(report: dict, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    plot_group_rewards(report, out / "group_rewards.png")
    plot_curves(report, out / "curves.png")
    (out / "table.txt").write_text(format_table(report) + "\n")
    return out
