"""Each algorithm's trainer and the inputs of its iterations, for the one training loop (`stages.iterate`).

Online algorithms (ppo; grpo and rloo, critic-free) train on the run's prompts, the same ones for every policy in
each iteration; offline ones (dpo, ipo) on the run's preference pairs, each pair weighted by its user's EM group
membership (the assignment, or the responsibilities), with the reference's log-probs computed once per run.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

from maxmin_jax.data.batching import PairBatch
from maxmin_jax.errors import ConfigError, DataError
from maxmin_jax.pipeline.config import ALGORITHMS, CRITIC_FREE, OFFLINE
from maxmin_jax.pipeline.sources import Models, Preferences, PromptSource, Stream, stream_rng
from maxmin_jax.pipeline.stages import Rewards, _lora, _placed, objective_options, starting_policy
from maxmin_jax.policy.advantages import make_estimator
from maxmin_jax.policy.critic_free import CriticFreeTrainer
from maxmin_jax.policy.model import PolicyWithValue
from maxmin_jax.policy.objectives import RewardStandardizer, make_objective
from maxmin_jax.policy.offline import (PreferencePairs, PreferenceTrainer, pair_group_weights, preference_pairs,
                                       with_reference_logprobs)
from maxmin_jax.policy.trainer import PPOTrainer
from maxmin_jax.trainable import trainable_filter


def make_trainer(ctx, objective: str, algorithm: str, models: Models, rewards: Rewards,
                 standardizers: dict[str, RewardStandardizer], prompts: PromptSource,
                 prefs: Preferences | None = None) -> tuple[Any, Callable[[int], tuple]]:
    """The trainer of one (objective, algorithm) pair, from the common start, and `batch(i)`: the inputs of its
    iteration i (prompts online, drawn alike for every policy of an algorithm; a pass over the pairs offline)."""
    cfg = ctx.cfg.policy
    kwargs = objective_options(objective, cfg)
    if objective == "utilitarian":
        kwargs["weights"] = tuple(float(w) for w in rewards.weights)
    lora = _lora(ctx, "policy")
    common = {"trainable": trainable_filter(lora=lora is not None)}
    if algorithm in OFFLINE:
        pairs = preference_data(ctx, models, rewards, prefs, pooled=objective == "single")
        trainer = PreferenceTrainer(_placed(ctx, starting_policy(ctx, models)), make_objective(objective, **kwargs),
                                    pairs.group_shares(),
                                    config=dataclasses.replace(cfg.preference, loss=algorithm), **common)
        return trainer, lambda i: (_placed_batch(ctx, pairs.take(pair_indices(pairs.num_pairs, cfg.pair_batch, i,
                                                                              ctx.cfg.seed))),)
    reward_model, which = rewards.for_objective(objective)
    online = (reward_model, make_objective(objective, **kwargs), standardizers[which])
    common |= {"reference": None if lora is not None else models.policy, "sampling": ctx.sampling}
    if algorithm == "ppo":
        trainer = PPOTrainer(_placed(ctx, PolicyWithValue(starting_policy(ctx, models))), *online, ppo=cfg.ppo,
                             **common)
    elif algorithm in CRITIC_FREE:
        estimator = make_estimator(cfg.grpo_variant if algorithm == "grpo" else algorithm, group_size=cfg.group_size)
        trainer = CriticFreeTrainer(_placed(ctx, starting_policy(ctx, models)), *online, estimator=estimator,
                                    config=cfg.critic_free, **common)
    else:
        raise ConfigError(f"policy.algorithms: unknown algorithm {algorithm!r}; choose from {list(ALGORITHMS)}")
    per_iteration = cfg.prompt_batch // (cfg.group_size if algorithm in CRITIC_FREE else 1)  # the same responses
    return trainer, lambda i: prompts.sample(per_iteration, Stream.TRAIN, i)


def _placed_batch(ctx, batch):
    if ctx.mesh is None:
        return batch
    from maxmin_jax.sharding import shard_batch

    return shard_batch(batch, ctx.mesh)


def pair_indices(num_pairs: int, batch_size: int, iteration: int, seed: int) -> np.ndarray:
    """The pairs of offline iteration `iteration`: consecutive slices of one shuffled order per epoch (every pair
    once per epoch), a function of (seed, iteration) only, so a resumed run sees what an uninterrupted one does."""
    positions = iteration * batch_size + np.arange(batch_size)
    epochs, offsets = np.divmod(positions, num_pairs)
    return np.array([stream_rng(seed, Stream.TRAIN, int(e)).permutation(num_pairs)[o]
                     for e, o in zip(epochs, offsets)])


def pair_membership(rewards: Rewards, pairs: PairBatch, *, soft: bool) -> np.ndarray:
    """[N, K] group weights of the pairs from their users' EM result: one-hot assignments, or responsibilities."""
    if rewards.membership is None:
        raise ConfigError("policy.algorithms: dpo / ipo need each user's EM group (fit the rewards in this run, or "
                          "load a fit-rewards directory whose em_history.json holds responsibilities)")
    users, responsibilities = rewards.membership
    row = {u: i for i, u in enumerate(users)}
    missing = [u for u in pairs.user_ids if u not in row]
    if missing:
        raise DataError(f"preference users {missing[:3]} have no EM group ({len(missing)} of {pairs.num_users} "
                        "users): the pairs must come from the users the rewards were fitted on")
    table = responsibilities[[row[u] for u in pairs.user_ids]]
    if soft:
        return pair_group_weights(pairs.user_index, responsibilities=table)
    return pair_group_weights(pairs.user_index, assignments=table.argmax(1), num_groups=table.shape[1])


def preference_data(ctx, models: Models, rewards: Rewards, prefs: Preferences | None, *, pooled: bool
                    ) -> PreferencePairs:
    """The run's training pairs for dpo / ipo, weighted by EM group membership (one group when `pooled`, for the
    `single` objective), with the reference's log-probs computed once per run and shared by every offline policy."""
    if prefs is None:
        raise ConfigError("policy.algorithms: dpo / ipo train on the run's preference pairs: set preferences")
    key = ("reference_pairs", "soft" if ctx.cfg.policy.membership == "soft" else "hard")
    if key not in ctx.cache:
        if prefs.train.chosen_ids.shape[1] > models.policy.config.max_position_embeddings:
            raise ConfigError(f"preferences: pairs of {prefs.train.chosen_ids.shape[1]} tokens do not fit the policy's "
                              f"{models.policy.config.max_position_embeddings} positions")
        weights = pair_membership(rewards, prefs.train, soft=ctx.cfg.policy.membership == "soft")
        pairs = preference_pairs(prefs.train, weights)
        ctx.cache[key] = with_reference_logprobs(models.policy, pairs, batch_size=ctx.cfg.evaluation.batch_size,
                                                 mesh=ctx.mesh)
    pairs = ctx.cache[key]
    if pooled:
        pairs = dataclasses.replace(pairs, group_weights=np.ones((pairs.num_pairs, 1), np.float32))
    return pairs


__all__ = ["make_trainer", "pair_indices", "pair_membership", "preference_data"]
