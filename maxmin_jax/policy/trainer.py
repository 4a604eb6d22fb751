"""One jitted PPO iteration: rollout -> score by the K reward heads -> objective -> advantages -> update.

The iteration is a pure function `(static, state, frozen, prompts, prompt_mask, key) -> (state, metrics)`, compiled
once per distinct `static` (graph definitions, objective, PPO and sampling configs, all hashable) and with the
state donated. Trainers built alike share the compiled program. The frozen parts (reference, reward model,
standardiser) are arguments, not closed over, so they are not baked into the program as constants.

Log-probabilities are those of the distribution responses are sampled from (`SamplingConfig`: temperature, top-k,
top-p), so PPO's ratios compare the policy with the behaviour policy that produced the tokens; the KL penalty is
to the reference at the same temperature, restricted to the policy's top-k / top-p set (0 when the two agree).
Every pass applies the LM head and the value head to the response positions only (`policy.training`).
"""

from __future__ import annotations

from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from maxmin_jax.generate import SamplingConfig
from maxmin_jax.models.transformer import CausalLM
from maxmin_jax.policy.model import PolicyWithValue
from maxmin_jax.policy.objectives import Objective, ObjectiveState, RewardStandardizer
from maxmin_jax.policy.ppo import (KLControllerState, PPOConfig, gae, kl_controller, masked_entropy, masked_mean,
                                   policy_loss, token_rewards, value_loss, whiten)
from maxmin_jax.policy.training import (Frozen, OnlineTrainer, flag_faults, make_optimizer, minibatch_updates,
                                        reference_logprobs, response_outputs, rollout_and_score, split_online)


class PPOState(NamedTuple):
    trainable: nnx.State  # the policy variables being optimised (the `trainable` filter's selection)
    opt_state: Any
    kl: KLControllerState
    objective: ObjectiveState
    step: jax.Array


class _Static(NamedTuple):
    """Everything the compiled iteration depends on besides array values; hashable."""

    policy: nnx.GraphDef
    reference: nnx.GraphDef | None
    reward: nnx.GraphDef
    objective: Objective
    ppo: PPOConfig
    sampling: SamplingConfig


def optimizer(ppo: PPOConfig) -> optax.GradientTransformation:
    return make_optimizer(ppo.learning_rate, ppo.max_grad_norm)


class PPOTrainer(OnlineTrainer):
    """PPO on the reward chosen by a social-choice `objective` over the K group rewards of `reward_model`.

    `reward_model(ids, mask) -> [B, K]` is any NNX module (the EM mixture; K=1 for the `single` baseline).
    `trainable` (an nnx filter, see `maxmin_jax.trainable`) selects what the update trains; the rest of the policy
    stays as it is. `reference=None` makes the reference the policy itself with its LoRA adapters off (one copy of
    the base weights for both); that needs adapters on the policy and a `trainable` selection that leaves the base
    weights frozen.
    """

    def __init__(self, policy: PolicyWithValue, reward_model: nnx.Module, objective: Objective,
                 standardizer: RewardStandardizer, *, reference: CausalLM | None = None, ppo: PPOConfig = PPOConfig(),
                 sampling: SamplingConfig = SamplingConfig(), trainable: nnx.filterlib.Filter = nnx.Param):
        if sampling.temperature == 0:
            raise ValueError("PPO needs a stochastic policy: sampling.temperature must be > 0 (0 is greedy)")
        parts = split_online(policy, reward_model, standardizer, reference=reference, trainable=trainable)
        super().__init__(_Static(parts.policy_def, parts.reference_def, parts.reward_def, objective, ppo, sampling),
                         parts)

    @property
    def ppo(self) -> PPOConfig:
        return self.static.ppo

    def initial_state(self, params: nnx.State, num_groups: int) -> PPOState:
        return PPOState(params, optimizer(self.ppo).init(params), kl_controller(self.ppo).init(),
                        self.static.objective.init(num_groups), jnp.zeros((), jnp.int32))

    def check_batch(self, prompts: jax.Array) -> None:
        b = prompts.shape[0]
        if b % self.ppo.minibatches:
            raise ValueError(f"prompt batch {b} is not divisible by PPOConfig.minibatches={self.ppo.minibatches}")


# The jitted body ----------------------------------------------------------------------------------------------
@partial(jax.jit, static_argnums=0, donate_argnums=1)
def _iteration(static: _Static, state: PPOState, frozen: Frozen, prompts, prompt_mask, key):
    cfg, sampling = static.ppo, static.sampling
    kl_control = kl_controller(cfg)
    b = prompts.shape[0]
    key_rollout, key_shuffle = jax.random.split(jax.random.fold_in(key, state.step))
    policy = nnx.merge(static.policy, state.trainable, frozen.policy_rest)
    rollout = rollout_and_score(policy.lm, prompts, prompt_mask, key_rollout, sampling,
                                nnx.merge(static.reward, frozen.reward), frozen.standardizer, static.objective,
                                state.objective)
    seq, seq_mask, tokens, mask = rollout.seq, rollout.seq_mask, rollout.tokens, rollout.mask

    old = response_outputs(policy.lm, seq, seq_mask, tokens, sampling)
    reference = None if frozen.reference is None else nnx.merge(static.reference, frozen.reference)
    ref_logprobs = reference_logprobs(reference, policy.lm, seq, seq_mask, tokens, old.logits, sampling)
    old_logprobs, old_values = jax.lax.stop_gradient((old.logprobs, policy.values(old.hidden)))
    rewards = token_rewards(rollout.score, old_logprobs, ref_logprobs, mask, state.kl.beta, kind=cfg.kl_kind)
    advantages, returns = gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        advantages = whiten(advantages, mask)

    def loss_fn(trainable, idx):
        model = nnx.merge(static.policy, trainable, frozen.policy_rest)
        out = response_outputs(model.lm, seq[idx], seq_mask[idx], tokens[idx], sampling)
        pg, pg_metrics = policy_loss(out.logprobs, old_logprobs[idx], advantages[idx], mask[idx], cfg.clip_eps)
        vf, vf_metrics = value_loss(model.values(out.hidden), old_values[idx], returns[idx], mask[idx],
                                    cfg.clip_value)
        entropy = masked_entropy(out.logits, mask[idx])
        loss = pg + cfg.vf_coef * vf - cfg.entropy_coef * entropy
        return loss, {"policy_loss": pg, "value_loss": vf, "entropy": entropy, **pg_metrics, **vf_metrics}

    trainable, opt_state, update_metrics = minibatch_updates(
        loss_fn, optimizer(cfg), state.trainable, state.opt_state, key_shuffle, rows=b, epochs=cfg.epochs,
        minibatches=cfg.minibatches, early_stop_kl=cfg.early_stop_kl)
    sequence_kl = jnp.sum((old_logprobs - ref_logprobs) * mask, axis=1)
    kl_state = kl_control.update(sequence_kl.mean(), b, state.kl)
    metrics = {
        **update_metrics,
        "kl": sequence_kl.mean(), "beta": state.kl.beta, "score": rollout.score.mean(),
        "group_reward": rollout.group_rewards.mean(0), "group_reward_std": rollout.standardized.mean(0),
        "group_weights": rollout.weights, "response_length": mask.sum(1).mean(), "sampled_tokens": mask.sum(),
        "token_reward": masked_mean(rewards, mask),
        # The update's log-probs of the sampled tokens against the sampler's own: rounding only, unless the
        # two disagree on the distribution sampled from.
        "rollout_logprob_error": masked_mean(jnp.abs(old_logprobs - rollout.sampler_logprobs), mask),
    }
    metrics |= flag_faults(metrics)  # checked on the host (`check_step`) before the iteration is checkpointed
    return PPOState(trainable, opt_state, kl_state, rollout.objective, state.step + 1), metrics


PPOTrainer.iteration = staticmethod(_iteration)  # here, as the jitted body comes after the class

__all__ = ["PPOState", "PPOTrainer", "optimizer"]
