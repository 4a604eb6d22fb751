"""Where EM starts, and how many groups it looks for.

- `round_robin` (the paper's code): user h starts in group h mod K. `random`: a random balanced partition.
- `features` (the default): a mixture of K linear Bradley-Terry models on token-count features of the pairs
  (`features.token_features`), fitted by EM with a leave-one-user-out E-step from `init_restarts` k-means++
  partitions of the users' departures from the pooled preference, keeping the restart with the best
  leave-one-user-out log-likelihood (`linear_mixture`). Cheap (no network is trained), and it sees what a reward
  model trained from scratch on a few hundred pairs cannot yet: which words, lengths and punctuation each user
  rewards.
- Choosing K (`num_groups="auto"`): the same fit for every K in a range; the leave-one-user-out log-likelihood
  (each user predicted by heads fitted without them) is an out-of-sample score, so more groups only win when they
  predict unseen users better. The smallest K within one standard error of the best is chosen (the one-standard-
  error rule; the error from the per-user differences to the best K).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

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
    restart_agreement: float  # mean ARI between the best restart's partition and each other restart's
    user_scores: np.ndarray  # [U]: each user's leave-one-user-out mixture log-likelihood (for the K rule)

    @property
    def assignments(self) -> np.ndarray:
        return np.argmax(self.responsibilities, axis=-1)


def fit_feature_mixture(features: np.ndarray, user_index: np.ndarray, num_users: int, num_groups: int, *,
                        restarts: int, l2: float, seed: int, pad_to: int | None = None) -> FeatureMixture:
    """The linear mixture from `restarts` k-means++ partitions of the users' score embedding, all at once.
    `pad_to`: run with that many groups, the extra ones switched off (so every K shares one compiled program)."""
    rng = np.random.default_rng([seed, num_groups])
    width = pad_to or num_groups
    if num_groups == 1:
        labels0 = np.zeros((restarts, num_users), np.int64)
    else:
        embedding = user_score_embedding(features, user_index, num_users, l2=l2, rank=2 * num_groups)
        labels0 = np.stack([kmeans_plus_plus(embedding, num_groups, rng) for _ in range(restarts)])
    starts = np.eye(width, dtype=np.float32)[labels0]
    active = (np.arange(width) < num_groups).astype(np.float32)
    fit = jax.device_get(fit_linear_mixture(jnp.asarray(features), jnp.asarray(user_index), jnp.asarray(starts),
                                            num_users=num_users, l2=l2, active=active))
    gamma, loo = fit.gamma[..., :num_groups], fit.loo[..., :num_groups]
    scores = np.asarray(fit.score, np.float64)
    best = int(np.argmax(scores))
    labels = np.argmax(gamma, axis=-1)
    others = [adjusted_rand(labels[best], labels[r]) for r in range(len(labels)) if r != best]
    g = np.asarray(gamma[best], np.float64)
    log_w = np.log(np.maximum((g.sum(0) - g) / max(num_users - 1, 1), 1e-6))  # each user's prior without them
    user_scores = np.logaddexp.reduce(log_w + np.asarray(loo[best], np.float64), axis=-1)
    return FeatureMixture(num_groups, np.asarray(gamma[best]), np.asarray(fit.theta[best][:num_groups]),
                          np.asarray(loo[best]), float(scores[best]), scores.tolist(),
                          float(np.mean(others)) if others else 1.0, user_scores)


@dataclasses.dataclass
class KSelection:
    """The curve behind `num_groups="auto"`: each K's leave-one-user-out log-likelihood and its standard error
    against the best K, and the K chosen by the one-standard-error rule."""

    ks: list[int]
    scores: list[float]
    standard_errors: list[float]
    chosen: int
    fits: dict[int, FeatureMixture]

    def to_json(self) -> dict:
        return {"criterion": "leave-one-user-out log-likelihood of the token-feature mixture; smallest K within "
                             "one standard error of the best",
                "k": self.ks, "score": self.scores, "standard_error": self.standard_errors, "chosen": self.chosen,
                "restart_agreement": [self.fits[k].restart_agreement for k in self.ks]}


def select_num_groups(features: np.ndarray, user_index: np.ndarray, num_users: int, k_range: tuple[int, int], *,
                      restarts: int, l2: float, seed: int) -> KSelection:
    """Fit the feature mixture for each K in `k_range` (inclusive, capped at the number of users) and choose K."""
    lo, hi = k_range[0], min(k_range[1], num_users)
    ks = list(range(lo, hi + 1))
    fits = {k: fit_feature_mixture(features, user_index, num_users, k, restarts=restarts, l2=l2, seed=seed,
                                   pad_to=hi) for k in ks}
    best = max(ks, key=lambda k: fits[k].score)
    errors = []
    for k in ks:
        diff = fits[best].user_scores - fits[k].user_scores
        errors.append(float(np.sqrt(num_users) * np.std(diff, ddof=1)) if num_users > 1 else 0.0)
    chosen = next(k for k, e in zip(ks, errors) if fits[k].score >= fits[best].score - e)
    return KSelection(ks, [fits[k].score for k in ks], errors, chosen, fits)


__all__ = ["FeatureMixture", "KSelection", "adjusted_rand", "fit_feature_mixture",
           "initial_assignments", "select_num_groups"]
