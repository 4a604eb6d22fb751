"""Where EM starts, and how many groups it looks for.

- `round_robin` (the paper's code): user h starts in group h mod K. `random`: a random balanced partition.
- `features` (the default): a mixture of K linear Bradley-Terry models on token-count features of the pairs
  (`features.pair_features`), fitted by EM with a leave-one-user-out E-step from `init_restarts` k-means++
  partitions of the users' departures from the pooled preference, keeping the restart with the best
  leave-one-user-out log-likelihood (`linear_mixture`; labels flipped at a learned rate are part of its model).
  Cheap (no network is trained), and it sees what a reward model trained from scratch on a few hundred pairs
  cannot yet: which words, lengths and punctuation each user rewards.
- Choosing K (`num_groups="auto"`): the same fit for every K in a range, scored by cross-validation over users:
  each K's heads are refitted on its partition without a fold of users, and each held-out user is placed by half
  of their pairs and scored on the other half (heads moderated by their Laplace uncertainty). From the smallest
  K, the next K replaces the K chosen so far when it raises that score by more than `GAIN_STANDARD_ERRORS`
  standard errors (from the per-user gains over the chosen K); where it does not, the one after it may
  (`LOOKAHEAD`). The leave-one-user-out score of the all-user fits is optimistic for larger K (the scored user
  helped choose the partition and picks the luckiest head), so it only screens feature sets.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from maxmin_jax.rewards.bt import flipped_label_log_likelihood
from maxmin_jax.rewards.linear_mixture import fit_linear_mixture, kmeans_plus_plus, user_score_embedding


def initial_assignments(num_users: int, num_groups: int, init: str, rng: np.random.Generator) -> np.ndarray:
    """round_robin: user_index % K (the paper's code); random: a random permutation of that (balanced, every
    group non-empty when U >= K)."""
    labels = np.arange(num_users) % num_groups
    return labels if init == "round_robin" else rng.permutation(labels)


def adjusted_rand(a: np.ndarray, b: np.ndarray) -> float:
    from sklearn.metrics import adjusted_rand_score

    return float(adjusted_rand_score(a, b))


@dataclasses.dataclass
class FeatureMixture:
    """The token-feature mixture for one K: users' responsibilities, the linear heads, and its scores."""

    num_groups: int
    responsibilities: np.ndarray  # [U, K], of the best restart
    theta: np.ndarray  # [K, d] linear heads on `features`
    loo: np.ndarray  # [U, K] leave-one-user-out log-likelihoods of the best restart
    score: float  # its leave-one-user-out mixture log-likelihood
    restart_scores: list[float]
    restart_labels: np.ndarray  # [R, U]: each restart's partition, the best first
    user_scores: np.ndarray  # [U]: each user's leave-one-user-out mixture log-likelihood (for the K rule)
    flip_rate: float  # the rate of randomly flipped labels, learned (or fixed) with the best restart

    @property
    def assignments(self) -> np.ndarray:
        return np.argmax(self.responsibilities, axis=-1)

    @functools.cached_property
    def restart_agreement(self) -> float:
        """Mean ARI between the best restart's partition and each other restart's (computed when asked: a run
        fits many mixtures and reports the agreement of a few)."""
        best, *others = self.restart_labels
        return float(np.mean([adjusted_rand(best, o) for o in others])) if others else 1.0


def fit_feature_mixture(features: np.ndarray, user_index: np.ndarray, num_users: int, num_groups: int, *,
                        restarts: int, l2: float, seed: int, pad_to: int | None = None,
                        start: np.ndarray | None = None, flip_rate: float | None = None) -> FeatureMixture:
    """The linear mixture from `restarts` k-means++ partitions of the users' score embedding, all at once.
    `pad_to`: run with that many groups, the extra ones switched off (so every K shares one compiled program).
    `start`: a partition [U] (labels < num_groups) tried in place of the first k-means++ one. `flip_rate`: the
    rate of randomly flipped labels, learned when None (`linear_mixture.fit_linear_mixture`)."""
    rng = np.random.default_rng([seed, num_groups])
    width = pad_to or num_groups
    if num_groups == 1:
        labels0 = np.zeros((restarts, num_users), np.int64)
    else:
        embedding = user_score_embedding(features, user_index, num_users, l2=l2, rank=2 * num_groups)
        labels0 = np.stack([kmeans_plus_plus(embedding, num_groups, rng) for _ in range(restarts)])
    if start is not None:
        labels0[0] = start
    starts = np.eye(width, dtype=np.float32)[labels0]
    active = (np.arange(width) < num_groups).astype(np.float32)
    fit = jax.device_get(fit_linear_mixture(jnp.asarray(features), jnp.asarray(user_index), jnp.asarray(starts),
                                            num_users=num_users, l2=l2, active=active, flip_rate=flip_rate))
    gamma, loo = fit.gamma[..., :num_groups], fit.loo[..., :num_groups]
    scores = np.asarray(fit.score, np.float64)
    best = int(np.argmax(scores))
    labels = np.argmax(gamma, axis=-1)
    g = np.asarray(gamma[best], np.float64)
    log_w = np.log(np.maximum((g.sum(0) - g) / max(num_users - 1, 1), 1e-6))  # each user's prior without them
    user_scores = np.logaddexp.reduce(log_w + np.asarray(loo[best], np.float64), axis=-1)
    return FeatureMixture(num_groups, np.asarray(gamma[best]), np.asarray(fit.theta[best][:num_groups]),
                          np.asarray(loo[best]), float(scores[best]), scores.tolist(),
                          labels[np.r_[best, np.delete(np.arange(len(labels)), best)]], user_scores,
                          float(fit.flip_rate[best]))


REFIT_ROUNDS = 8
"""Hard rounds that regroup the other users when a fold of users is held out (`held_out_user_scores`)."""

GAIN_STANDARD_ERRORS = 1.5
"""num_groups="auto" adds a group while it raises the held-out users' log-likelihood by more than this many
standard errors. Chosen on 30 zoo worlds (docs/em.md): 1.0 added spurious groups on five; 1.5 and 2.0 each got
25 right, 1.5 splitting a real group in two 3-group worlds, 2.0 missing three real groups of 2 to 3 users. A
missed minority is the worse error for MaxMin, which exists to serve it."""

LOOKAHEAD = 1
"""How many larger K in a row may fail to gain over the K chosen so far before num_groups="auto" stops looking: a
poor fit at one K (its k-means++ starts all missed) then hides no group behind it. At 0 (stop at the first K that
does not gain), a 4-group world's K=3 fit gained 9 nats over K=2 and K=4 then 42, and K=2 was chosen."""


@dataclasses.dataclass
class KSelection:
    """The curve behind `num_groups="auto"`: each K's held-out-user log-likelihood (`user_folds`-fold cross-
    validation over users), each K's gain over the K chosen among the smaller ones and its standard error, the K
    chosen, and each K's mixture fitted on all users."""

    ks: list[int]
    scores: list[float]
    gains: list[float]  # scores[i] - the score of the K chosen among the smaller ones (0 for the smallest K)
    standard_errors: list[float]  # of each gain, from the per-user differences (0 for the smallest K)
    chosen: int
    fits: dict[int, FeatureMixture]
    leave_one_user_out: list[float]  # each K's leave-one-user-out score on all users
    user_scores: dict[int, np.ndarray]  # each K's score per user [U], of which `scores` are the sums

    def to_json(self) -> dict:
        return {"criterion": "log-likelihood of users held out of the token-feature mixture's fit (cross-"
                             "validation over users); from the smallest K, the next K replaces the K chosen so "
                             f"far when it gains more than {GAIN_STANDARD_ERRORS} standard errors over it, or "
                             f"the one after it does ({LOOKAHEAD} K in a row may fail)",
                "k": self.ks, "score": self.scores, "gain": self.gains, "standard_error": self.standard_errors,
                "chosen": self.chosen, "leave_one_user_out_log_likelihood": self.leave_one_user_out,
                "restart_agreement": [self.fits[k].restart_agreement for k in self.ks]}


def _predictive_margins(x_train, weights, theta, x_new, l2: float) -> np.ndarray:
    """Margins [N_new, K] of new pairs under each head's Laplace posterior: the MAP margin moderated by its
    uncertainty, m / sqrt(1 + pi v / 8), v = x H_k^-1 x (MacKay's approximation of the predictive). A head fitted on
    few users is uncertain; scored at its MAP it is overconfident, and splitting a group into two such heads then
    looks better for held-out users only because the mixture hedges between them."""
    s = 1.0 / (1.0 + np.exp(-(x_train @ theta.T)))  # [N, K]
    out = x_new @ theta.T
    for k in range(theta.shape[0]):
        h = (x_train * (weights[:, k] * s[:, k] * (1 - s[:, k]))[:, None]).T @ x_train + l2 * np.eye(x_train.shape[1])
        v = np.einsum("nd,nd->n", x_new, np.linalg.solve(h, x_new.T).T)
        out[:, k] /= np.sqrt(1.0 + np.pi * v / 8.0)
    return out


def held_out_user_scores(features, user_index, num_users, fits: dict[int, FeatureMixture], *, folds: int,
                          l2: float, seed: int) -> dict[int, np.ndarray]:
    """Per K, each user's log-likelihood [U] under the heads and weights of K's partition (`fits[K]`, on all users;
    with its flip rate) refitted without the user's fold: log sum_k w_k exp(L_hk), scored on one half of the user's
    pairs with the user placed by the other half, and the other way round (so a K cannot gain by offering more
    heads to pick from).

    The heads are refitted on the fixed partition rather than by EM per fold: a fold's EM can land in a worse
    partition at the true K than at K + 1 (one fold of a 4-group world: ARI 0.75), which made the larger K look
    better. A group that exists only for its held-out members loses its head's data when they are held out, so
    spurious groups gain little. (Folds stratified by each K's partition, which keep one member of a small group
    in training, made spurious groups pay too: they chose 4 groups on two 3-group test worlds.)"""
    ks = sorted(fits)
    width = max(ks)
    fold = np.random.default_rng([seed, 7]).permutation(num_users) % folds
    x = np.asarray(features, np.float64)
    half = np.zeros(len(user_index), np.int64)  # each user's pairs in two halves
    for u in range(num_users):
        rows = np.flatnonzero(user_index == u)
        half[rows] = np.arange(len(rows)) % 2
    out = {k: np.zeros(num_users) for k in ks}
    # Every fold and K at once, one compiled program: K's partition is one "restart" of a fit that leaves fold f's
    # users out and regroups the others by `REFIT_ROUNDS` hard rounds of their own.
    combos = [(f, k) for f in range(folds) for k in ks]
    starts = np.stack([np.eye(width, dtype=np.float32)[fits[k].assignments] for _, k in combos])
    in_fit = np.stack([(fold != f).astype(np.float32) for f, _ in combos])
    flip_rates = np.array([fits[k].flip_rate for _, k in combos], np.float32)
    fit = jax.device_get(fit_linear_mixture(features, user_index, starts, num_users=num_users, l2=l2,
                                            soft_iters=0, hard_iters=REFIT_ROUNDS, flip_rate=flip_rates,
                                            in_fit=in_fit))
    for i, (f, k) in enumerate(combos):
        held = np.flatnonzero(fold == f)
        held_rows = np.isin(user_index, held)
        gamma = np.asarray(fit.gamma[i][:, :k], np.float64) * in_fit[i][:, None]
        log_w = np.log(np.maximum(gamma[fold != f].mean(0), 1e-6))
        margins = _predictive_margins(x, gamma[user_index], np.asarray(fit.theta[i][:k], np.float64),
                                      x[held_rows], l2)
        L = np.zeros((2, num_users, k))
        np.add.at(L, (half[held_rows], user_index[held_rows]),
                  flipped_label_log_likelihood(margins, np.float64(flip_rates[i])))
        for a in (0, 1):
            placed = log_w + L[a, held]
            placed -= np.logaddexp.reduce(placed, axis=-1, keepdims=True)
            out[k][held] += np.logaddexp.reduce(placed + L[1 - a, held], axis=-1)
    return out


def paired_standard_error(a: np.ndarray, b: np.ndarray) -> float:
    """Standard error of sum(a - b) over users, from the per-user differences."""
    return float(np.sqrt(len(a)) * np.std(a - b, ddof=1)) if len(a) > 1 else 0.0


def select_num_groups(features: np.ndarray, user_index: np.ndarray, num_users: int, k_range: tuple[int, int], *,
                      restarts: int, l2: float, seed: int, user_folds: int = 0,
                      fits: dict[int, FeatureMixture] | None = None, flip_rate: float | None = 0.0) -> KSelection:
    """Fit the feature mixture for each K in `k_range` (inclusive, capped at the number of users) and choose K:
    scored by `user_folds`-fold cross-validation over users (at least 2 folds), or, with user_folds=0, by the
    leave-one-user-out score of the fits on all users (cheaper, but optimistic for larger K: a screen, not a
    choice). From the smallest K, the next K replaces the K chosen so far when it raises the score by more than
    `GAIN_STANDARD_ERRORS` standard errors of the per-user gain over it; where it does not, the one after it
    may (`LOOKAHEAD`). `fits`: the mixtures already fitted on these features with these settings (a screen's),
    reused instead of refitted. `flip_rate`: as `fit_feature_mixture`
    (each K's held-out users are scored with its fit's rate). Plain Bradley-Terry (0) by default: a rate learned
    at a K below the true one takes the groups' disagreement for label noise (K=1 on a 4-group zoo world learned
    5% flips), which shrinks the next group's gain; with learned rates the rule found the true K on 23 of 30 zoo
    worlds, without on 25 (docs/em.md)."""
    lo, hi = k_range[0], min(k_range[1], num_users)
    ks = list(range(lo, hi + 1))
    fits = fits or {}
    fits = {k: fits.get(k) or fit_feature_mixture(features, user_index, num_users, k, restarts=restarts, l2=l2,
                                                  seed=seed, pad_to=hi, flip_rate=flip_rate) for k in ks}
    if user_folds:
        per_user = held_out_user_scores(features, user_index, num_users, fits,
                                         folds=min(user_folds, num_users), l2=l2, seed=seed)
    else:
        per_user = {k: fits[k].user_scores for k in ks}
    score = {k: float(np.sum(per_user[k])) for k in ks}
    chosen, misses, gains, errors = ks[0], 0, [0.0], [0.0]
    for k in ks[1:]:  # each K against the K chosen so far; one K that does not gain (a poor fit) stops nothing
        gains.append(score[k] - score[chosen])
        errors.append(paired_standard_error(per_user[k], per_user[chosen]))
        if misses < LOOKAHEAD + 1 and gains[-1] > GAIN_STANDARD_ERRORS * errors[-1]:
            chosen, misses = k, 0
        else:
            misses += 1
    return KSelection(ks, [score[k] for k in ks], gains, errors, chosen, fits, [fits[k].score for k in ks],
                      per_user)


__all__ = ["GAIN_STANDARD_ERRORS", "LOOKAHEAD", "FeatureMixture", "KSelection", "adjusted_rand",
           "fit_feature_mixture", "held_out_user_scores", "initial_assignments", "paired_standard_error",
           "select_num_groups"]
