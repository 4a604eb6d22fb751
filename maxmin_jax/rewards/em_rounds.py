"""One EM run of the reward model (`run_rounds`): M-step, E-step, and who assigns the users, round by round.

Each round: `steps` optimiser steps on the responsibility-weighted BT loss (`mstep.m_step`, one jitted step), the
E-step over the training pairs (`estep`), the guard's accept/undo (`mstep.em_update`), and, with held-out pairs
and a token-feature mixture, the choice of who assigns the users this round: whichever of the reward model and
the mixture predicts the held-out pairs better. A diverged step or non-finite log-likelihood stops the run.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from maxmin_jax.data.batching import PairBatch, minibatches
from maxmin_jax.errors import NumericalFault
from maxmin_jax.guards import raise_on_fault
from maxmin_jax.rewards.bt import flipped_label_log_likelihood
from maxmin_jax.rewards.estep import LOG_FLOOR, PairChunks, chunk_log_likelihoods
from maxmin_jax.rewards.linear_mixture import fit_linear_mixture
from maxmin_jax.rewards.mstep import M_STEP_LIMITS, copy_tree, em_update, m_step, make_optimizer, minibatch
from maxmin_jax.sharding import replicate_on_mesh_of

if TYPE_CHECKING:
    from maxmin_jax.rewards.em import EMConfig


@dataclasses.dataclass
class Heldout:
    """Held-out pairs of the training users, with the token-feature mixture's view of them when there is one."""

    chunks: PairChunks
    features: np.ndarray | None  # [N_held, d]
    user_index: np.ndarray  # [N_held]


def _heldout_log_likelihood(L_held: np.ndarray, gamma: np.ndarray) -> float:
    """Predictive log-likelihood of held-out pairs, each user's responsibilities as their prior over groups."""
    log_prior = np.log(np.maximum(np.asarray(gamma, np.float64), LOG_FLOOR))
    return float(np.sum(np.logaddexp.reduce(log_prior + np.asarray(L_held, np.float64), axis=-1)))


@dataclasses.dataclass
class Features:
    """Token features of every pair (training and held-out rows of one batch) for the token-feature mixture, and
    the flip rate its start learned."""

    x: np.ndarray  # [N, d]
    user_index: np.ndarray  # [N]
    train_rows: np.ndarray
    flip_rate: float


def _linear_fit(features: Features, rows, num_users: int, gamma: np.ndarray, l2: float, hard_iters: int = 0):
    """The token-feature mixture on pairs `rows` from responsibilities `gamma` after `hard_iters` hard EM rounds,
    at the start's flip rate: (responsibilities [U, K], heads [K, d], leave-one-user-out scores [U, K])."""
    fit = fit_linear_mixture(jnp.asarray(features.x[rows]), jnp.asarray(features.user_index[rows]),
                             jnp.asarray(gamma[None], jnp.float32), num_users=num_users, l2=l2, soft_iters=0,
                             hard_iters=hard_iters, flip_rate=features.flip_rate)
    return np.asarray(fit.gamma[0]), np.asarray(fit.theta[0]), np.asarray(fit.loo[0])


def _linear_heldout_L(held: Heldout, theta: np.ndarray, num_users: int, flip_rate: float) -> np.ndarray:
    """[U, K]: the held-out pairs' log-likelihoods under the linear heads, summed by user."""
    ll = flipped_label_log_likelihood(held.features @ theta.T, flip_rate)
    out = np.zeros((num_users, theta.shape[0]))
    np.add.at(out, held.user_index, ll)
    return out


def run_rounds(model: nnx.Module, train: PairBatch, train_chunks: PairChunks, config: EMConfig, gamma0: np.ndarray,
              rng: np.random.Generator, label: str, trainable, sharding, held: Heldout | None,
              features: Features | None) -> tuple[np.ndarray, list[dict]]:
    """One EM run of the reward model from responsibilities `gamma0`; trains `model` in place; returns the final
    responsibilities [U, K] and the per-round history."""
    k, num_users = gamma0.shape[1], train.num_users
    graphdef, params, rest = nnx.split(model, trainable, ...)
    params = copy_tree(params)  # the step donates params; keep the caller's arrays alive
    # On a mesh, the optimiser's step count goes where m_step returns it, so the step compiles once.
    opt_state = replicate_on_mesh_of(make_optimizer(config.m_step).init(params), params)
    gamma = np.asarray(gamma0, np.float32)
    L = (chunk_log_likelihoods((graphdef, params, rest), train_chunks, k) if config.guard
         else jnp.zeros((num_users, k)))  # the guard's reference point; unused without it
    steps = config.steps_for(train.num_pairs)
    batches = (idx for _ in iter(int, 1) for idx in minibatches(train.num_pairs, config.batch_size, rng))
    compare = held is not None and config.assign_by == "heldout" and features is not None
    history, settled = [], 0
    for r in tqdm(range(config.rounds), desc=f"EM {label}", disable=not config.progress):
        saved = copy_tree(params) if config.guard else None
        metrics = []
        for _ in tqdm(range(steps), desc="M-step", leave=False, disable=not config.progress):
            pairs, weights = minibatch(train, gamma, next(batches), sharding)
            params, opt_state, m = m_step(graphdef, config.m_step, params, rest, opt_state, pairs, weights)
            metrics.append(m)
        L_new = chunk_log_likelihoods((graphdef, params, rest), train_chunks, k)
        accepted, L, reward_gamma, stats = em_update(jnp.asarray(gamma), L, L_new, method=config.method,
                                                     guard=config.guard)
        stats, metrics, accepted, reward_gamma, L_check = jax.device_get((stats, metrics, accepted, reward_gamma,
                                                                          L_new))
        _raise_on_fault(metrics, L_check, r, steps, label)
        if not accepted:
            params = saved  # Adam's moments are kept: still a fair estimate of the gradient's scale
        entry = {"round": r + 1, "log_likelihood": float(stats["log_likelihood"]),
                 "classification_log_likelihood": float(stats["classification_log_likelihood"]),
                 "weights": [round(float(w), 6) for w in stats["weights"]], "m_step_accepted": bool(accepted),
                 "m_step_steps": steps,
                 "m_step_loss": float(np.mean([m["loss"] for m in metrics])) if metrics else None,
                 "m_step_accuracy": float(np.mean([m["accuracy"] for m in metrics])) if metrics else None}
        new_gamma, assigned_by = np.asarray(reward_gamma), "reward_model"
        if held is not None:
            L_held = np.asarray(chunk_log_likelihoods((graphdef, params, rest), held.chunks, k))
            entry["heldout_log_likelihood"] = _heldout_log_likelihood(L_held, gamma)
            entry["heldout_pairs"] = held.chunks.num_pairs
        if compare:  # the same held-out pairs, the same priors: which model predicts them better?
            _, theta, _ = _linear_fit(features, features.train_rows, num_users, gamma, config.feature_l2)
            entry["heldout_log_likelihood_features"] = _heldout_log_likelihood(
                _linear_heldout_L(held, theta, num_users, features.flip_rate), gamma)
            if entry["heldout_log_likelihood_features"] >= entry["heldout_log_likelihood"]:
                assigned_by = "token_features"  # the mixture's leave-one-user-out EM on all pairs, from gamma
                new_gamma, _, _ = _linear_fit(features, slice(None), num_users, gamma, config.feature_l2,
                                              hard_iters=4)
        z_old, z_new = np.argmax(gamma, -1), np.argmax(new_gamma, -1)
        changed = int(np.sum(z_old != z_new))
        entry.update({"assigned_by": assigned_by, "changed_users": changed, "changed_fraction": changed / num_users,
                      "group_sizes": np.bincount(z_new, minlength=k).tolist()})
        history.append(entry)
        gamma = np.asarray(new_gamma, np.float32)
        if accepted:  # a rejected step says nothing about convergence: the next round tries new minibatches
            settled = settled + 1 if changed / num_users <= config.tol else 0
        if settled >= config.patience:
            break
    if config.guard and steps and not any(h["m_step_accepted"] for h in history):
        raise NumericalFault(
            f"fit_em ({label}): the guard rejected the M-step of every one of {len(history)} rounds (each lowered "
            "the training pairs' likelihood), so the reward model never trained; nothing is written. Usual fixes: "
            "lower m_step.learning_rate (--learning-rate), or check the data.",
            quantity="m_step_accepted", value=0, step=len(history) * steps)
    nnx.update(model, params)
    return gamma, history


_FAULT_HINT = "lower m_step.learning_rate (--learning-rate) or set m_step.max_grad_norm, or check the data"


def _raise_on_fault(metrics: list[dict], L_new: np.ndarray, round_index: int, steps: int, label: str) -> None:
    """NumericalFault at the first M-step whose loss or gradient norm diverged, or when the new rewards give a
    non-finite log-likelihood: a diverged reward model is never kept, assigned by, or written."""
    where = f"fit_em ({label}, round {round_index + 1})"
    for i, m in enumerate(metrics):
        raise_on_fault(m, where=where, step=round_index * steps + i + 1, limits=M_STEP_LIMITS, hint=_FAULT_HINT)
    if not np.all(np.isfinite(L_new)):
        raise NumericalFault(f"{where}: the users' log-likelihoods under the new rewards are not finite; the run is "
                             f"stopped and nothing is written. Usual fixes: {_FAULT_HINT}.",
                             quantity="log_likelihood", value=L_new, step=(round_index + 1) * steps)


__all__ = ["Features", "Heldout", "run_rounds"]
