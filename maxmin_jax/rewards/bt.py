"""Bradley-Terry: P(chosen > rejected) = sigmoid(r(chosen) - r(rejected)). Pure functions on reward arrays.

Rewards are `[N]` (one model) or `[N, K]` (K models); `weights` (same shape, e.g. EM responsibilities gamma of
each pair's user) say how much each pair counts for each model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float


def pair_log_likelihood(chosen: Float[Array, "n *k"], rejected: Float[Array, "n *k"], margin: float = 0.0
                        ) -> Float[Array, "n *k"]:
    """log sigmoid(r_c - r_r - margin). A positive margin asks the chosen reward to win by at least that much
    (as in Llama 2's reward model); 0 is plain Bradley-Terry."""
    return jax.nn.log_sigmoid(chosen - rejected - margin)


def flipped_label_log_likelihood(margin: Float[Array, "..."], flip_rate: Float[Array, "..."] | float
                                 ) -> Float[Array, "..."]:
    """log P(label | reward margin) when labels are flipped at random at rate eps:
    log(eps + (1 - 2 eps) sigmoid(margin)), so a contradicted pair costs at most log(1 / eps); eps broadcasts
    against margin, and eps = 0 is plain Bradley-Terry. A numpy margin (the host's held-out scoring) is computed
    by numpy, in its precision: eager jax would compile anew for every shape of held-out pairs."""
    if isinstance(margin, np.ndarray):
        with np.errstate(divide="ignore"):  # log(0) = -inf is eps = 0's exact term
            return np.logaddexp(np.log(flip_rate), np.log1p(-2 * flip_rate) - np.logaddexp(0.0, -margin))
    return jnp.logaddexp(jnp.log(flip_rate), jnp.log1p(-2 * flip_rate) + jax.nn.log_sigmoid(margin))


def bt_loss(chosen: Float[Array, "n *k"], rejected: Float[Array, "n *k"], weights: Float[Array, "n *k"] | None = None,
            *, margin: float = 0.0, center_coef: float = 0.0) -> Float[Array, ""]:
    """Weighted negative log-likelihood per pair: `-sum(w * log_sigmoid(r_c - r_r - margin)) / N`.

    Dividing by the number of pairs N (not by sum(w)) keeps the EM M-step objective a plain average over pairs,
    since a pair's weights over the K models sum to one. `center_coef * mean(w * (r_c^2 + r_r^2) / 2)` pulls
    rewards towards 0: BT is blind to an additive offset, and this fixes it without changing the ranking.
    """
    ll = pair_log_likelihood(chosen, rejected, margin)
    w = jnp.ones_like(ll) if weights is None else weights.astype(ll.dtype)
    n = ll.shape[0]
    loss = -jnp.sum(w * ll) / n
    if center_coef:
        loss = loss + center_coef * jnp.sum(w * (chosen**2 + rejected**2) / 2) / n
    return loss


def pairwise_accuracy(chosen: Float[Array, "n *k"], rejected: Float[Array, "n *k"],
                      weights: Float[Array, "n *k"] | None = None) -> Float[Array, ""]:
    """Weighted fraction of pairs where the chosen response gets the higher reward; ties count one half."""
    correct = jnp.where(chosen > rejected, 1.0, jnp.where(chosen == rejected, 0.5, 0.0))
    w = jnp.ones_like(correct) if weights is None else weights.astype(correct.dtype)
    return jnp.sum(w * correct) / jnp.maximum(jnp.sum(w), 1e-12)
