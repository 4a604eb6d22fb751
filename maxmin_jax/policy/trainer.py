"""One jitted PPO iteration: rollout -> score by the K reward heads -> objective -> advantages -> update.

The iteration is a pure function `(static, state, frozen, prompts, prompt_mask, key) -> (state, metrics)`, compiled
once per distinct `static` (graph definitions, objective, PPO and sampling configs, all hashable) and with the
state donated. Trainers built alike share the compiled program. The frozen parts (reference, reward model,
standardiser) are arguments, not closed over, so they are not baked into the program as constants.

Log-probabilities are those of the distribution responses are sampled from (`SamplingConfig`: temperature, top-k,
top-p), so PPO's ratios compare the policy with the behaviour policy that produced the tokens; the KL penalty is
to the reference at the same temperature, restricted to the policy's top-k / top-p set (0 when the two agree).
"""

from __future__ import annotations

from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from maxmin_jax.generate import SamplingConfig, reference_sampling_logits, sample_responses, sampling_logits
from maxmin_jax.guards import GRAD_NORM_LIMIT, KL_LIMIT, LOSS_LIMIT, fault_flags
from maxmin_jax.models.transformer import CausalLM
from maxmin_jax.policy.model import PolicyWithValue
from maxmin_jax.policy.objectives import Objective, ObjectiveState, RewardStandardizer
from maxmin_jax.policy.ppo import (KLControllerState, PPOConfig, gae, kl_controller, masked_entropy, masked_mean,
                                   policy_loss, token_logprobs, token_rewards, value_loss, whiten)
from maxmin_jax.sharding import replicate_on_mesh_of


class PPOState(NamedTuple):
    trainable: nnx.State  # the policy variables being optimised (the `trainable` filter's selection)
    opt_state: Any
    kl: KLControllerState
    objective: ObjectiveState
    step: jax.Array


class Frozen(NamedTuple):
    policy_rest: nnx.State  # the policy's variables outside the trainable selection (the base weights under LoRA)
    reference: nnx.State | None  # a separate reference model; None means the policy with its adapters off
    reward: nnx.State
    standardizer: RewardStandardizer


class _Static(NamedTuple):
    """Everything the compiled iteration depends on besides array values; hashable."""

    policy: nnx.GraphDef
    reference: nnx.GraphDef | None
    reward: nnx.GraphDef
    objective: Objective
    ppo: PPOConfig
    sampling: SamplingConfig


FAULT_LIMITS = {"policy_loss": LOSS_LIMIT, "value_loss": LOSS_LIMIT, "grad_norm": GRAD_NORM_LIMIT, "kl": KL_LIMIT,
                "approx_kl": KL_LIMIT, "score": None}
"""What stops a diverged run (`maxmin_jax.guards`): losses, the gradient norm (before clipping), the KL to the
reference and the update's approximate KL beyond their limits, or any of them (or the reward score) not finite."""


def optimizer(ppo: PPOConfig) -> optax.GradientTransformation:
    return optax.chain(optax.clip_by_global_norm(ppo.max_grad_norm), optax.adam(ppo.learning_rate))


class PPOTrainer:
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
        if not jax.tree.leaves(nnx.state(policy, trainable)):
            raise ValueError(f"the trainable filter {trainable!r} selects no variable of the policy")
        if reference is None:
            if not jax.tree.leaves(nnx.state(policy.lm, nnx.LoRAParam)):
                raise ValueError("reference=None means the policy with its LoRA adapters off, but the policy has no "
                                 "adapters: pass reference= (a frozen copy of the starting model)")
            if jax.tree.leaves(nnx.state(policy.lm, nnx.All(trainable, nnx.Not(nnx.LoRAParam)))):
                raise ValueError("reference=None (the policy with adapters off) needs the base weights frozen, but "
                                 f"the trainable filter {trainable!r} selects some; use "
                                 "maxmin_jax.trainable.trainable_filter(lora=True)")
        policy_def, params, rest = nnx.split(policy, trainable, ...)
        reward_def, reward_state = nnx.split(reward_model)
        reference_def, reference_state = nnx.split(reference) if reference is not None else (None, None)
        self.static = _Static(policy_def, reference_def, reward_def, objective, ppo, sampling)
        self.frozen = Frozen(rest, reference_state, reward_state, standardizer)
        self._initial_params = params

    @property
    def ppo(self) -> PPOConfig:
        return self.static.ppo

    @property
    def sampling(self) -> SamplingConfig:
        return self.static.sampling

    def init_state(self) -> PPOState:
        # A copy: the state is donated each step, and the initial weights may share buffers with the reference.
        params = jax.tree.map(jnp.copy, self._initial_params)
        num_groups = self.frozen.standardizer.mean.shape[0]
        state = PPOState(params, optimizer(self.ppo).init(params), kl_controller(self.ppo).init(),
                         self.static.objective.init(num_groups), jnp.zeros((), jnp.int32))
        # The small state (step, Adam count, KL beta, objective) is created on one device, but the iteration returns
        # it replicated over the weights' mesh: start it there, or the second call compiles the iteration again.
        return replicate_on_mesh_of(state, params)

    def policy(self, state: PPOState) -> PolicyWithValue:
        return nnx.merge(self.static.policy, state.trainable, self.frozen.policy_rest)

    def step(self, state: PPOState, prompts, prompt_mask, key) -> tuple[PPOState, dict]:
        """One PPO iteration on a batch of left-padded prompts. `state` is donated: use the returned one."""
        b = prompts.shape[0]
        if b % self.ppo.minibatches:
            raise ValueError(f"prompt batch {b} is not divisible by PPOConfig.minibatches={self.ppo.minibatches}")
        return _iteration(self.static, state, self.frozen, prompts, prompt_mask, key)


# The jitted body ----------------------------------------------------------------------------------------------
def _reference_logits(static: _Static, frozen: Frozen, policy: PolicyWithValue, seq, mask):
    if frozen.reference is None:
        return policy.lm(seq, mask, use_lora=False)
    return nnx.merge(static.reference, frozen.reference)(seq, mask)


@partial(jax.jit, static_argnums=0, donate_argnums=1)
def _iteration(static: _Static, state: PPOState, frozen: Frozen, prompts, prompt_mask, key):
    cfg, sampling = static.ppo, static.sampling
    tx, kl_control = optimizer(cfg), kl_controller(cfg)
    b, t = prompts.shape
    key_rollout, key_shuffle = jax.random.split(jax.random.fold_in(key, state.step))
    policy = nnx.merge(static.policy, state.trainable, frozen.policy_rest)
    rollout = sample_responses(policy.lm, prompts, prompt_mask, key_rollout, sampling)
    seq = jnp.concatenate([prompts, rollout.tokens], axis=1)
    seq_mask = jnp.concatenate([prompt_mask, rollout.mask], axis=1)
    mask = rollout.mask.astype(jnp.float32)
    tokens = rollout.tokens

    group_rewards = nnx.merge(static.reward, frozen.reward)(seq, seq_mask).astype(jnp.float32)
    standardized = frozen.standardizer.apply(group_rewards)
    score, weights, objective_state = static.objective.update(standardized, state.objective)

    def response_logits(logits):
        # Position i predicts token i+1: the response tokens are predicted from positions t-1 .. T-2.
        return logits[:, t - 1:-1]

    logits, values = policy(seq, seq_mask)
    sampled = sampling_logits(response_logits(logits), sampling)
    old_logprobs = token_logprobs(sampled, tokens)
    old_values = values[:, t - 1:-1]
    reference = response_logits(_reference_logits(static, frozen, policy, seq, seq_mask))
    ref_logprobs = token_logprobs(reference_sampling_logits(reference, sampled, sampling), tokens)
    old_logprobs, old_values, ref_logprobs = jax.lax.stop_gradient((old_logprobs, old_values, ref_logprobs))
    rewards = token_rewards(score, old_logprobs, ref_logprobs, mask, state.kl.beta, kind=cfg.kl_kind)
    advantages, returns = gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        advantages = whiten(advantages, mask)

    def loss_fn(trainable, idx):
        model = nnx.merge(static.policy, trainable, frozen.policy_rest)
        logits, values = model(seq[idx], seq_mask[idx])
        sampled = sampling_logits(response_logits(logits), sampling)
        logprobs = token_logprobs(sampled, tokens[idx])
        pg, pg_metrics = policy_loss(logprobs, old_logprobs[idx], advantages[idx], mask[idx], cfg.clip_eps)
        vf, vf_metrics = value_loss(values[:, t - 1:-1], old_values[idx], returns[idx], mask[idx], cfg.clip_value)
        entropy = masked_entropy(sampled, mask[idx])
        loss = pg + cfg.vf_coef * vf - cfg.entropy_coef * entropy
        return loss, {"policy_loss": pg, "value_loss": vf, "entropy": entropy, **pg_metrics, **vf_metrics}

    def minibatch_step(carry, idx):
        trainable, opt_state = carry
        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable, idx)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        metrics["grad_norm"] = optax.tree.norm(grads)
        return (optax.apply_updates(trainable, updates), opt_state), metrics

    per_minibatch = b // cfg.minibatches
    order = jnp.concatenate([jax.random.permutation(jax.random.fold_in(key_shuffle, e), b)
                             for e in range(cfg.epochs)]).reshape(cfg.epochs * cfg.minibatches, per_minibatch)
    (trainable, opt_state), update_metrics = jax.lax.scan(minibatch_step, (state.trainable, state.opt_state), order)
    sequence_kl = jnp.sum((old_logprobs - ref_logprobs) * mask, axis=1)
    kl_state = kl_control.update(sequence_kl.mean(), b, state.kl)
    metrics = {
        **{k: v.mean() for k, v in update_metrics.items()},
        "kl": sequence_kl.mean(), "beta": state.kl.beta, "score": score.mean(),
        "group_reward": group_rewards.mean(0), "group_reward_std": standardized.mean(0),
        "group_weights": weights, "response_length": mask.sum(1).mean(),
        "token_reward": masked_mean(rewards, mask),
        # The update's log-probs of the sampled tokens against the sampler's own: rounding only, unless the
        # two disagree on the distribution sampled from.
        "rollout_logprob_error": masked_mean(jnp.abs(old_logprobs - rollout.logprobs), mask),
    }
    metrics |= fault_flags(metrics, FAULT_LIMITS)  # checked on the host before the iteration is checkpointed
    return PPOState(trainable, opt_state, kl_state, objective_state, state.step + 1), metrics


__all__ = ["Frozen", "PPOState", "PPOTrainer", "optimizer"]
