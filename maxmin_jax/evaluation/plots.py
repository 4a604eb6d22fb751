"""The report's figures (matplotlib, headless): per-group reward with intervals, the win-rate matrix, per-group
training curves, and the sweep's minority reward and win rate against the group shares."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

REWARD_UNITS = "reward (reference = 0,\nunits of the reference's std)"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)


def _errors(values: np.ndarray, intervals: np.ndarray) -> np.ndarray | None:
    """[2, n] error-bar lengths below and above, or None where no interval is known."""
    if np.isnan(intervals).all():
        return None
    return np.nan_to_num(np.stack([values - intervals[:, 0], intervals[:, 1] - values]), nan=0.0).clip(min=0)


def plot_group_rewards(report: dict, path: Path) -> None:
    """Grouped bars: each policy's reward per group, with its interval; the worst group's reward as a marker."""
    plt = _pyplot()
    groups, policies = report["groups"], report["policies"]
    names = list(policies)
    x = np.arange(len(names))
    width = 0.8 / len(groups)
    sizes = report.get("group_sizes") or {}
    fig, ax = plt.subplots(figsize=(1.7 * len(names) + 2.5, 4.0))
    for i, g in enumerate(groups):
        values = np.array([policies[n].get("group_reward", {}).get(g, np.nan) for n in names], float)
        intervals = np.array([(policies[n].get("group_reward_ci") or {}).get(g, [np.nan, np.nan]) for n in names],
                             float)
        ax.bar(x + (i - (len(groups) - 1) / 2) * width, values, width, yerr=_errors(values, intervals), capsize=3,
               label=f"{g} ({sizes.get(g, '?')} users)")
    worst = [policies[n].get("worst_group_reward", np.nan) for n in names]
    ax.scatter(x, worst, marker="_", s=900, color="black", zorder=3, label="worst group")
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xticks(x, names)
    ax.set_ylabel(REWARD_UNITS)
    kind = (report.get("group_reward_kind") or "").split(":")[0]
    ax.set_title(f"Per-group {kind} reward of each policy\n(bars: {report.get('interval_kind', 'intervals')})",
                 fontsize=10)
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_win_rates(report: dict, path: Path) -> None:
    """One heatmap per group: the share of prompts on which the group prefers the row policy's response over the
    column policy's (ties count half)."""
    matrix = report.get("win_rates") or {}
    if not matrix:
        return
    plt = _pyplot()
    groups = [g for g in report["groups"] if g in matrix]
    names = list(report["policies"])
    fig, axes = plt.subplots(1, len(groups), figsize=(1.1 * len(names) * len(groups) + 2.5, 1.0 * len(names) + 1.6),
                             squeeze=False, layout="constrained")
    for ax, g in zip(axes[0], groups):
        rates = np.array([[0.5 if a == b else matrix[g].get(a, {}).get(b, {}).get("rate", np.nan) for b in names]
                          for a in names])
        image = ax.imshow(rates, vmin=0, vmax=1, cmap="RdBu")
        for i in range(len(names)):
            for j in range(len(names)):
                if i != j:
                    ax.text(j, i, f"{rates[i, j]:.2f}", ha="center", va="center", fontsize=8,
                            color="white" if abs(rates[i, j] - 0.5) > 0.3 else "black")
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_yticks(range(len(names)), names)
        ax.set_xlabel("against")
        ax.set_title(f"group {g}: P(row preferred)", fontsize=10)
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="win rate (ties count half)")
    fig.suptitle("Win-rate matrix", fontsize=11)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curves(report: dict, path: Path) -> None:
    """Training curves: each reward head's standardised reward per iteration (one panel per group; the single
    reward's policy has one head and appears in the objective panel only), the objective's score and KL."""
    curves = report.get("curves") or {}
    if not curves:
        return
    plt = _pyplot()
    heads = (report.get("em") or {}).get("cluster_groups") or []
    heads = heads[0] if heads and isinstance(heads[0], list) else heads  # aggregates keep one list per seed
    panels = [*(f"head: {h}" for h in heads), "objective score", "KL to reference"]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.6), squeeze=False)
    axes = axes[0]
    for index, (name, curve) in enumerate(curves.items()):
        if not curve:
            continue
        style = {"label": name, "color": f"C{index}"}  # one colour per policy in every panel
        it = np.arange(1, len(curve) + 1)
        per_group = np.array([np.atleast_1d(m.get("group_reward_std", np.nan)) for m in curve], float)
        if per_group.shape[1] == len(heads) and heads:
            for k in range(len(heads)):
                axes[k].plot(it, per_group[:, k], **style)
        axes[-2].plot(it, [m.get("score", np.nan) for m in curve], **style)
        axes[-1].plot(it, [m.get("kl", np.nan) for m in curve], **style)
    for ax, title in zip(axes, panels):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("policy iteration")
        ax.legend(fontsize=8)
    for ax in axes[:-1]:
        ax.set_ylabel("learned reward (reference = 0,\nunits of the reference's std)", fontsize=8)
    axes[-1].set_ylabel("nats per response", fontsize=8)
    fig.suptitle("Training curves (learned rewards on each iteration's rollouts)", fontsize=11)
    _save(fig, path)


def _ratio(entry: dict) -> float:
    sizes = entry.get("group_sizes") or {}
    return sizes.get(entry["majority"], math.nan) / max(sizes.get(entry["minority"], math.nan), 1)


def plot_sweep(sweep: dict, path: Path) -> None:
    """Minority reward and minority win rate (against the reference) of each policy against the majority:minority
    ratio (when the sweep's first key sets a share or the group sizes; else against that key's values, in order when
    they are not numbers), one line per policy and setting of the other keys, with intervals."""
    plt = _pyplot()
    settings = sweep["settings"]
    if not settings:
        return
    first, others = sweep["keys"][0], sweep["keys"][1:]
    by_share = first.endswith(("share", "group_sizes"))
    values = list(dict.fromkeys(str(e["setting"][first]) for e in settings))
    numeric = all(isinstance(e["setting"][first], (int, float)) for e in settings)
    position = (lambda e: _ratio(e)) if by_share else (  # noqa: E731
        (lambda e: e["setting"][first]) if numeric else (lambda e: values.index(str(e["setting"][first]))))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    lines: dict = {}
    means: dict = {}
    for entry in settings:
        label_rest = ", ".join(f"{k.rsplit('.', 1)[-1]}={entry['setting'][k]}" for k in others)
        for policy, p in entry["policies"].items():
            if policy == "reference":
                continue
            lines.setdefault((policy, label_rest), []).append((entry, p))
    for (policy, rest), points in lines.items():
        points.sort(key=lambda ep: position(ep[0]))
        x = np.array([position(e) for e, _ in points], float)
        label = f"{policy}" + (f" ({rest})" if rest else "")
        minority = [e["minority"] for e, _ in points]
        reward = np.array([p["group_reward"][g] for (_, p), g in zip(points, minority)], float)
        reward_ci = np.array([p.get("group_reward_ci", {}).get(g, [np.nan] * 2) for (_, p), g in zip(points, minority)],
                             float)
        win = [(p.get("win_rate_vs_reference") or {}).get(g) for (_, p), g in zip(points, minority)]
        rate = np.array([w["rate"] if w else np.nan for w in win], float)
        rate_ci = np.array([w["ci"] if w else [np.nan] * 2 for w in win], float)
        worst = np.array([p.get("worst_group_reward", np.nan) for _, p in points], float)
        worst_ci = np.array([p.get("worst_group_reward_ci", [np.nan] * 2) for _, p in points], float)
        rate_ci = rate_ci.clip(0.0, 1.0)  # a t interval over few seeds can reach past the possible rates
        for ax, y, ci in ((axes[0], reward, reward_ci), (axes[1], rate, rate_ci), (axes[2], worst, worst_ci)):
            ax.errorbar(x, y, yerr=_errors(y, ci), marker="o", capsize=3, label=label)
            means.setdefault(ax, []).extend(y[np.isfinite(y)].tolist())
    titles = ("Minority group's reward", "Minority group's win rate vs the reference", "Worst group's reward")
    ylabels = (REWARD_UNITS, "share of prompts preferred\n(ties count half)", REWARD_UNITS)
    for ax, title, ylabel in zip(axes, titles, ylabels):
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(ylabel, fontsize=9)
        if by_share:
            ax.set_xscale("log")
            ax.set_xlabel("majority : minority users (log scale)")
        else:
            ax.set_xlabel(first)
            if not numeric:
                ax.set_xticks(range(len(values)), values)
        ax.legend(fontsize=7)
    # Keep the means readable when intervals are wide (few seeds): the axes span the means and a margin, and wider
    # intervals run off the edge.
    for ax in (axes[0], axes[2]):
        if means.get(ax):
            lo, hi = min(means[ax]), max(means[ax])
            ax.set_ylim(max(ax.get_ylim()[0], lo - 1.0), min(ax.get_ylim()[1], hi + 1.0))
    axes[1].set_ylim(0.0, 1.0)
    axes[0].axhline(0, color="grey", linewidth=0.8)
    axes[1].axhline(0.5, color="grey", linewidth=0.8)
    axes[2].axhline(0, color="grey", linewidth=0.8)
    fig.suptitle(f"Sweep ({sweep.get('interval_kind', '')})", fontsize=11)
    _save(fig, path)


__all__ = ["plot_curves", "plot_group_rewards", "plot_sweep", "plot_win_rates"]
