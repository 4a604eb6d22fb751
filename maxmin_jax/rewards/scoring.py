"""Scoring with a fitted mixture: held-out pairs, new users, and agreement with known groups."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np
import jax
from flax import nnx
from jaxtyping import Float

from maxmin_jax.data.batching import PairBatch
from maxmin_jax.rewards.estep import (LOG_FLOOR, e_step_soft, log_likelihood_matrix, mixture_log_likelihood,
                                      pair_rewards, user_log_likelihoods)

if TYPE_CHECKING:
    from maxmin_jax.rewards.em import EMResult


def evaluate_pairs(result: EMResult, batch: PairBatch, *, chunk_size: int = 64) -> dict:
    """Score pairs under a fitted mixture. A user seen in training keeps its responsibilities as prior; a new user
    gets the mixing weights. Returns the predictive log-likelihood `sum_h log sum_k prior_hk exp(L_hk)` and the
    pairwise accuracy of each pair under its user's most likely group (per true group when the batch has them)."""
    known = {u: i for i, u in enumerate(result.user_ids)}
    prior = np.stack([result.responsibilities[known[u]] if u in known else result.weights for u in batch.user_ids])
    log_prior = np.log(np.maximum(prior, LOG_FLOOR)).astype(np.float32)
    chosen, rejected = jax.device_get(pair_rewards(result.model, batch, chunk_size=chunk_size))
    L = user_log_likelihoods(chosen, rejected, batch.user_index, batch.num_users)
    head = np.argmax(log_prior, axis=-1)[batch.user_index]  # [N]: each pair's user's group
    rows = np.arange(batch.num_pairs)
    c, r = chosen[rows, head], rejected[rows, head]
    correct = np.where(c > r, 1.0, np.where(c == r, 0.5, 0.0))
    out = {"log_likelihood": float(mixture_log_likelihood(L, log_prior)), "num_pairs": batch.num_pairs,
           "accuracy": float(correct.mean())}
    if batch.groups is not None:
        pair_group = np.asarray(batch.groups, dtype=object)[batch.user_index]
        out["accuracy_by_group"] = {g: float(correct[pair_group == g].mean()) for g in sorted(set(batch.groups))}
    return out


def assign_user(model: nnx.Module, pairs: PairBatch, weights: Float[np.ndarray, "k"], *, chunk_size: int = 64
                ) -> np.ndarray:
    """Posterior over groups [K] of one new user from a few labelled pairs: softmax(log w + sum_n log-lik)."""
    one = dataclasses.replace(pairs, user_index=np.zeros_like(pairs.user_index), user_ids=("new",), groups=None)
    L = log_likelihood_matrix(model, one, chunk_size=chunk_size)  # all pairs as one user: [1, K]
    log_w = np.log(np.maximum(np.asarray(weights, np.float32), LOG_FLOOR))
    return np.asarray(e_step_soft(L, log_w)[0])


def clustering_metrics(assignments: np.ndarray, true_groups) -> dict[str, float]:
    """Adjusted Rand index and purity (share of users in their cluster's most common true group)."""
    from sklearn.metrics import adjusted_rand_score

    truth = np.unique(np.asarray(true_groups, dtype=object).astype(str), return_inverse=True)[1]
    counts = np.zeros((int(np.max(assignments)) + 1, int(truth.max()) + 1))
    np.add.at(counts, (np.asarray(assignments), truth), 1)
    return {"ari": float(adjusted_rand_score(truth, assignments)),
            "purity": float(counts.max(axis=1).sum() / len(truth))}


__all__ = ["assign_user", "clustering_metrics", "evaluate_pairs"]
