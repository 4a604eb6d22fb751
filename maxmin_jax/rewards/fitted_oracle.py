"""The fitted oracle: which users a correctly specified reward mixture, fitted on the true groups, puts right.

A world's oracle (`SyntheticWorld.oracle_ari`) assigns each user by the true rewards themselves, which no method
that learns rewards from the labelled pairs has. The fitted oracle learns them, with everything else given: its
features are every group's true log-odds of each label (reward gap of chosen over rejected, over the labelling
temperature), so one head can be each group's labelling model exactly; its heads are fitted on the true partition
(Bradley-Terry with the world's flip rate, `linear_mixture.fit_linear_mixture`, no EM over the partition); and each
user is assigned by the heads fitted without them (leave-one-user-out), as EM's start scores users. A user it
misses is one the other users' labels do not place, however well the groups are searched for: on test lexical #0
of the zoo (32 users, 16 pairs each) it reaches ARI 0.8978 where the true rewards reach 1.0.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from maxmin_jax.data.world import true_reward_gaps
from maxmin_jax.rewards.linear_mixture import fit_linear_mixture

NEWTON_STEPS = 8  # per M-step: a logistic regression on G columns converges in fewer from zero heads


def fitted_oracle_assignments(log_odds: np.ndarray, user_index: np.ndarray, groups: np.ndarray, *,
                              flip_rate: float | None = None, l2: float = 1.0) -> np.ndarray:
    """Each user's group [U] under heads on the true log-odds, fitted on the true partition without the user.

    `log_odds` [N, G]: each pair's true log-odds of its label under each group (reward gap of chosen over rejected
    divided by the labelling temperature; a head of weight 1 on its own group's column is that group's labelling
    model); `user_index` [N]: each pair's user; `groups` [U]: each user's true group. `flip_rate`: the rate of
    labels flipped at random, the world's where known (the labelling model is then the heads' exactly), learned
    when None. `l2`: the heads' penalty, the token-feature start's default."""
    log_odds, user_index, groups = np.asarray(log_odds, np.float32), np.asarray(user_index), np.asarray(groups)
    if log_odds.ndim != 2 or len(log_odds) != len(user_index):
        raise ValueError(f"fitted_oracle_assignments: log_odds must be [N, G] for the {len(user_index)} pairs, "
                         f"got shape {log_odds.shape}")
    num_users, num_groups = len(groups), log_odds.shape[1]
    if not np.all((0 <= groups) & (groups < num_groups)) or not np.all((0 <= user_index) & (user_index < num_users)):
        raise ValueError(f"fitted_oracle_assignments: groups must be in [0, {num_groups}) and user_index in "
                         f"[0, {num_users}), got groups {sorted(set(groups.tolist()))} and user_index in "
                         f"[{user_index.min()}, {user_index.max()}]")
    truth = np.eye(num_groups, dtype=np.float32)[groups]
    # Two rounds at the true partition: the first M-step, then one more and its leave-one-user-out E-step
    fit = fit_linear_mixture(log_odds, user_index, truth[None], num_users=num_users, l2=l2, soft_iters=0,
                             hard_iters=0, newton_steps=NEWTON_STEPS, flip_rate=flip_rate)
    return np.argmax(fit.loo[0], axis=1)


def fitted_oracle_ari(world, rows: Sequence | None = None) -> float:
    """Adjusted Rand index of `fitted_oracle_assignments` for a world's rows (default: its default rows), the
    users in first-seen order; the log-odds from the world's true rewards and its `bt_temperature` (1 where it has
    none or it is 0: deterministic labels, whose scale the heads learn), its `flip_rate` where it has one."""
    from sklearn.metrics import adjusted_rand_score

    rows = world.preference_rows() if rows is None else rows
    log_odds = true_reward_gaps(world, rows) / (getattr(world, "bt_temperature", 0.0) or 1.0)
    users = {u: i for i, u in enumerate(dict.fromkeys(r.user_id for r in rows))}
    group_of = {r.user_id: list(world.group_names).index(r.group) for r in rows}
    truth = np.array([group_of[u] for u in users])
    found = fitted_oracle_assignments(log_odds, np.array([users[r.user_id] for r in rows]), truth,
                                      flip_rate=getattr(world, "flip_rate", None))
    return float(adjusted_rand_score(truth, found))


__all__ = ["fitted_oracle_ari", "fitted_oracle_assignments"]
