"""EM over users for a mixture of K Bradley-Terry reward models (Chakraborty et al. 2024), and its defaults.

The loop (`fit_em`), each round: an M-step of optimiser steps on the responsibility-weighted BT loss
(`mstep.m_step`, one jitted step), then an E-step scoring every pair by every head (`estep`) and updating each
user's responsibilities. Objective recorded per round: `sum_h logsumexp_k(log w_k + L_hk)`. A few optimiser steps
are only a generalised M-step and minibatch noise can lower it; the guard (`EMConfig.guard`) undoes such a step.

What the defaults add to the paper's loop (measured on the world zoo, `docs/em.md`):
- init="features": start from a mixture of linear BT models on token-count features, fitted with a leave-one-
  user-out E-step from many k-means++ starts (`init`). A reward model trained from scratch on a few hundred pairs
  predicts unseen pairs barely better than chance, so its first E-steps move users by noise, and once it has
  memorised its members every partition looks self-consistent: EM stays wherever it starts.
- assign_by="heldout": a share of each user's pairs is held out; after each M-step, users are assigned by
  whichever model predicts those held-out pairs better: the reward model (its E-step) or the token-feature mixture
  (its leave-one-user-out E-step). A strong pretrained backbone takes over; a weak one cannot scramble the groups.
- num_groups="auto": K chosen by cross-validation over users of the token-feature mixture (`init`).
- Optimiser steps per round scaled to the data (`epochs_per_round`).
The paper's setting, `EMConfig.paper(K)`: hard EM from a round-robin start, the reward model's E-step, fixed
rounds and steps.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Float
from tqdm.auto import tqdm

from maxmin_jax.data.batching import PairBatch, minibatches
from maxmin_jax.errors import ConfigError, DataError, NumericalFault
from maxmin_jax.guards import raise_on_fault
from maxmin_jax.rewards.estep import (LOG_FLOOR, PairChunks, chunk_log_likelihoods, e_step_soft,
                                      log_likelihood_matrix, mixing_log_weights, mixture_log_likelihood,
                                      pair_rewards, score_chunks, user_log_likelihoods)
from maxmin_jax.rewards.init import (FeatureMixture, adjusted_rand, fit_feature_mixture,
                                     initial_assignments, select_num_groups)
from maxmin_jax.rewards.features import batch_word_clusters, pair_features
from maxmin_jax.rewards.linear_mixture import fit_linear_mixture
from maxmin_jax.rewards.mstep import M_STEP_LIMITS, MStepConfig, copy_tree, em_update, m_step, make_optimizer, minibatch
from maxmin_jax.sharding import replicate_on_mesh_of
from maxmin_jax import validate

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class EMConfig:
    """Everything `fit_em` needs besides the model and the data. The defaults are this library's; `paper(K)`
    gives the paper's setting."""

    num_groups: int | Literal["auto"]
    """K, the number of reward models / user groups; "auto" chooses it in `k_range` (module docstring)."""
    k_range: tuple[int, int] = (1, 6)
    """Smallest and largest K tried by num_groups="auto" (the largest is capped at the number of users)."""
    user_folds: int = 5
    """num_groups="auto": folds of the cross-validation over users that scores each K (users held out of the fit
    are predicted by the others' mixture; the smallest K within one standard error of the best is chosen)."""
    method: Literal["hard", "soft"] = "hard"
    """The reward model's E-step: hard (argmax assignment, the paper) or soft (posterior responsibilities)."""
    init: Literal["features", "round_robin", "random"] = "features"
    """Initial assignment: the token-feature mixture (default), user_index % K (the paper's code), or a random
    balanced partition."""
    assign_by: Literal["heldout", "reward_model"] = "heldout"
    """Who assigns users after each M-step: "heldout" (the model, reward model or token-feature mixture, that
    predicts the held-out pairs better; needs init="features") or "reward_model" (always its E-step, the paper)."""
    restarts: int = 1
    """Independent fits of the reward model; the one with the best held-out likelihood is kept. Restarts after
    the first start from the token-feature mixture of another seed (init="features") or a random partition."""
    init_restarts: int = 8
    """k-means++ starts of the token-feature mixture, fitted at once; the best leave-one-user-out one is kept."""
    feature_clusters: tuple[int, ...] = (8, 16)
    """Numbers of word clusters (by co-occurrence) whose counts are token features (`features.pair_features`);
    each is tried and the one whose mixture predicts left-out users best is kept."""
    feature_tokens: tuple[int, ...] = (0, 16)
    """Numbers of most frequent tokens that are token features on their own, tried the same way: 0 (clusters and
    length only) wins where single tokens are noise, 16 where punctuation or function words tell groups apart."""
    feature_seeds: int = 3
    """Word clusterings (k-means seeds) tried for the chosen feature set; the one whose mixture predicts left-out
    users best is kept (the clustering of a small vocabulary varies with the seed)."""
    prompt_features: Literal["auto", "on", "off"] = "auto"
    """Add prompt-relevance features (does the response use the prompt's word clusters; does the prompt change
    the preferred length)? "auto": only when they raise the leave-one-user-out log-likelihood."""
    feature_l2: float = 3.0
    """L2 penalty of the token-feature mixture's linear heads."""
    heldout_fraction: float = 0.2
    """Share of each user's pairs held out (users with one pair keep it for training) when assign_by="heldout"
    or restarts > 1 need held-out pairs and none are given."""
    rounds: int = 3
    """Maximum EM rounds (M-step then E-step)."""
    epochs_per_round: float = 2.0
    """Optimiser steps per M-step as passes over the training pairs (used unless steps_per_round is set)."""
    steps_per_round: int | None = None
    """Optimiser steps per M-step; None: ceil(epochs_per_round * pairs / batch_size)."""
    batch_size: int = 32
    """Pairs per M-step minibatch."""
    chunk_size: int = 64
    """Pairs per E-step forward pass (fixed, so scoring compiles once whatever the data size)."""
    tol: float = 0.0
    """Stop once the fraction of users whose (arg-max) group changed in a round is <= tol ..."""
    patience: int = 2
    """... in this many consecutive rounds with an accepted M-step."""
    guard: bool = True
    """Undo an M-step that lowers the EM objective on the training pairs (generalised EM; one extra on-device copy
    of the trained parameters). False trusts every M-step, as the paper does."""
    seed: int = 0
    m_step: MStepConfig = MStepConfig()
    progress: bool = True
    """tqdm progress bars for rounds and steps."""

    def __post_init__(self):
        if self.num_groups != "auto":
            validate.positive_int(self, "num_groups")
        validate.require(len(self.k_range) == 2 and all(isinstance(k, int) for k in self.k_range)
                         and 1 <= self.k_range[0] <= self.k_range[1], self, "k_range",
                         f"expected [lo, hi] with 1 <= lo <= hi, got {list(self.k_range)}")
        for name, allowed in (("method", ("hard", "soft")), ("init", ("features", "round_robin", "random")),
                              ("assign_by", ("heldout", "reward_model")), ("prompt_features", ("auto", "on", "off"))):
            validate.one_of(self, name, allowed)
        validate.require(self.num_groups != "auto" or self.init == "features", self, "init",
                         "num_groups='auto' chooses K with the token-feature mixture, so it needs init='features', "
                         f"got {self.init!r}")
        validate.require(isinstance(self.user_folds, int) and self.user_folds >= 2, self, "user_folds",
                         f"expected an integer >= 2, got {self.user_folds!r}")
        validate.positive_int(self, "restarts", "init_restarts", "rounds", "batch_size", "chunk_size", "patience",
                              "feature_seeds")
        for name, lowest in (("feature_clusters", 1), ("feature_tokens", 0)):
            values = getattr(self, name)
            validate.require(isinstance(values, tuple) and len(values) > 0
                             and all(isinstance(v, int) and not isinstance(v, bool) and v >= lowest for v in values),
                             self, name, f"expected a non-empty list of integers >= {lowest}, got {values!r}")
        validate.non_negative_int(self, "steps_per_round", optional=True)
        validate.positive(self, "epochs_per_round", "feature_l2")
        validate.require(0.0 < self.heldout_fraction < 1.0, self, "heldout_fraction",
                         f"expected a number in (0, 1), got {self.heldout_fraction!r}")

    @classmethod
    def paper(cls, num_groups: int, **overrides) -> EMConfig:
        """The paper's setting: hard EM from a round-robin start, users assigned by the reward model's E-step,
        10 rounds of 50 optimiser steps, every M-step trusted."""
        settings = dict(method="hard", init="round_robin", assign_by="reward_model", rounds=10, steps_per_round=50,
                        tol=-1.0, guard=False)
        return cls(num_groups=num_groups, **{**settings, **overrides})

    def steps_for(self, num_pairs: int) -> int:
        if self.steps_per_round is not None:
            return self.steps_per_round
        return max(1, math.ceil(self.epochs_per_round * num_pairs / self.batch_size))


@dataclasses.dataclass
class EMResult:
    """A fitted mixture. Rows of `assignments` / `responsibilities` follow `user_ids`."""

    assignments: np.ndarray  # [U] int: argmax_k responsibilities
    responsibilities: np.ndarray  # [U, K]
    weights: np.ndarray  # [K] mixing weights w_k
    history: list[dict]  # one dict per round of the kept restart
    model: nnx.Module  # RewardModel or SeparateRewardModels with num_groups heads, fitted
    user_ids: tuple[str, ...]
    restart_scores: list[float] = dataclasses.field(default_factory=list)  # held-out log-lik per restart
    best_restart: int = 0
    metrics: dict = dataclasses.field(default_factory=dict)  # e.g. ARI and purity when true groups are known
    num_groups: int = 0  # K of the fit (the chosen one with num_groups="auto")
    diagnostics: dict = dataclasses.field(default_factory=dict)  # init, K selection, restart agreement, warnings

    def __post_init__(self):
        if not self.num_groups:
            self.num_groups = int(self.responsibilities.shape[-1])

    def assignment_dict(self) -> dict[str, int]:
        return {u: int(k) for u, k in zip(self.user_ids, self.assignments)}


def _split_rows(batch: PairBatch, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (train, held out): ~fraction of each user's pairs held out, each user keeping one to train."""
    train, held = [], []
    for u in range(batch.num_users):
        idx = rng.permutation(np.flatnonzero(batch.user_index == u))
        k = min(int(round(fraction * len(idx))), len(idx) - 1)
        held.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(held))


def split_heldout(batch: PairBatch, fraction: float, rng: np.random.Generator) -> tuple[PairBatch, PairBatch]:
    """Hold out ~fraction of each user's pairs (each user keeps at least one training pair)."""
    train, held = _split_rows(batch, fraction, rng)
    return batch.take(train), batch.take(held)


# Inputs: checks with clear messages ------------------------------------------------------------------------------
def _check_inputs(model: nnx.Module, batch: PairBatch, config: EMConfig, trainable) -> list[str]:
    """Raise on what EM cannot do; return warnings for what it does with reduced power."""
    if not jax.tree.leaves(nnx.state(model, trainable)):
        raise ValueError(f"the trainable filter {trainable!r} selects no variable of the reward model")
    if batch.num_pairs == 0 or batch.num_users == 0:
        raise DataError("fit_em: no preference pairs")
    counts = np.bincount(batch.user_index, minlength=batch.num_users)
    if np.any(counts == 0):
        missing = [batch.user_ids[u] for u in np.flatnonzero(counts == 0)[:5]]
        raise DataError(f"fit_em: users without pairs in the batch, e.g. {missing}: drop them from user_ids")
    k = config.num_groups
    if k != "auto":
        if model.num_groups != k:
            raise ValueError(f"model has {model.num_groups} heads but config.num_groups={k}")
        if batch.num_users < k:
            raise ConfigError(f"EMConfig.num_groups: {k} is more than the {batch.num_users} users, who cannot fill "
                              f"{k} groups; expected at most {batch.num_users}", key="num_groups")
    if k != 1 and np.all(counts < 2):
        raise DataError(f"fit_em: every one of the {batch.num_users} users has a single pair: EM groups users by "
                        "the preferences their pairs share, so it needs users with several pairs each")
    warnings = []
    if k != 1 and np.any(counts < 2):
        warnings.append(f"{int(np.sum(counts < 2))} of {batch.num_users} users have a single pair: they are "
                        "assigned on that one pair's evidence and none of it is held out")
    return warnings


# The reward-model EM loop ----------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Heldout:
    """Held-out pairs of the training users, with the token-feature mixture's view of them when there is one."""

    chunks: PairChunks
    features: np.ndarray | None  # [N_held, d]
    user_index: np.ndarray  # [N_held]


def _heldout_log_likelihood(L_held: np.ndarray, gamma: np.ndarray) -> float:
    """Predictive log-likelihood of held-out pairs, each user's responsibilities as their prior over groups."""
    log_prior = np.log(np.maximum(np.asarray(gamma, np.float64), LOG_FLOOR))
    return float(np.sum(np.logaddexp.reduce(log_prior + np.asarray(L_held, np.float64), axis=-1)))


def _linear_fit(features: np.ndarray, user_index: np.ndarray, num_users: int, gamma: np.ndarray, l2: float,
                hard_iters: int = 0):
    """The token-feature mixture from responsibilities `gamma` after `hard_iters` hard EM rounds:
    (responsibilities [U, K], heads [K, d], leave-one-user-out scores [U, K])."""
    fit = fit_linear_mixture(jnp.asarray(features), jnp.asarray(user_index), jnp.asarray(gamma[None], jnp.float32),
                             num_users=num_users, l2=l2, soft_iters=0, hard_iters=hard_iters)
    return np.asarray(fit.gamma[0]), np.asarray(fit.theta[0]), np.asarray(fit.loo[0])


def _linear_heldout_L(held: _Heldout, theta: np.ndarray, num_users: int) -> np.ndarray:
    m = held.features @ theta.T
    out = np.zeros((num_users, theta.shape[0]))
    np.add.at(out, held.user_index, -np.logaddexp(0.0, -m))
    return out


@dataclasses.dataclass
class _Features:
    """Token features of every pair (training and held-out rows of one batch) for the token-feature mixture."""

    x: np.ndarray  # [N, d]
    user_index: np.ndarray  # [N]
    train_rows: np.ndarray


def _fit_once(model: nnx.Module, train: PairBatch, train_chunks: PairChunks, config: EMConfig, gamma0: np.ndarray,
              rng: np.random.Generator, label: str, trainable, sharding, held: _Heldout | None,
              features: _Features | None) -> tuple[np.ndarray, list[dict]]:
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
            rows = features.train_rows
            _, theta, _ = _linear_fit(features.x[rows], features.user_index[rows], num_users, gamma,
                                      config.feature_l2)
            entry["heldout_log_likelihood_features"] = _heldout_log_likelihood(
                _linear_heldout_L(held, theta, num_users), gamma)
            if entry["heldout_log_likelihood_features"] >= entry["heldout_log_likelihood"]:
                assigned_by = "token_features"  # the mixture's leave-one-user-out EM on all pairs, from gamma
                new_gamma, _, _ = _linear_fit(features.x, features.user_index, num_users, gamma,
                                              config.feature_l2, hard_iters=4)
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


def _starting_points(config: EMConfig, k: int, num_users: int, restart: int, rng: np.random.Generator,
                     features: np.ndarray | None, user_index: np.ndarray, first_fit: FeatureMixture | None
                     ) -> tuple[np.ndarray, FeatureMixture | None]:
    if config.init == "features":
        fit = first_fit if restart == 0 and first_fit is not None else fit_feature_mixture(
            features, user_index, num_users, k, restarts=config.init_restarts, l2=config.feature_l2,
            seed=config.seed + restart)
        return fit.responsibilities, fit
    init = config.init if restart == 0 else "random"
    return np.eye(k, dtype=np.float32)[initial_assignments(num_users, k, init, rng)], None


def _feature_mixture(everything: PairBatch, num_train_pairs: int, user_index: np.ndarray, num_users: int,
                     config: EMConfig):
    """Token features of `everything` (the batch's pairs, then any held-out ones) and the token-feature mixture
    on the batch's pairs, at config.num_groups or at the K chosen in k_range.

    Which features: every candidate (clusters, tokens, prompt terms, word clustering) is fitted and the one that
    predicts left-out users best (leave-one-user-out log-likelihood) is kept; with num_groups="auto" (a fit per
    K), the word clusterings after the first are tried for the best candidate only. A feature that tells no group apart still gets a noisy weight
    in every head and blurs which head predicts a user best, so fewer features win where they suffice.
    Returns (features, mixture, K selection or None, the chosen candidate as a dict)."""
    prompt = {"on": [True], "off": [False], "auto": [False, True]}[config.prompt_features]

    clusterings = {}  # (clusters, seed) -> word cluster of every token, shared by that clustering's candidates

    def fit(clusters, tokens, prompt_terms, seed):
        if (clusters, seed) not in clusterings:
            clusterings[clusters, seed] = batch_word_clusters(everything, clusters, seed=config.seed + seed)
        x = pair_features(everything, clusters=clusters, tokens=tokens, prompt_terms=prompt_terms,
                          labels=clusterings[clusters, seed])
        train = x[:num_train_pairs]
        if config.num_groups == "auto":
            selection = select_num_groups(train, user_index, num_users, config.k_range,
                                          restarts=config.init_restarts, l2=config.feature_l2, seed=config.seed)
            return max(selection.scores), x, selection.fits[selection.chosen], selection
        mixture = fit_feature_mixture(train, user_index, num_users, config.num_groups,
                                      restarts=config.init_restarts, l2=config.feature_l2, seed=config.seed)
        return mixture.score, x, mixture, None

    if config.num_groups != "auto":
        fits = {c: fit(*c) for c in itertools.product(config.feature_clusters, config.feature_tokens, prompt,
                                                       range(config.feature_seeds))}
    else:  # every K of k_range per candidate: the other word clusterings only for the best candidate
        fits = {(*c, 0): fit(*c, 0) for c in itertools.product(config.feature_clusters, config.feature_tokens,
                                                                prompt)}
        best = max(fits, key=lambda c: fits[c][0])[:3]
        fits.update({(*best, s): fit(*best, s) for s in range(1, config.feature_seeds)})
    chosen = max(fits, key=lambda c: fits[c][0])
    if config.num_groups == "auto":  # K by users held out of the fit, on the chosen features
        _, x, _, screen = fits[chosen]
        selection = select_num_groups(x[:num_train_pairs], user_index, num_users, config.k_range,
                                      restarts=config.init_restarts, l2=config.feature_l2, seed=config.seed,
                                      user_folds=config.user_folds)
        fits[chosen] = (fits[chosen][0], x, selection.fits[selection.chosen], selection)
    _, x, mixture, selection = fits[chosen]
    candidate = dict(zip(("clusters", "tokens", "prompt_features", "clustering_seed"), chosen))
    candidate["scores"] = [{"clusters": c, "tokens": t, "prompt_features": p, "clustering_seed": s,
                            "leave_one_user_out_log_likelihood": float(f[0])}
                           for (c, t, p, s), f in fits.items()]
    return x, mixture, selection, candidate


def fit_em(model: nnx.Module, batch: PairBatch, config: EMConfig, *, heldout: PairBatch | None = None,
           mesh=None, trainable: nnx.filterlib.Filter = nnx.Param) -> EMResult:
    """Fit a K-group mixture by EM (module docstring). `model` (RewardModel or SeparateRewardModels) is trained in
    place and returned in the result; with num_groups="auto" the result's model is `model.with_num_groups(K)`
    (the same backbone, fresh heads) unless `model` already has the chosen K heads.

    `heldout`: pairs of the same users held out from training (default: `heldout_fraction` of each user's pairs,
    when assign_by="heldout" or restarts > 1 need them). `trainable` selects the variables the M-step trains (an
    nnx filter), e.g. only LoRA adapters and the heads:
    `nnx.Any(nnx.LoRAParam, nnx.PathContains("head"), nnx.PathContains("head_bias"))`."""
    warnings = _check_inputs(model, batch, config, trainable)
    rng = np.random.default_rng(config.seed)
    train_rows, held_rows = np.arange(batch.num_pairs), np.zeros(0, np.int64)
    needs_heldout = config.restarts > 1 or (config.assign_by == "heldout" and config.init == "features")
    if heldout is None and needs_heldout:
        train_rows, held_rows = _split_rows(batch, config.heldout_fraction, rng)
    train = batch.take(train_rows)
    held_batch = heldout if heldout is not None else (batch.take(held_rows) if len(held_rows) else None)
    if held_batch is not None and heldout is not None:
        held_batch = _align_users(heldout, batch)

    features, selection, first_fit, k = None, None, None, config.num_groups
    if config.init == "features":
        everything = batch if heldout is None else _concat(batch, held_batch)
        x, first_fit, selection, candidate = _feature_mixture(everything, batch.num_pairs, batch.user_index,
                                                                 batch.num_users, config)
        if heldout is None:
            features, held_x = _Features(x, batch.user_index, train_rows), x[held_rows]
        else:
            features = _Features(x[:batch.num_pairs], batch.user_index, np.arange(batch.num_pairs))
            held_x = x[batch.num_pairs:]
        k = first_fit.num_groups
        if model.num_groups != k:
            model = model.with_num_groups(k, nnx.Rngs(config.seed))

    sharding = None
    if mesh is not None:
        from maxmin_jax.sharding import replicated, shard_module

        shard_module(model, mesh)
        sharding = replicated(mesh)  # minibatches arrive whole; XLA splits the compute over the mesh
    train_chunks = PairChunks.from_batch(train, config.chunk_size, sharding)
    held = None
    if held_batch is not None and held_batch.num_pairs:
        held = _Heldout(PairChunks.from_batch(held_batch, config.chunk_size, sharding),
                        held_x if features is not None else None, held_batch.user_index)
    initial = copy_tree(nnx.state(model)) if config.restarts > 1 else None  # a 7B base is not copied for nothing
    best, scores, finals, inits = None, [], [], []
    for restart in range(config.restarts):
        if restart:
            nnx.update(model, copy_tree(initial))
            model.reinit_heads(jax.random.fold_in(jax.random.key(config.seed), restart))
        gamma0, fit = _starting_points(config, k, batch.num_users, restart, rng,
                                       None if features is None else features.x, batch.user_index, first_fit)
        inits.append(fit)
        gamma, history = _fit_once(model, train, train_chunks, config, gamma0, rng,
                                   f"restart {restart + 1}/{config.restarts}", trainable, sharding, held, features)
        finals.append(np.argmax(gamma, -1))
        log_w = np.log(np.maximum(gamma.mean(0), LOG_FLOOR))
        result = EMResult(assignments=np.argmax(gamma, -1), responsibilities=gamma, weights=np.exp(log_w),
                          history=history, model=model, user_ids=batch.user_ids, num_groups=k)
        if config.restarts == 1:
            best = (0, result, None)
            break
        scores.append(history[-1].get("heldout_log_likelihood", -math.inf))
        if best is None or scores[-1] > scores[best[0]]:
            best = (restart, result, copy_tree(nnx.state(model)))
    restart, result, state = best
    if state is not None:
        nnx.update(model, state)
    diagnostics = {"warnings": warnings, "train_pairs": train.num_pairs,
                   "heldout_pairs": 0 if held is None else held.chunks.num_pairs}
    if inits[restart] is not None:
        fit = inits[restart]
        diagnostics["init"] = {"method": "features", "features": int(features.x.shape[1]),
                               "feature_set": candidate,
                               "leave_one_user_out_log_likelihood": fit.score,
                               "restart_scores": fit.restart_scores, "restart_agreement": fit.restart_agreement,
                               "assignments": fit.assignments.tolist()}
    else:
        diagnostics["init"] = {"method": config.init}
    if config.restarts > 1:
        diagnostics["restart_agreement"] = float(np.mean([adjusted_rand(finals[restart], f)
                                                          for i, f in enumerate(finals) if i != restart]))
    if selection is not None:
        diagnostics["k_selection"] = selection.to_json()
    return dataclasses.replace(result, restart_scores=scores, best_restart=restart, diagnostics=diagnostics)


def _align_users(heldout: PairBatch, batch: PairBatch) -> PairBatch:
    """`heldout` re-indexed to `batch`'s users (refusing users the training batch does not have)."""
    index = {u: i for i, u in enumerate(batch.user_ids)}
    unknown = [u for u in heldout.user_ids if u not in index]
    if unknown:
        raise ValueError(f"heldout has users the training pairs do not, e.g. {unknown[:5]}")
    remap = np.array([index[u] for u in heldout.user_ids], np.int32)
    return dataclasses.replace(heldout, user_index=remap[heldout.user_index], user_ids=batch.user_ids,
                               groups=batch.groups)


def _concat(a: PairBatch, b: PairBatch) -> PairBatch:
    """Pairs of `a` then `b` (same users, as `_align_users` makes them), padded to one length."""
    t = max(a.chosen_ids.shape[1], b.chosen_ids.shape[1])

    def pad(x):
        return np.pad(x, ((0, 0), (t - x.shape[1], 0)))

    fields = {f: np.concatenate([pad(getattr(a, f)), pad(getattr(b, f))])
              for f in ("chosen_ids", "chosen_mask", "rejected_ids", "rejected_mask")}
    return dataclasses.replace(a, **fields, user_index=np.concatenate([a.user_index, b.user_index]))


def fit_single_reward(model: nnx.Module, batch: PairBatch, *, steps: int, batch_size: int = 32,
                      m_step_config: MStepConfig = MStepConfig(), seed: int = 0, progress: bool = True,
                      trainable: nnx.filterlib.Filter = nnx.Param) -> EMResult:
    """The standard-RLHF baseline: one BT reward (K = 1) trained on the pooled pairs for `steps` optimiser steps.
    With one group there is nothing to assign, so every step is kept: EM's guard would judge all `steps` by one
    comparison of the training likelihood and could silently return the untrained model. Divergence still stops
    it (NumericalFault), as in `fit_em`."""
    if model.num_groups != 1:
        raise ValueError(f"fit_single_reward trains one reward head; the model has {model.num_groups}")
    cfg = EMConfig(num_groups=1, rounds=1, steps_per_round=steps, batch_size=batch_size, m_step=m_step_config,
                   seed=seed, progress=progress, init="round_robin", assign_by="reward_model", guard=False)
    return fit_em(model, batch, cfg, trainable=trainable)


# Scoring held-out users and new users ------------------------------------------------------------------------
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


__all__ = ["EMConfig", "EMResult", "MStepConfig", "assign_user", "clustering_metrics", "evaluate_pairs", "fit_em",
           "fit_single_reward", "log_likelihood_matrix", "mixing_log_weights", "pair_rewards", "score_chunks",
           "split_heldout"]
