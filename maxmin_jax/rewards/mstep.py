"""The M-step: optimiser steps on the responsibility-weighted Bradley-Terry loss, and the guard that closes a
round.

`m_step` is one jitted, donated step on a minibatch of pairs gathered on the host: its shapes are the minibatch's
`[B, T]`, so one compiled step serves every data set, restart and round of a run (and every run with the same
model, K, B and T).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from maxmin_jax.data.batching import PairBatch
from maxmin_jax.guards import GRAD_NORM_LIMIT, LOSS_LIMIT, fault_flags
from maxmin_jax.rewards.bt import bt_loss, pairwise_accuracy
from maxmin_jax.rewards.estep import e_step_hard, e_step_soft, mixing_log_weights, mixture_log_likelihood
from maxmin_jax.rewards.model import score_pairs


@dataclasses.dataclass(frozen=True, kw_only=True)
class MStepConfig:
    """Optimiser and loss of the M-step; hashable, so the jitted step treats it as static."""

    learning_rate: float = 1e-3
    """Adam(W) step size. 1e-3 suits reward models trained from scratch or small ones; a pretrained billion-
    parameter backbone wants ~1e-5 (full fine-tuning) to ~1e-4 (LoRA)."""
    weight_decay: float = 0.0
    """Decoupled weight decay (AdamW)."""
    max_grad_norm: float | None = 1.0
    """Global-norm gradient clipping; None disables it."""
    margin: float = 0.0
    """Bradley-Terry margin used in training only (the E-step scores plain BT likelihoods)."""
    center_coef: float = 0.0
    """Weight of the reward-centring penalty mean(r^2)."""

    def __post_init__(self):
        if not self.learning_rate > 0:
            raise ValueError(f"m_step.learning_rate must be > 0, got {self.learning_rate}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"m_step.max_grad_norm must be > 0 or None, got {self.max_grad_norm}")


def make_optimizer(cfg: MStepConfig) -> optax.GradientTransformation:
    clip = [optax.clip_by_global_norm(cfg.max_grad_norm)] if cfg.max_grad_norm else []
    return optax.chain(*clip, optax.adamw(cfg.learning_rate, weight_decay=cfg.weight_decay))


def minibatch(batch: PairBatch, gamma: np.ndarray, idx: np.ndarray, sharding=None):
    """The arrays `m_step` takes for the pairs `idx`: (chosen_ids, chosen_mask, rejected_ids, rejected_mask) and
    each pair's weights [B, K] (its user's responsibilities)."""
    arrays = tuple(jax.device_put(np.asarray(getattr(batch, f))[idx], sharding)
                   for f in ("chosen_ids", "chosen_mask", "rejected_ids", "rejected_mask"))
    return arrays, jax.device_put(np.asarray(gamma, np.float32)[batch.user_index[idx]], sharding)


M_STEP_LIMITS = {"loss": LOSS_LIMIT, "grad_norm": GRAD_NORM_LIMIT}
"""What counts as a diverged M-step (`guards.fault_flags`)."""


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg"), donate_argnames=("params", "opt_state"))
def m_step(graphdef, cfg: MStepConfig, params, rest, opt_state, pairs, weights):
    """One optimiser step on `-sum_n sum_k weights[n, k] log sigmoid(margin_nk) / B` -> (params, opt, metrics);
    the metrics carry `guards.fault_flags` of the loss and the gradient norm (checked on the host each round)."""

    def loss_fn(p):
        rc, rr = score_pairs(nnx.merge(graphdef, p, rest), *pairs)
        return bt_loss(rc, rr, weights, margin=cfg.margin, center_coef=cfg.center_coef), (rc, rr)

    (loss, (rc, rr)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = make_optimizer(cfg).update(grads, opt_state, params)
    metrics = {"loss": loss, "accuracy": pairwise_accuracy(rc, rr, weights), "grad_norm": optax.tree.norm(grads)}
    return (optax.apply_updates(params, updates), opt_state,
            metrics | fault_flags(metrics, M_STEP_LIMITS))


@functools.partial(jax.jit, static_argnames=("method", "guard"))
def em_update(gamma, L_old, L_new, *, method: str, guard: bool):
    """Close a round after the reward M-step: w's exact update, the guard, the E-step and the round's statistics.

    Generalised EM guard: the new rewards are kept only if they raise sum_hk gamma_hk L_hk (the M-step objective
    on all pairs). With w's exact update this raises Q, hence the marginal (soft) or classification (hard)
    log-likelihood, so minibatch noise never makes the recorded objective go down."""
    log_w = mixing_log_weights(gamma)
    accepted = jnp.sum(gamma * L_new) >= jnp.sum(gamma * L_old) if guard else jnp.array(True)
    L = jnp.where(accepted, L_new, L_old)
    new_gamma = e_step_hard(L) if method == "hard" else e_step_soft(L, log_w)
    stats = {"log_likelihood": mixture_log_likelihood(L, log_w),
             "classification_log_likelihood": jnp.sum(jnp.max(L, axis=-1)),
             "weights": jnp.exp(log_w)}
    return accepted, L, new_gamma, stats


copy_tree = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree))  # one compiled copy per tree, not one per leaf


__all__ = ["M_STEP_LIMITS", "MStepConfig", "copy_tree", "em_update", "m_step", "make_optimizer", "minibatch"]
