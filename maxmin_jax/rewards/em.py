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
import functools
import math
import typing
from typing import Literal

import jax
import numpy as np
from flax import nnx

from maxmin_jax import validate
from maxmin_jax.data.batching import PairBatch
from maxmin_jax.errors import ConfigError, DataError
from maxmin_jax.rewards.em_rounds import Features, Heldout, run_rounds
from maxmin_jax.rewards.estep import LOG_FLOOR, PairChunks
from maxmin_jax.rewards.init import adjusted_rand
from maxmin_jax.rewards.mstep import MStepConfig, copy_tree
from maxmin_jax.rewards.start import feature_start, starting_points

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
    are predicted by the others' heads; from the smallest K, the next K, or the one after it, replaces the K chosen
    so far when it gains more than `init.GAIN_STANDARD_ERRORS` standard errors over it)."""
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
    feature_disputed_tokens: tuple[int, ...] = (32,)
    """Numbers of the most disputed tokens (`features.disputed_tokens`: those users' labels disagree about most)
    that are token features on their own, tried with each word clustering (without prompt terms unless
    prompt_features="on"); () for none. They find the words a group cares about where those words do not occur
    together and so form no word cluster. Their scores are optimistic (the ranking saw the labels), so they win
    only by more than one standard error."""
    disputed_bigrams: Literal["auto", "on", "off"] = "auto"
    """Rank adjacent token pairs with the tokens for the disputed columns (`features.disputed_tokens`), so a
    phrase a group likes ("step by step", a word a subword tokenizer splits) counts apart from its words
    elsewhere. "auto": tried on the chosen feature set (its single-token columns replaced by the most disputed
    tokens and bigrams) and kept only when clearly better, as the length hinges; "on": the disputed candidates
    rank bigrams too (on the zoo that cost some worlds 0.1 to 0.15 ARI: a rare bigram disputed by chance takes
    the place of a word of a group's class)."""
    feature_seeds: int = 3
    """Word clusterings (k-means seeds) tried for the chosen feature set; the one whose mixture predicts left-out
    users best is kept (the clustering of a small vocabulary varies with the seed)."""
    prompt_features: Literal["auto", "on", "off"] = "auto"
    """Add prompt-relevance features (does the response use the prompt's word clusters; does the prompt change
    the preferred length)? "auto": only when they raise the held-out users' log-likelihood."""
    length_shape: Literal["auto", "on", "off"] = "auto"
    """Add length hinges (`length_knots` bends at quantiles of the response lengths), so a head can prefer a length
    in the middle, not only longer or shorter. "auto": tried on the best feature set of the others and kept only
    when they raise its held-out users' log-likelihood by more than one standard error (one more fit); "on": in
    every candidate."""
    length_knots: int = 3
    """Bends of the length hinges (at the 1/(n+1), ..., n/(n+1) quantiles of the response lengths)."""
    response_ends: Literal["auto", "on", "off"] = "auto"
    """Add whether the response opens or closes with a token, for the `response_end_tokens` most frequent (place,
    token) (`features.response_ends`), so a head can prefer answers that begin "Sure, ..." over "Perhaps ..."
    wherever else those words occur. "auto": tried on the chosen feature set (after the length hinges) and kept
    only when they raise its held-out users' log-likelihood by more than one standard error (one more fit); "on":
    in every candidate."""
    response_end_tokens: int = 16
    """How many of the most frequent response openers and closers response_ends adds."""
    token_positions: Literal["auto", "on", "off"] = "auto"
    """Add where in the response each of the `position_tokens` tokens whose place users dispute most stands
    (`features.token_positions`, `features.disputed_positions`), so a head can prefer the advice first or last
    wherever both groups like advice. "auto": tried on the chosen feature set (after the response's ends) and kept
    only when clearly better, as the length hinges; "on": in every candidate."""
    position_tokens: int = 16
    """How many tokens' positions token_positions adds."""
    repetition: Literal["auto", "on", "off"] = "auto"
    """Add how much the response repeats itself, rare words weighted up (`features.repetition`), so a head can
    prefer concise answers or restatements. "auto": tried on the chosen feature set (after the token positions)
    and kept only when clearly better, as the length hinges; "on": in every candidate."""
    prompt_topics: Literal["auto", "on", "off"] = "auto"
    """Add what the prompt is about times what the response is about (`features.prompt_topics`: the directions
    along which prompts and their responses' words go together, found without labels), so a head can prefer
    answers on the prompt's topic, or on another. "auto": tried on the chosen feature set (after the repetition)
    and kept only when clearly better, as the length hinges; "on": in every candidate."""
    feature_l2: float = 3.0
    """L2 penalty of the token-feature mixture's linear heads."""
    feature_flip_rate: float | Literal["auto"] = "auto"
    """Rate of randomly flipped labels in the token-feature mixture's likelihood (`linear_mixture`): "auto" learns
    it by EM with the mixture; a number in [0, 0.5) fixes it (0: plain Bradley-Terry)."""
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
        for name, allowed in _choices().items():  # every field typed as a Literal of strings
            validate.one_of(self, name, allowed)
        validate.require(self.num_groups != "auto" or self.init == "features", self, "init",
                         "num_groups='auto' chooses K with the token-feature mixture, so it needs init='features', "
                         f"got {self.init!r}")
        validate.require(isinstance(self.user_folds, int) and self.user_folds >= 2, self, "user_folds",
                         f"expected an integer >= 2, got {self.user_folds!r}")
        validate.positive_int(self, "restarts", "init_restarts", "rounds", "batch_size", "chunk_size", "patience",
                              "feature_seeds", "length_knots", "response_end_tokens", "position_tokens")
        for name, lowest, least in (("feature_clusters", 1, 1), ("feature_tokens", 0, 1),
                                    ("feature_disputed_tokens", 1, 0)):
            values = getattr(self, name)
            validate.require(isinstance(values, tuple) and len(values) >= least
                             and all(isinstance(v, int) and not isinstance(v, bool) and v >= lowest for v in values),
                             self, name, f"expected a {'non-empty ' if least else ''}list of integers >= {lowest}, "
                                         f"got {values!r}")
        validate.non_negative_int(self, "steps_per_round", optional=True)
        validate.positive(self, "epochs_per_round", "feature_l2")
        validate.require(self.feature_flip_rate == "auto" or (
            isinstance(self.feature_flip_rate, (int, float)) and not isinstance(self.feature_flip_rate, bool)
            and 0.0 <= self.feature_flip_rate < 0.5), self, "feature_flip_rate",
            f"expected 'auto' or a number in [0, 0.5), got {self.feature_flip_rate!r}")
        validate.require(0.0 < self.heldout_fraction < 1.0, self, "heldout_fraction",
                         f"expected a number in (0, 1), got {self.heldout_fraction!r}")

    @classmethod
    def paper(cls, num_groups: int, **overrides) -> EMConfig:
        """The paper's setting: hard EM from a round-robin start, users assigned by the reward model's E-step,
        10 rounds of 50 optimiser steps, every M-step trusted."""
        settings = dict(method="hard", init="round_robin", assign_by="reward_model", rounds=10, steps_per_round=50,
                        tol=-1.0, guard=False)
        return cls(num_groups=num_groups, **{**settings, **overrides})

    @property
    def flip_rate_or_none(self) -> float | None:
        """feature_flip_rate as the token-feature mixture takes it: None to learn it."""
        return None if self.feature_flip_rate == "auto" else float(self.feature_flip_rate)

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


@functools.cache
def _choices() -> dict[str, tuple[str, ...]]:
    """EMConfig's fields whose type is a Literal of strings, and the strings (a field added that way is checked)."""
    hints = typing.get_type_hints(EMConfig)
    return {f.name: typing.get_args(hints[f.name]) for f in dataclasses.fields(EMConfig)
            if typing.get_origin(hints[f.name]) is Literal}


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
        x, first_fit, selection, candidate = feature_start(everything, batch.num_pairs, batch.user_index,
                                                                 batch.num_users, config)
        if heldout is None:
            features, held_x = Features(x, batch.user_index, train_rows, first_fit.flip_rate), x[held_rows]
        else:
            features = Features(x[:batch.num_pairs], batch.user_index, np.arange(batch.num_pairs),
                                first_fit.flip_rate)
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
        held = Heldout(PairChunks.from_batch(held_batch, config.chunk_size, sharding),
                        held_x if features is not None else None, held_batch.user_index)
    initial = copy_tree(nnx.state(model)) if config.restarts > 1 else None  # a 7B base is not copied for nothing
    best, scores, finals, inits = None, [], [], []
    for restart in range(config.restarts):
        if restart:
            nnx.update(model, copy_tree(initial))
            model.reinit_heads(jax.random.fold_in(jax.random.key(config.seed), restart))
        gamma0, fit = starting_points(config, k, batch.num_users, restart, rng,
                                       None if features is None else features.x, batch.user_index, first_fit)
        inits.append(fit)
        gamma, history = run_rounds(model, train, train_chunks, config, gamma0, rng,
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
                               "leave_one_user_out_log_likelihood": fit.score, "flip_rate": fit.flip_rate,
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


__all__ = ["EMConfig", "EMResult", "MStepConfig", "fit_em", "fit_single_reward", "split_heldout"]
