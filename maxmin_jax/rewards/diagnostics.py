"""What a fit tells about itself: em_history.json (strict JSON, `maxmin_jax.strict_json`), warnings worth a person's attention, a PNG.

Warnings: a group with fewer than `MIN_GROUP_USERS` users (collapsed: its reward model rests on one user or none);
restarts that disagree (mean ARI between the kept partition and the others below `MIN_RESTART_AGREEMENT`: the
groups found depend on where EM started); feature sets that the start's score cannot tell from the chosen one but
that group the users otherwise (lowest ARI below `MIN_RIVAL_AGREEMENT`: the data do not settle the groups); the
chosen K at the top of the range tried; users with a single pair.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

MIN_GROUP_USERS = 2
MIN_RESTART_AGREEMENT = 0.5
MIN_RIVAL_AGREEMENT = 0.75
"""Below this ARI between the start's partition and a rival's (`start.rival_agreement`), a fit is warned about.
On 20 zoo worlds at two seeds (docs/em.md) no start that found the groups (ARI >= 0.9 with the truth) had a rival
below 0.80, and 10 of the 16 that did not had one at 0.00 to 0.74."""


def fit_warnings(result) -> list[str]:
    """Warnings about a fitted EMResult (see the module docstring); also those fit_em recorded."""
    out = list(result.diagnostics.get("warnings", []))
    sizes = np.bincount(result.assignments, minlength=result.num_groups)
    for k, n in enumerate(sizes):
        if n < MIN_GROUP_USERS and result.num_groups > 1:
            out.append(f"group {k} collapsed: {int(n)} user{'s' if n != 1 else ''} (fewer than {MIN_GROUP_USERS}); "
                       "its reward model rests on too few users. Try fewer groups or num_groups='auto'")
    for name, value in (("restart_agreement", result.diagnostics.get("restart_agreement")),
                        ("init restart_agreement", result.diagnostics.get("init", {}).get("restart_agreement"))):
        if value is not None and result.num_groups > 1 and value < MIN_RESTART_AGREEMENT:
            out.append(f"restarts disagree ({name}: mean ARI {value:.2f} between the kept partition and the other "
                       f"restarts, below {MIN_RESTART_AGREEMENT}): the groups found depend on the start; more data "
                       "per user or fewer groups would make them stable")
    rivals = result.diagnostics.get("init", {}).get("feature_set", {}).get("rivals") or {}
    if rivals.get("lowest_ari") is not None and result.num_groups > 1 and rivals["lowest_ari"] < MIN_RIVAL_AGREEMENT:
        out.append(f"the groups are uncertain: {rivals['count']} feature set(s) predict left-out users as well as the "
                   "chosen one (within one standard error) and group them differently (ARI down to "
                   f"{rivals['lowest_ari']:.2f}, below {MIN_RIVAL_AGREEMENT}); more pairs per user would settle them")
    selection = result.diagnostics.get("k_selection")
    if selection and selection["chosen"] == selection["k"][-1] and len(selection["k"]) > 1:
        out.append(f"num_groups='auto' chose K={selection['chosen']}, the largest K tried: widen k_range")
    return out


def history_document(result, config=None) -> dict:
    """Everything em_history.json holds: per-round history, the fit's diagnostics, weights, responsibilities."""
    return {
        "num_groups": result.num_groups,
        "history": result.history,
        "weights": result.weights,
        "responsibilities": {u: row for u, row in zip(result.user_ids, result.responsibilities)},
        "restart_scores": result.restart_scores,
        "best_restart": result.best_restart,
        "restart_agreement": result.diagnostics.get("restart_agreement"),
        "init": result.diagnostics.get("init"),
        "k_selection": result.diagnostics.get("k_selection"),
        "warnings": fit_warnings(result),
        "metrics": result.metrics,
        "config": dataclasses.asdict(config) if config is not None else None,
    }


def write_history(result, path: str | os.PathLike, config=None) -> Path:
    """Strict JSON, written atomically: a NaN or infinity in the fit is an error, never a number in the file."""
    from maxmin_jax.strict_json import write_json

    return write_json(path, history_document(result, config))


def plot_history(result, path: str | os.PathLike) -> Path:
    """A PNG of the fit: log-likelihoods per round (training and held-out, reward model and token features),
    group sizes, users that changed group and M-step accuracy, and the K-selection curve when K was chosen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h = result.history
    rounds = [e["round"] for e in h]
    selection = result.diagnostics.get("k_selection")
    fig, axes = plt.subplots(1, 4 if selection else 3, figsize=(18 if selection else 14, 3.8))
    ax = axes[0]
    ax.plot(rounds, [e["log_likelihood"] for e in h], "o-", label="training pairs (reward model)")
    if any("heldout_log_likelihood" in e for e in h):
        ax2 = ax.twinx()
        ax2.plot(rounds, [e.get("heldout_log_likelihood") for e in h], "s--", color="C1",
                 label="held-out (reward model)")
        if any("heldout_log_likelihood_features" in e for e in h):
            ax2.plot(rounds, [e.get("heldout_log_likelihood_features") for e in h], "^--", color="C2",
                     label="held-out (token features)")
        ax2.set_ylabel("held-out log-likelihood (nats)")
        ax2.legend(loc="lower right", fontsize=7)
    ax.set(title="log-likelihood per round", xlabel="round", ylabel="training log-likelihood (nats)")
    ax.legend(loc="upper left", fontsize=7)
    ax = axes[1]
    sizes = np.array([e["group_sizes"] for e in h])
    bottom = np.zeros(len(h))
    for k in range(sizes.shape[1]):
        ax.bar(rounds, sizes[:, k], bottom=bottom, label=f"group {k}")
        bottom += sizes[:, k]
    ax.set(title="group sizes after each round", xlabel="round", ylabel="users")
    ax.legend(fontsize=7)
    ax = axes[2]
    ax.plot(rounds, [e["changed_users"] for e in h], "o-", label="users that changed group")
    ax.set(title="changed users and M-step accuracy", xlabel="round", ylabel="users")
    ax3 = ax.twinx()
    ax3.plot(rounds, [e.get("m_step_accuracy") for e in h], "s--", color="C3", label="M-step pair accuracy")
    ax3.set(ylabel="accuracy", ylim=(0, 1))
    ax.legend(loc="upper left", fontsize=7)
    ax3.legend(loc="upper right", fontsize=7)
    if selection:
        ax = axes[3]
        # Each K's error bar: the standard error of its gain over K - 1, what the choice weighs the gain against.
        ax.errorbar(selection["k"], selection["score"], yerr=selection["standard_error"], fmt="o-", capsize=3)
        ax.axvline(selection["chosen"], color="C3", linestyle=":", label=f"chosen K = {selection['chosen']}")
        ax.set(title="choosing K", xlabel="K", ylabel="held-out users' log-likelihood (nats)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


__all__ = ["MIN_GROUP_USERS", "MIN_RESTART_AGREEMENT", "fit_warnings", "history_document", "plot_history",
           "write_history"]
