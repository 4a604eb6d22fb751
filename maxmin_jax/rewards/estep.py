"""The E-step: every pair scored by every head, summed by user, turned into responsibilities.

User h's log-likelihood under group k is `L_hk = sum_{pairs of h} log sigmoid(r_k(chosen) - r_k(rejected))`.
Hard (the paper's): `z_h = argmax_k L_hk`. Soft: `gamma_hk = softmax_k(log w_k + L_hk)`.

Scoring runs over fixed-size chunks of pairs placed on the device once (`PairChunks`), one jitted call per chunk,
so one compiled program serves every data set of the same sequence length: the training pairs, the held-out
pairs, a new user's pairs, each round, each restart.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int

from maxmin_jax.data.batching import PairBatch
from maxmin_jax.rewards.bt import pair_log_likelihood
from maxmin_jax.rewards.model import score_pairs

LOG_FLOOR = 1e-12  # log(w) of an emptied group stays finite, so no NaN reaches the objective


# Responsibilities: pure functions ------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames="num_users")
def user_log_likelihoods(chosen: Float[Array, "n k"], rejected: Float[Array, "n k"], user_index: Int[Array, "n"],
                         num_users: int) -> Float[Array, "u k"]:
    """L [U, K]: per-pair BT log-likelihoods summed by user (rows with user index outside [0, U) are dropped)."""
    return jax.ops.segment_sum(pair_log_likelihood(chosen, rejected), user_index, num_segments=num_users)


@jax.jit
def e_step_hard(L: Float[Array, "u k"]) -> Float[Array, "u k"]:
    """One-hot responsibilities of argmax_k L_hk (the paper's hard assignment; ignores w)."""
    return jax.nn.one_hot(jnp.argmax(L, axis=-1), L.shape[-1], dtype=jnp.float32)


@jax.jit
def e_step_soft(L: Float[Array, "u k"], log_w: Float[Array, "k"]) -> Float[Array, "u k"]:
    """Posterior responsibilities gamma_hk = softmax_k(log w_k + L_hk)."""
    return jax.nn.softmax(log_w + L, axis=-1)


@jax.jit
def mixture_log_likelihood(L: Float[Array, "u k"], log_w: Float[Array, "k"]) -> Float[Array, ""]:
    """sum_h logsumexp_k(log w_k + L_hk): the marginal log-likelihood soft EM ascends."""
    return jnp.sum(jax.nn.logsumexp(log_w + L, axis=-1))


def mixing_log_weights(gamma: Float[Array, "u k"]) -> Float[Array, "k"]:
    """log w_k = log mean_h gamma_hk, the exact M-step for the weights."""
    return jnp.log(jnp.maximum(jnp.mean(gamma, axis=0), LOG_FLOOR))


# Scoring all pairs by all heads ----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PairChunks:
    """A PairBatch on the device in chunks of `chunk_size` pairs (the last one padded by repeating pairs).

    `user_index` [N_pad] (host) gives each row's user; padded rows carry user index U, so segment sums drop them."""

    chunks: tuple[tuple[jax.Array, ...], ...]  # per chunk: chosen_ids, chosen_mask, rejected_ids, rejected_mask
    chunk_users: tuple[jax.Array, ...]  # per chunk: user index of each row
    user_index: np.ndarray
    num_pairs: int
    num_users: int
    chunk_size: int

    @classmethod
    def from_batch(cls, batch: PairBatch, chunk_size: int, sharding=None) -> PairChunks:
        if batch.num_pairs == 0:
            raise ValueError("no pairs to score")
        rows = np.resize(np.arange(batch.num_pairs), math.ceil(batch.num_pairs / chunk_size) * chunk_size)
        fields = [np.asarray(getattr(batch, f))[rows] for f in ("chosen_ids", "chosen_mask", "rejected_ids",
                                                                  "rejected_mask")]
        chunks = tuple(tuple(jax.device_put(a[i:i + chunk_size], sharding) for a in fields)
                       for i in range(0, len(rows), chunk_size))
        user_index = np.asarray(batch.user_index, np.int32)[rows]
        user_index[batch.num_pairs:] = batch.num_users
        chunk_users = tuple(jax.device_put(user_index[i:i + chunk_size], sharding)
                            for i in range(0, len(rows), chunk_size))
        return cls(chunks, chunk_users, user_index, batch.num_pairs, batch.num_users, chunk_size)


@functools.partial(jax.jit, static_argnames="graphdef")
def _score_chunk(graphdef, states, chosen_ids, chosen_mask, rejected_ids, rejected_mask):
    return score_pairs(nnx.merge(graphdef, *states), chosen_ids, chosen_mask, rejected_ids, rejected_mask)


@functools.partial(jax.jit, static_argnames=("graphdef", "num_users"), donate_argnames="L")
def _accumulate_chunk(graphdef, states, L, chunk, user_index, num_users: int):
    """L + this chunk's per-user log-likelihoods: the forward pass and the segment sum in one program."""
    chosen, rejected = score_pairs(nnx.merge(graphdef, *states), *chunk)
    return L + jax.ops.segment_sum(pair_log_likelihood(chosen, rejected), user_index, num_segments=num_users)


def score_chunks(split, data: PairChunks) -> tuple[jax.Array, jax.Array]:
    """Rewards [N_pad, K] of the chosen and rejected response of every row of `data`, on the device.
    `split` is `nnx.split(model, ...)`: (graphdef, *states)."""
    graphdef, *states = split
    out = [_score_chunk(graphdef, tuple(states), *chunk) for chunk in data.chunks]
    return jnp.concatenate([c for c, _ in out]), jnp.concatenate([r for _, r in out])


def chunk_log_likelihoods(split, data: PairChunks, num_groups: int) -> Float[Array, "u k"]:
    """L [U, K] of every user of `data` under every head of the split model: one compiled program per model
    and chunk shape, whatever the number of pairs."""
    graphdef, *states = split
    L = jnp.zeros((data.num_users, num_groups), jnp.float32)
    for chunk, users in zip(data.chunks, data.chunk_users):
        L = _accumulate_chunk(graphdef, tuple(states), L, chunk, users, data.num_users)
    return L


def pair_rewards(model: nnx.Module, batch: PairBatch, *, chunk_size: int = 64
                 ) -> tuple[Float[Array, "n k"], Float[Array, "n k"]]:
    """Rewards [N, K] of the chosen and rejected responses of every pair of `batch` (on device)."""
    chosen, rejected = score_chunks(nnx.split(model, nnx.Param, ...), PairChunks.from_batch(batch, chunk_size))
    return chosen[:batch.num_pairs], rejected[:batch.num_pairs]


def log_likelihood_matrix(model: nnx.Module, batch: PairBatch, *, chunk_size: int = 64) -> Float[Array, "u k"]:
    """L [U, K] for every user of `batch` under every head of `model` (the E-step's input)."""
    return chunk_log_likelihoods(nnx.split(model, nnx.Param, ...), PairChunks.from_batch(batch, chunk_size),
                                 model.num_groups)


__all__ = ["LOG_FLOOR", "PairChunks", "chunk_log_likelihoods", "e_step_hard", "e_step_soft",
           "log_likelihood_matrix", "mixing_log_weights", "mixture_log_likelihood", "pair_rewards", "score_chunks",
           "user_log_likelihoods"]
