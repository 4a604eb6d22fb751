"""Critic-free policy optimisation (GRPO, Dr.GRPO, RLOO) on the reward a social-choice objective chooses.

One jitted iteration, a pure function `(static, state, frozen, prompts, prompt_mask, key) -> (state, metrics)` like
PPO's: each prompt is repeated G times (`estimator.group_size`), the policy samples a response for every copy, the
K reward heads score them, the objective turns the [B, K] group rewards into one reward per response, the estimator
compares each response with the other samples of its prompt, and minibatch epochs of the clipped policy-gradient
loss, with a KL penalty to the reference inside the loss, update the policy. No value head is built or trained: the
policy is the language model itself.

As in PPO (the shared pieces are `maxmin_jax.policy.training`): log-probabilities are those of the distribution the
responses were sampled from (`SamplingConfig`), the KL is to the reference at the same temperature on the policy's
top-k / top-p set, the LM head is applied to the response positions only, the frozen parts (base weights under
LoRA, reference, reward model, standardiser) are arguments, the state is donated, and trainers built alike share one
compiled program.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from maxmin_jax import validate
from maxmin_jax.errors import ConfigError
from maxmin_jax.generate import SamplingConfig
from maxmin_jax.models.transformer import CausalLM
from maxmin_jax.policy.advantages import LOSS_KL_KINDS, Estimator, group_view, policy_gradient_loss
from maxmin_jax.policy.objectives import Objective, ObjectiveState, RewardStandardizer
from maxmin_jax.policy.ppo import masked_entropy, masked_mean, terminal_rewards
from maxmin_jax.policy.training import (Frozen, OnlineTrainer, flag_faults, make_optimizer, minibatch_updates,
                                        reference_logprobs, response_outputs, rollout_and_score, split_online)


@dataclasses.dataclass(frozen=True, kw_only=True)
class CriticFreeConfig:
    """Hyperparameters of the critic-free update (defaults follow GRPO, Shao et al. 2024, where it says)."""

    clip_eps: float = 0.2
    """Policy ratio clip range: ratios outside [1 - clip_eps, 1 + clip_eps] give no further gradient."""
    kl_coef: float = 0.04
    """Weight of the per-token KL penalty to the reference in the loss; 0 skips the reference forward pass."""
    kl_kind: str = "k3"
    """KL estimator in the loss: "k3" (GRPO's) or "mse" (k2). k1 is refused: as a loss term its gradient is noise."""
    entropy_coef: float = 0.0
    """Weight of the entropy bonus (subtracted from the loss); 0 disables it."""
    epochs: int = 1
    """Optimisation passes over each rollout batch. With epochs = minibatches = 1 the update is on-policy and the
    separate pass that records the sampling policy's log-probs is skipped (they are the current ones)."""
    minibatches: int = 1
    """Minibatches per epoch; the number of responses (prompts x G) must be divisible by it."""
    learning_rate: float = 1e-5
    """Adam learning rate."""
    max_grad_norm: float | None = 1.0
    """Global gradient-norm clip; None: no clipping."""
    early_stop_kl: float | None = None
    """The update's KL early stop, per token, as `PPOConfig.early_stop_kl`. None: off."""

    def __post_init__(self):
        validate.check_optimizer(self)
        validate.positive(self, "clip_eps")
        validate.positive(self, "early_stop_kl", optional=True)
        validate.non_negative(self, "kl_coef", "entropy_coef")
        validate.positive_int(self, "epochs", "minibatches")
        if self.kl_kind not in LOSS_KL_KINDS:
            raise ConfigError(f"CriticFreeConfig.kl_kind must be one of {LOSS_KL_KINDS}, got {self.kl_kind!r} "
                              "(k1 = logp - ref_logp has a zero-mean gradient as a loss term)", key="kl_kind")

    @property
    def single_pass(self) -> bool:
        return self.epochs == 1 and self.minibatches == 1


class CriticFreeState(NamedTuple):
    trainable: nnx.State  # the policy variables being optimised (the `trainable` filter's selection)
    opt_state: Any
    objective: ObjectiveState
    step: jax.Array


class _Static(NamedTuple):
    """Everything the compiled iteration depends on besides array values; hashable."""

    policy: nnx.GraphDef
    reference: nnx.GraphDef | None
    reward: nnx.GraphDef
    objective: Objective
    estimator: Estimator
    config: CriticFreeConfig
    sampling: SamplingConfig


@partial(jax.jit, static_argnums=0, donate_argnums=1)
def _iteration(static: _Static, state: CriticFreeState, frozen: Frozen, prompts, prompt_mask, key):
    """One iteration on P left-padded prompts: P x G responses sampled, scored and learned from."""
    cfg, sampling, group_size = static.config, static.sampling, static.estimator.group_size
    key_rollout, key_shuffle = jax.random.split(jax.random.fold_in(key, state.step))
    # Row p * G + g is sample g of prompt p: the layout the estimator's group view expects.
    prompts, prompt_mask = jnp.repeat(prompts, group_size, axis=0), jnp.repeat(prompt_mask, group_size, axis=0)
    b = prompts.shape[0]
    policy = nnx.merge(static.policy, state.trainable, frozen.policy_rest)
    rollout = rollout_and_score(policy, prompts, prompt_mask, key_rollout, sampling,
                                nnx.merge(static.reward, frozen.reward), frozen.standardizer, static.objective,
                                state.objective)
    seq, seq_mask, tokens, mask = rollout.seq, rollout.seq_mask, rollout.tokens, rollout.mask
    advantages, _ = static.estimator.estimate(terminal_rewards(rollout.score, mask), mask)

    # The sampling policy's log-probs, by teacher forcing (the update's numerics). With one on-policy pass they are
    # the update's own, taken inside the loss under stop_gradient, and this pass runs only when the reference's
    # support must be read from the policy's top-k / top-p set.
    restricted = sampling.top_k is not None or sampling.top_p is not None
    old = (response_outputs(policy, seq, seq_mask, tokens, sampling)
           if not cfg.single_pass or (cfg.kl_coef > 0 and restricted) else None)
    old_logprobs = None if cfg.single_pass else jax.lax.stop_gradient(old.logprobs)
    ref_logprobs = None
    if cfg.kl_coef > 0:
        reference = None if frozen.reference is None else nnx.merge(static.reference, frozen.reference)
        ref_logprobs = reference_logprobs(reference, policy, seq, seq_mask, tokens,
                                          None if old is None else old.logits, sampling)

    def loss_fn(trainable, rows):
        model = nnx.merge(static.policy, trainable, frozen.policy_rest)
        out = response_outputs(model, seq[rows], seq_mask[rows], tokens[rows], sampling)
        old = jax.lax.stop_gradient(out.logprobs) if old_logprobs is None else old_logprobs[rows]
        loss, metrics = policy_gradient_loss(
            out.logprobs, old, advantages[rows], mask[rows], normalization=static.estimator.loss_normalization,
            clip_eps=cfg.clip_eps, ref_logprobs=None if ref_logprobs is None else ref_logprobs[rows],
            kl_coef=cfg.kl_coef, kl_kind=cfg.kl_kind)
        entropy = masked_entropy(out.logits, mask[rows])
        metrics = {**metrics, "entropy": entropy, "loss": loss}
        if old_logprobs is None:  # one pass: these are the sampling policy's log-probs
            metrics["rollout_logprob_error"] = masked_mean(jnp.abs(old - rollout.sampler_logprobs[rows]), mask[rows])
        return loss - cfg.entropy_coef * entropy, metrics

    trainable, opt_state, update_metrics = minibatch_updates(
        loss_fn, make_optimizer(cfg.learning_rate, cfg.max_grad_norm), state.trainable, state.opt_state,
        key_shuffle, rows=b, epochs=cfg.epochs, minibatches=cfg.minibatches, early_stop_kl=cfg.early_stop_kl)

    spread = jnp.std(group_view(rollout.score, group_size), axis=1)
    metrics = {
        **update_metrics,
        "score": rollout.score.mean(), "group_reward": rollout.group_rewards.mean(0),
        "group_reward_std": rollout.standardized.mean(0), "group_weights": rollout.weights,
        "response_length": mask.sum(1).mean(), "sampled_tokens": mask.sum(),
        "reward_spread": spread.mean(),  # mean within-prompt std of the reward: the signal the estimator sees
        "zero_spread_fraction": jnp.mean(spread == 0),  # prompts whose G samples all scored alike: no gradient
    }
    if old_logprobs is not None:
        metrics["rollout_logprob_error"] = masked_mean(jnp.abs(old_logprobs - rollout.sampler_logprobs), mask)
    if ref_logprobs is not None:  # the sampling policy's sequence KL to the reference (k1, as PPO reports it)
        sampled = rollout.sampler_logprobs if old_logprobs is None else old_logprobs
        metrics["kl"] = jnp.sum((sampled - ref_logprobs) * mask, axis=1).mean()
    metrics |= flag_faults(metrics)  # checked on the host (`training.check_step`) before a checkpoint
    return CriticFreeState(trainable, opt_state, rollout.objective, state.step + 1), metrics


class CriticFreeTrainer(OnlineTrainer):
    """Critic-free RL on the reward chosen by a social-choice `objective` over the K group rewards of
    `reward_model`, with the advantages of a critic-free `estimator` (grpo, dr_grpo, rloo).

    `policy` is the causal LM itself (no value head). `reward_model(ids, mask) -> [B, K]` is any NNX module (the EM
    mixture; K = 1 for the `single` baseline). `trainable` (an nnx filter, `maxmin_jax.trainable`) selects what the
    update trains. `reference=None` makes the reference the policy with its LoRA adapters off (one copy of the base
    weights for both; needs adapters and frozen base weights), unless `config.kl_coef = 0` (no reference at all).
    Interface as `PPOTrainer`: `init_state()`, `step(state, prompts, prompt_mask, key) -> (state, metrics)` with
    `prompts` [P, T] (each sampled G times), `policy(state)`.
    """

    def __init__(self, policy: CausalLM, reward_model: nnx.Module, objective: Objective,
                 standardizer: RewardStandardizer, *, estimator: Estimator, reference: CausalLM | None = None,
                 config: CriticFreeConfig = CriticFreeConfig(), sampling: SamplingConfig = SamplingConfig(),
                 trainable: nnx.filterlib.Filter = nnx.Param):
        if not isinstance(policy, CausalLM):
            raise TypeError(f"CriticFreeTrainer trains the language model itself (no value head); got "
                            f"{type(policy).__name__} (pass PolicyWithValue.lm)")
        if estimator.uses_critic:
            raise ConfigError(f"estimator {estimator.name!r} needs a critic: train it with PPOTrainer, or choose "
                              "grpo, dr_grpo or rloo", key="estimator")
        if sampling.temperature <= 0:
            raise ConfigError(f"critic-free estimators compare {estimator.group_size} samples of each prompt, "
                              f"which greedy decoding makes identical: sampling.temperature must be > 0, got "
                              f"{sampling.temperature}", key="temperature")
        parts = split_online(policy, reward_model, standardizer, reference=reference, trainable=trainable,
                             uses_reference=config.kl_coef > 0)
        super().__init__(_Static(parts.policy_def, parts.reference_def, parts.reward_def, objective, estimator,
                                 config, sampling), parts)

    @property
    def config(self) -> CriticFreeConfig:
        return self.static.config

    @property
    def estimator(self) -> Estimator:
        return self.static.estimator

    def initial_state(self, params: nnx.State, num_groups: int) -> CriticFreeState:
        return CriticFreeState(params, make_optimizer(self.config.learning_rate, self.config.max_grad_norm).init(
            params), self.static.objective.init(num_groups), jnp.zeros((), jnp.int32))

    def check_batch(self, prompts: jax.Array) -> None:
        """P prompts, each sampled G times: P x G responses split into the minibatches."""
        responses = prompts.shape[0] * self.estimator.group_size
        if responses % self.config.minibatches:
            raise ConfigError(f"{prompts.shape[0]} prompts x {self.estimator.group_size} samples = {responses} "
                              f"responses, not divisible by CriticFreeConfig.minibatches={self.config.minibatches}",
                              key="minibatches")

    iteration = staticmethod(_iteration)


__all__ = ["CriticFreeConfig", "CriticFreeState", "CriticFreeTrainer"]
