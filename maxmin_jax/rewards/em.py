"""EM over users for a mixture of K Bradley-Terry reward models (Chakraborty et al. 2024).

User h's log-likelihood under group k is `L_hk = sum_{pairs of h} log sigmoid(r_k(chosen) - r_k(rejected))`.
- E-step: all pairs scored by all K heads in one jitted pass (`lax.map` over fixed-size chunks), then a segment
  sum by user. Hard (the paper's): `z_h = argmax_k L_hk`. Soft: `gamma_hk = softmax_k(log w_k + L_hk)`.
- M-step: `steps_per_round` optimiser steps on `-sum_n sum_k gamma[user(n), k] log sigmoid(margin_nk)` over
  minibatches of pairs (one jitted step, compiled once); `w_k = mean_h gamma_hk`.
- Objective recorded per round: `sum_h logsumexp_k(log w_k + L_hk)`, the marginal log-likelihood that soft EM
  ascends. A few optimiser steps are only a generalised M-step, and minibatch noise can lower it; the guard
  (`EMConfig.guard`) undoes such a step, so the recorded objective never decreases.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jaxtyping import Array, Float, Int
from tqdm.auto import tqdm

from maxmin_jax.data.batching import PairBatch, minibatches
from maxmin_jax.rewards.bt import bt_loss, pair_log_likelihood, pairwise_accuracy
from maxmin_jax.rewards.model import score_pairs
from maxmin_jax.sharding import replicate_on_mesh_of

_LOG_FLOOR = 1e-12  # log(w) of an emptied group stays finite, so no NaN reaches the objective


@dataclasses.dataclass(frozen=True, kw_only=True)
class MStepConfig:
    """Optimiser and loss of the M-step; hashable, so the jitted step treats it as static."""

    learning_rate: float = 1e-4
    """Adam(W) step size."""
    weight_decay: float = 0.0
    """Decoupled weight decay (AdamW)."""
    max_grad_norm: float | None = 1.0
    """Global-norm gradient clipping; None disables it."""
    margin: float = 0.0
    """Bradley-Terry margin used in training only (the E-step scores plain BT likelihoods)."""
    center_coef: float = 0.0
    """Weight of the reward-centring penalty mean(r^2)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class EMConfig:
    """Everything `fit_em` needs besides the model and the data."""

    num_groups: int
    """K, the number of reward models / user groups."""
    method: Literal["hard", "soft"] = "hard"
    """hard: argmax assignment (the paper); soft: posterior responsibilities."""
    init: Literal["round_robin", "random"] = "round_robin"
    """Initial assignment: user_index % K (the paper's code) or a random balanced partition."""
    restarts: int = 1
    """Independent fits; the one with the best held-out likelihood is kept. Restarts after the first use a random
    initial assignment and fresh heads (a repeated round-robin start would only differ in minibatch order)."""
    heldout_fraction: float = 0.2
    """With restarts > 1 and no held-out batch given: fraction of each user's pairs held out to choose a restart."""
    rounds: int = 10
    """Maximum EM rounds (M-step then E-step)."""
    steps_per_round: int = 50
    """Optimiser steps per M-step."""
    batch_size: int = 32
    """Pairs per M-step minibatch."""
    chunk_size: int = 64
    """Pairs per E-step forward pass (fixed, so scoring compiles once whatever the data size)."""
    tol: float = 0.0
    """Stop once the fraction of users whose (arg-max) group changed in a round is <= tol ..."""
    patience: int = 2
    """... in this many consecutive rounds with an accepted M-step. More than one, because the M-step is inexact:
    heads keep improving after assignments stop moving, and the next round can still move users."""
    guard: bool = True
    """Undo an M-step that lowers the EM objective on the whole data (generalised EM; one extra on-device copy of
    the parameters). Makes the recorded objective non-decreasing; False trusts every M-step, as the paper does."""
    seed: int = 0
    m_step: MStepConfig = MStepConfig()
    progress: bool = True
    """tqdm progress bars for rounds and steps."""

    def __post_init__(self):
        if self.num_groups < 1:
            raise ValueError(f"num_groups must be >= 1, got {self.num_groups}")
        if self.method not in ("hard", "soft"):
            raise ValueError(f"method must be 'hard' or 'soft', got {self.method!r}")
        if self.init not in ("round_robin", "random"):
            raise ValueError(f"init must be 'round_robin' or 'random', got {self.init!r}")
        if min(self.restarts, self.rounds, self.batch_size, self.chunk_size, self.patience) < 1:
            raise ValueError("restarts, rounds, batch_size, chunk_size and patience must be >= 1")
        if self.steps_per_round < 0:
            raise ValueError(f"steps_per_round must be >= 0, got {self.steps_per_round}")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction must be in (0, 1), got {self.heldout_fraction}")


@dataclasses.dataclass
class EMResult:
    """A fitted mixture. Rows of `assignments` / `responsibilities` follow `user_ids`."""

    assignments: np.ndarray  # [U] int: argmax_k responsibilities
    responsibilities: np.ndarray  # [U, K]
    weights: np.ndarray  # [K] mixing weights w_k
    history: list[dict]  # one dict per round of the kept restart
    model: nnx.Module  # RewardModel or SeparateRewardModels, fitted
    user_ids: tuple[str, ...]
    restart_scores: list[float] = dataclasses.field(default_factory=list)  # held-out log-lik per restart
    best_restart: int = 0
    metrics: dict = dataclasses.field(default_factory=dict)  # e.g. ARI and purity when true groups are known

    def assignment_dict(self) -> dict[str, int]:
        return {u: int(k) for u, k in zip(self.user_ids, self.assignments)}


class PairArrays(NamedTuple):
    """The device-resident arrays of a PairBatch, rows padded (by wrapping around) to a multiple of the chunk size,
    so one compiled E-step and M-step serve every data set of the same bucket (e.g. each restart's split).
    Padded rows carry user index U: never sampled by the M-step, dropped by the E-step's segment sum."""

    chosen_ids: jax.Array
    chosen_mask: jax.Array
    rejected_ids: jax.Array
    rejected_mask: jax.Array
    user_index: jax.Array

    @classmethod
    def from_batch(cls, batch: PairBatch, multiple: int, sharding=None) -> PairArrays:
        if batch.num_pairs == 0:
            raise ValueError("no pairs to score")
        rows = np.resize(np.arange(batch.num_pairs), math.ceil(batch.num_pairs / multiple) * multiple)
        arrays = {f: np.asarray(getattr(batch, f))[rows] for f in cls._fields}
        arrays["user_index"][batch.num_pairs:] = batch.num_users
        return cls(**{f: jax.device_put(a, sharding) for f, a in arrays.items()})


# E-step pieces: pure functions ------------------------------------------------------------------------------
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
    return jnp.log(jnp.maximum(jnp.mean(gamma, axis=0), _LOG_FLOOR))


# Scoring all pairs by all heads -----------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("graphdef", "chunk_size"))
def _all_rewards(graphdef, states, arrays: PairArrays, chunk_size: int):
    """Rewards [N_pad, K] of both responses of every pair: `lax.map` over fixed-size chunks, so memory holds one
    chunk's activations and the whole pass is one dispatch."""
    model = nnx.merge(graphdef, *states)

    def chunk(i):
        rows = [jax.lax.dynamic_slice_in_dim(a, i * chunk_size, chunk_size) for a in arrays[:4]]
        return score_pairs(model, *rows)

    c, r = jax.lax.map(chunk, jnp.arange(arrays.user_index.shape[0] // chunk_size))
    return c.reshape(-1, c.shape[-1]), r.reshape(-1, r.shape[-1])


def pair_rewards(model: nnx.Module, batch: PairBatch, *, chunk_size: int = 64
                 ) -> tuple[Float[Array, "n k"], Float[Array, "n k"]]:
    """Rewards [N, K] of the chosen and rejected responses of every pair of `batch` (on device)."""
    graphdef, *states = nnx.split(model, nnx.Param, ...)
    chosen, rejected = _all_rewards(graphdef, tuple(states), PairArrays.from_batch(batch, chunk_size), chunk_size)
    return chosen[:batch.num_pairs], rejected[:batch.num_pairs]


def _likelihoods(split, arrays: PairArrays, num_users: int, chunk_size: int) -> Float[Array, "u k"]:
    graphdef, *states = split
    chosen, rejected = _all_rewards(graphdef, tuple(states), arrays, chunk_size)
    return user_log_likelihoods(chosen, rejected, arrays.user_index, num_users)


def log_likelihood_matrix(model: nnx.Module, batch: PairBatch, *, chunk_size: int = 64) -> Float[Array, "u k"]:
    """L [U, K] for every user of `batch` under every head of `model` (the E-step's input)."""
    return _likelihoods(nnx.split(model, nnx.Param, ...), PairArrays.from_batch(batch, chunk_size), batch.num_users,
                        chunk_size)


# M-step ---------------------------------------------------------------------------------------------------------
def make_optimizer(cfg: MStepConfig) -> optax.GradientTransformation:
    clip = [optax.clip_by_global_norm(cfg.max_grad_norm)] if cfg.max_grad_norm else []
    return optax.chain(*clip, optax.adamw(cfg.learning_rate, weight_decay=cfg.weight_decay))


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg"), donate_argnames=("params", "opt_state"))
def m_step(graphdef, cfg: MStepConfig, params, rest, opt_state, data: PairArrays, gamma, idx):
    """One optimiser step on the responsibility-weighted BT loss of the minibatch `idx` -> (params, opt, metrics).

    The whole data set is an argument (not a constant) and the minibatch is gathered on device, so the step
    compiles once per data shape and the host only sends `batch_size` indices."""
    w = gamma[data.user_index[idx]]  # [B, K]: each pair counts for each head as much as its user belongs there

    def loss_fn(p):
        rc, rr = score_pairs(nnx.merge(graphdef, p, rest), data.chosen_ids[idx], data.chosen_mask[idx],
                             data.rejected_ids[idx], data.rejected_mask[idx])
        return bt_loss(rc, rr, w, margin=cfg.margin, center_coef=cfg.center_coef), (rc, rr)

    (loss, (rc, rr)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = make_optimizer(cfg).update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, {"loss": loss, "accuracy": pairwise_accuracy(rc, rr, w)}


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
    z = jnp.argmax(new_gamma, -1)
    stats = {"log_likelihood": mixture_log_likelihood(L, log_w),
             "classification_log_likelihood": jnp.sum(jnp.max(L, axis=-1)),
             "changed_users": jnp.sum(z != jnp.argmax(gamma, -1)),
             "weights": jnp.exp(log_w),
             "group_sizes": jnp.sum(jax.nn.one_hot(z, gamma.shape[-1], dtype=jnp.int32), axis=0)}
    return accepted, L, new_gamma, stats


_copy = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree))  # one compiled copy per tree, not one per leaf shape


# The loop -------------------------------------------------------------------------------------------------------
def initial_assignments(num_users: int, num_groups: int, init: str, rng: np.random.Generator) -> np.ndarray:
    """round_robin: user_index % K (the paper's code); random: a random permutation of that (balanced, every
    group non-empty when U >= K)."""
    labels = np.arange(num_users) % num_groups
    return labels if init == "round_robin" else rng.permutation(labels)


def _fit_once(model: nnx.Module, data: PairArrays, n: int, num_users: int, cfg: EMConfig, assign0: np.ndarray,
              rng: np.random.Generator, label: str, trainable: nnx.filterlib.Filter):
    """One EM run from `assign0` on the first `n` rows of `data`; updates `model` in place;
    returns (gamma [U, K], log_w [K], history)."""
    graphdef, params, rest = nnx.split(model, trainable, ...)
    params = _copy(params)  # the step donates params; keep the caller's arrays alive
    # On a mesh, the optimiser's step count goes where m_step returns it, so the step compiles once.
    opt_state = replicate_on_mesh_of(make_optimizer(cfg.m_step).init(params), params)
    gamma = jax.device_put(np.eye(cfg.num_groups, dtype=np.float32)[assign0])
    L = (_likelihoods((graphdef, params, rest), data, num_users, cfg.chunk_size) if cfg.guard
         else jnp.zeros((num_users, cfg.num_groups)))  # the guard's reference point; unused without it
    batches = (idx for _ in iter(int, 1) for idx in minibatches(n, cfg.batch_size, rng))  # endless epochs
    history, settled = [], 0
    for r in tqdm(range(cfg.rounds), desc=f"EM {label}", disable=not cfg.progress):
        saved = _copy(params) if cfg.guard else None
        metrics = []
        for _ in tqdm(range(cfg.steps_per_round), desc="M-step", leave=False, disable=not cfg.progress):
            params, opt_state, m = m_step(graphdef, cfg.m_step, params, rest, opt_state, data, gamma,
                                          jax.device_put(next(batches)))
            metrics.append(m)
        L_new = _likelihoods((graphdef, params, rest), data, num_users, cfg.chunk_size)
        accepted, L, new_gamma, stats = em_update(gamma, L, L_new, method=cfg.method, guard=cfg.guard)
        stats, metrics, accepted = jax.device_get((stats, metrics, accepted))  # one transfer per round
        if not accepted:
            params = saved  # Adam's moments are kept: still a fair estimate of the gradient's scale
        changed = int(stats["changed_users"])
        history.append({
            "round": r + 1,
            "log_likelihood": float(stats["log_likelihood"]),
            "classification_log_likelihood": float(stats["classification_log_likelihood"]),
            "changed_users": changed,
            "changed_fraction": changed / num_users,
            "weights": [round(float(w), 6) for w in stats["weights"]],
            "group_sizes": [int(k) for k in stats["group_sizes"]],
            "m_step_accepted": bool(accepted),
            "m_step_loss": float(np.mean([m["loss"] for m in metrics])) if metrics else math.nan,
            "m_step_accuracy": float(np.mean([m["accuracy"] for m in metrics])) if metrics else math.nan,
        })
        gamma = new_gamma
        if accepted:  # a rejected step says nothing about convergence: the next round tries new minibatches
            settled = settled + 1 if changed / num_users <= cfg.tol else 0
        if settled >= cfg.patience:
            break
    nnx.update(model, params)
    return gamma, mixing_log_weights(gamma), history


def split_heldout(batch: PairBatch, fraction: float, rng: np.random.Generator) -> tuple[PairBatch, PairBatch]:
    """Hold out ~fraction of each user's pairs (each user keeps at least one training pair)."""
    train, held = [], []
    for u in range(batch.num_users):
        idx = rng.permutation(np.flatnonzero(batch.user_index == u))
        k = min(int(round(fraction * len(idx))), len(idx) - 1)
        held.append(idx[:k])
        train.append(idx[k:])
    return batch.take(np.sort(np.concatenate(train))), batch.take(np.sort(np.concatenate(held)))


def fit_em(model: nnx.Module, batch: PairBatch, config: EMConfig, *, heldout: PairBatch | None = None,
           mesh=None, trainable: nnx.filterlib.Filter = nnx.Param) -> EMResult:
    """Fit a K-group mixture by EM. `model` (RewardModel or SeparateRewardModels with K heads) is trained in place
    and returned in the result. With restarts > 1 each restart starts from the model's initial backbone; the one
    with the best predictive log-likelihood on `heldout` (default: a split of each user's pairs) is kept.

    `trainable` selects the variables the M-step trains (an nnx filter); e.g. only LoRA adapters and the heads:
    `nnx.Any(nnx.LoRAParam, nnx.PathContains("head"), nnx.PathContains("head_bias"))`. The rest stay as they are."""
    if not jax.tree.leaves(nnx.state(model, trainable)):
        raise ValueError(f"the trainable filter {trainable!r} selects no variable of the reward model")
    if model.num_groups != config.num_groups:
        raise ValueError(f"model has {model.num_groups} heads but config.num_groups={config.num_groups}")
    if batch.num_users < config.num_groups:
        raise ValueError(f"{batch.num_users} users cannot fill {config.num_groups} groups")
    rng = np.random.default_rng(config.seed)
    train = batch
    if config.restarts > 1 and heldout is None:
        train, heldout = split_heldout(batch, config.heldout_fraction, rng)
        if heldout.num_pairs == 0:
            raise ValueError("restarts > 1 need held-out pairs to compare restarts, but every user has a single "
                             "pair; pass heldout= or use restarts=1")
    sharding = None
    if mesh is not None:
        from maxmin_jax.sharding import replicated, shard_module

        shard_module(model, mesh)
        sharding = replicated(mesh)  # minibatches are gathered from it on device; XLA shards the compute
    data = PairArrays.from_batch(train, config.chunk_size, sharding)
    initial = _copy(nnx.state(model)) if config.restarts > 1 else None  # a 7B base is not copied for nothing
    best, scores = None, []
    for restart in range(config.restarts):
        if restart:
            nnx.update(model, _copy(initial))
            model.reinit_heads(jax.random.fold_in(jax.random.key(config.seed), restart))
        init = config.init if restart == 0 else "random"
        assign0 = initial_assignments(batch.num_users, config.num_groups, init, rng)
        gamma, log_w, history = _fit_once(model, data, train.num_pairs, batch.num_users, config, assign0, rng,
                                          f"restart {restart + 1}/{config.restarts}", trainable)
        gamma, log_w = jax.device_get((gamma, log_w))
        result = EMResult(assignments=np.argmax(gamma, -1), responsibilities=gamma, weights=np.exp(log_w),
                          history=history, model=model, user_ids=batch.user_ids)
        if config.restarts == 1:
            return result
        scores.append(evaluate_pairs(result, heldout, chunk_size=config.chunk_size)["log_likelihood"])
        if best is None or scores[-1] > scores[best[0]]:
            best = (restart, result, _copy(nnx.state(model)))
    restart, result, state = best
    nnx.update(model, state)
    return dataclasses.replace(result, restart_scores=scores, best_restart=restart)


def fit_single_reward(model: nnx.Module, batch: PairBatch, *, steps: int, batch_size: int = 32,
                      m_step_config: MStepConfig = MStepConfig(), seed: int = 0, progress: bool = True,
                      trainable: nnx.filterlib.Filter = nnx.Param) -> EMResult:
    """The standard-RLHF baseline: one BT reward (K = 1) on the pooled pairs, by the same machinery."""
    cfg = EMConfig(num_groups=1, rounds=1, steps_per_round=steps, batch_size=batch_size, m_step=m_step_config,
                   seed=seed, progress=progress)
    return fit_em(model, batch, cfg, trainable=trainable)


# Scoring held-out users and new users ------------------------------------------------------------------------
def evaluate_pairs(result: EMResult, batch: PairBatch, *, chunk_size: int = 64) -> dict:
    """Score pairs under a fitted mixture. A user seen in training keeps its responsibilities as prior; a new user
    gets the mixing weights. Returns the predictive log-likelihood `sum_h log sum_k prior_hk exp(L_hk)` and the
    pairwise accuracy of each pair under its user's most likely group (per true group when the batch has them)."""
    known = {u: i for i, u in enumerate(result.user_ids)}
    prior = np.stack([result.responsibilities[known[u]] if u in known else result.weights for u in batch.user_ids])
    log_prior = np.log(np.maximum(prior, _LOG_FLOOR)).astype(np.float32)
    arrays = PairArrays.from_batch(batch, chunk_size)
    graphdef, *states = nnx.split(result.model, nnx.Param, ...)
    chosen, rejected = jax.device_get(_all_rewards(graphdef, tuple(states), arrays, chunk_size))
    L = user_log_likelihoods(chosen, rejected, arrays.user_index, batch.num_users)
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


def assign_user(model: nnx.Module, pairs: PairBatch, weights: Float[Array, "k"], *, chunk_size: int = 64
                ) -> np.ndarray:
    """Posterior over groups [K] of one new user from a few labelled pairs: softmax(log w + sum_n log-lik)."""
    arrays = PairArrays.from_batch(dataclasses.replace(pairs, user_index=np.zeros_like(pairs.user_index),
                                                       user_ids=("new",), groups=None), chunk_size)
    L = _likelihoods(nnx.split(model, nnx.Param, ...), arrays, 1, chunk_size)  # all pairs as one user: [1, K]
    log_w = np.log(np.maximum(np.asarray(weights, np.float32), _LOG_FLOOR))
    return np.asarray(e_step_soft(L, log_w)[0])


def clustering_metrics(assignments: np.ndarray, true_groups) -> dict[str, float]:
    """Adjusted Rand index and purity (share of users in their cluster's most common true group)."""
    from sklearn.metrics import adjusted_rand_score

    truth = np.unique(np.asarray(true_groups, dtype=object).astype(str), return_inverse=True)[1]
    counts = np.zeros((int(np.max(assignments)) + 1, int(truth.max()) + 1))
    np.add.at(counts, (np.asarray(assignments), truth), 1)
    return {"ari": float(adjusted_rand_score(truth, assignments)),
            "purity": float(counts.max(axis=1).sum() / len(truth))}
