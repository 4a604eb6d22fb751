"""Offline preference optimisation: DPO and IPO losses per pair, aggregated over user groups by the social-choice
objectives of the online path. Pure jittable functions; the trainer is `maxmin_jax.policy.offline`.

Definitions (as TRL's DPOTrainer): a response's log-ratio is log pi(y | x) - log pi_ref(y | x), the log-probs
summed over the response tokens; with d = log-ratio(chosen) - log-ratio(rejected),

    DPO (Rafailov et al. 2023):  loss = -log sigmoid(beta * d)
    IPO (Azar et al. 2023):      loss = (d_avg - 1 / (2 beta))^2, d_avg with each log-ratio divided by its
                                 response's token count (TRL's length normalisation, confirmed by the authors).

Signs. Objectives maximise utilities; these are losses. A group's utility is the negated mean loss of its pairs,
U_k = -L_k, so every objective reads the same way it does online: maxmin's worst group is the one with the HIGHEST
loss; dro's exponentiated-gradient step lambda <- lambda * exp(-eta U) = lambda * exp(eta L) moves weight to the
groups with higher loss (Group Robust Preference Optimisation, Ramesh et al. 2024); softmin's weights are
softmax(L / tau); utilitarian with the group shares as weights is plain DPO on the pooled pairs. The total loss is
sum_k w_k L_k with the weights held constant (not differentiated), as online.

Group losses from a minibatch. Pair n belongs to group k with weight w_nk (a one-hot row for hard EM assignments,
the responsibilities for soft ones); p_k = mean_n w_nk over the whole data set is group k's share of the pairs.
The minibatch estimate L_k = mean_{n in batch} (w_nk / p_k) loss_n is unbiased for group k's mean loss whatever
the minibatch's group mix, and is exactly the weighted mean over the group's pairs when the batch is the whole
data set (a group absent from a batch contributes 0, not a division by zero).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp

from maxmin_jax.errors import ConfigError
from maxmin_jax.policy.objectives import Objective, ObjectiveState
from maxmin_jax.policy.ppo import token_logprobs

if TYPE_CHECKING:  # shape annotations only; jaxtyping is not a runtime dependency
    from jaxtyping import Array, Float, Int

__all__ = [
    "PREFERENCE_LOSSES",
    "GroupAggregate",
    "aggregate_group_losses",
    "dpo_loss",
    "group_loss_estimates",
    "ipo_loss",
    "pair_losses",
    "sequence_logprobs",
]

PREFERENCE_LOSSES = ("dpo", "ipo")


def sequence_logprobs(logits: Float[Array, "n t v"], ids: Int[Array, "n t"], response_mask: Int[Array, "n t"]
                      ) -> Float[Array, "n"]:
    """log pi(response | prompt): the log-probs of the tokens where `response_mask` is 1, summed. logits[:, i]
    predicts ids[:, i + 1], so a token in column 0 (no context) cannot be scored and must not be marked."""
    logprobs = token_logprobs(logits[:, :-1], ids[:, 1:])
    return jnp.sum(logprobs * response_mask[:, 1:].astype(logprobs.dtype), axis=1)


def dpo_loss(chosen_logratio: Float[Array, "n"], rejected_logratio: Float[Array, "n"], beta: float
             ) -> Float[Array, "n"]:
    """-log sigmoid(beta * (chosen_logratio - rejected_logratio)) per pair."""
    return -jax.nn.log_sigmoid(beta * (chosen_logratio - rejected_logratio))


def ipo_loss(chosen_logratio: Float[Array, "n"], rejected_logratio: Float[Array, "n"],
             chosen_length: Float[Array, "n"], rejected_length: Float[Array, "n"], beta: float) -> Float[Array, "n"]:
    """(chosen_logratio / chosen_length - rejected_logratio / rejected_length - 1 / (2 beta))^2 per pair; lengths
    are response token counts (floored at 1)."""
    delta = chosen_logratio / jnp.maximum(chosen_length, 1.0) - rejected_logratio / jnp.maximum(rejected_length, 1.0)
    return jnp.square(delta - 1.0 / (2.0 * beta))


def pair_losses(kind: str, policy_chosen: Float[Array, "n"], policy_rejected: Float[Array, "n"],
                ref_chosen: Float[Array, "n"], ref_rejected: Float[Array, "n"], chosen_length: Float[Array, "n"],
                rejected_length: Float[Array, "n"], beta: float) -> Float[Array, "n"]:
    """The `kind` ("dpo" or "ipo") loss of each pair from summed response log-probs of policy and reference."""
    chosen, rejected = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    if kind == "dpo":
        return dpo_loss(chosen, rejected, beta)
    if kind == "ipo":
        return ipo_loss(chosen, rejected, chosen_length, rejected_length, beta)
    raise ValueError(f"unknown preference loss {kind!r}; choose one of {PREFERENCE_LOSSES}")


def group_loss_estimates(losses: Float[Array, "n"], group_weights: Float[Array, "n k"],
                         group_shares: Float[Array, "k"]) -> Float[Array, "n k"]:
    """Each pair's term of each group's loss estimate, (w_nk / p_k) loss_n: its column means are the unbiased
    minibatch estimates of the K group losses."""
    return group_weights.astype(losses.dtype) / group_shares.astype(losses.dtype) * losses[:, None]


class GroupAggregate(NamedTuple):
    loss: Float[Array, ""]  # sum_k w_k L_k, the weights held constant
    group_losses: Float[Array, "k"]  # L_k, minibatch estimates
    weights: Float[Array, "k"]  # the objective's group weights
    objective: ObjectiveState


def aggregate_group_losses(objective: Objective, losses: Float[Array, "n"], group_weights: Float[Array, "n k"],
                           group_shares: Float[Array, "k"], state: ObjectiveState) -> GroupAggregate:
    """Combine per-pair losses into one through a social-choice objective on the group utilities U_k = -L_k.

    The objective sees the [N, K] matrix of negated per-pair terms, whose column means are -L_k: exactly how it
    sees group rewards online. Its weights are constants of the gradient (for maxmin the gradient is that of the
    worst group's loss; for softmin that of the soft maximum of the losses, tau logsumexp(L / tau)).
    """
    if objective.name == "maxmin_sample":
        raise ConfigError("objective 'maxmin_sample' takes each sample's worst group; a preference pair belongs to "
                          "its user's group, so offline it has no meaning: use maxmin, softmin or dro", key="objective")
    terms = group_loss_estimates(losses, group_weights, group_shares)
    group_losses = jnp.mean(terms, axis=0)
    _, weights, state = objective.update(-jax.lax.stop_gradient(terms), state)
    weights = jax.lax.stop_gradient(weights).astype(group_losses.dtype)
    return GroupAggregate(jnp.dot(weights, group_losses), group_losses, weights, state)
