"""One jitted PPO iteration: rollout -> score by the K reward heads -> objective -> advantages -> update.

The iteration is a pure function `(state, frozen, prompts, prompt_mask, key) -> (state, metrics)`, compiled once
and with the state donated; the frozen parts (reference, reward model, standardiser) are passed as arguments, not
closed over, so they are not baked into the program as constants.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from maxmin_jax.generate import SamplingConfig, eos_array, sample_continuations, sampling_config
from maxmin_jax.models.transformer import CausalLM
from maxmin_jax.policy.model import PolicyWithValue, ValueParam
from maxmin_jax.policy.objectives import Objective, ObjectiveState, RewardStandardizer
from maxmin_jax.policy.ppo import (KLControllerState, PPOConfig, gae, kl_controller, masked_entropy, masked_mean,
                                   policy_loss, token_logprobs, token_rewards, value_loss, whiten)
from maxmin_jax.sharding import replicate_on_mesh_of


@dataclasses.dataclass(frozen=True, kw_only=True)
class RolloutConfig:
    """How the policy samples responses during training."""

    max_new_tokens: int = 32
    """Response length budget (tokens), EOS included."""
    temperature: float = 1.0
    """Sampling temperature; PPO's ratios assume 1 (the policy's own distribution)."""
    top_k: int | None = None
    """Restrict sampling to the k most likely tokens (None: no restriction)."""
    top_p: float | None = None
    """Nucleus sampling mass (None: no restriction)."""
    eos_token_id: int | tuple[int, ...] | None = None
    """Token id(s) that end a response."""
    pad_token_id: int = 0
    """Written after EOS."""

    @property
    def sampling(self) -> SamplingConfig:
        return sampling_config(self.temperature, self.top_k, self.top_p)


class PPOState(NamedTuple):
    trainable: nnx.State  # policy parameters being optimised (all, or LoRA adapters + value head)
    opt_state: Any
    kl: KLControllerState
    objective: ObjectiveState
    step: jax.Array


class Frozen(NamedTuple):
    policy_rest: nnx.State  # the policy's non-trainable variables (the base weights under LoRA)
    reference: nnx.State | None  # a separate reference model; None means the policy with adapters off
    reward: nnx.State
    standardizer: RewardStandardizer


class PPOTrainer:
    """PPO on the reward chosen by a social-choice `objective` over the K group rewards of `reward_model`.

    `reward_model(ids, mask) -> [B, K]` is any NNX module (the EM mixture; K=1 for the `single` baseline).
    With `lora=True` only LoRA adapters and the value head train, and the reference is the same weights with
    the adapters off, so policy and reference share one copy of the base model.
    """

    def __init__(self, policy: PolicyWithValue, reward_model: nnx.Module, objective: Objective,
                 standardizer: RewardStandardizer, *, reference: CausalLM | None = None, ppo: PPOConfig = PPOConfig(),
                 rollout: RolloutConfig = RolloutConfig(), lora: bool = False):
        if reference is None and not lora:
            raise ValueError("PPOTrainer needs a reference model unless lora=True (adapters off = reference)")
        self.ppo, self.rollout, self.objective = ppo, rollout, objective
        trainable = nnx.Any(nnx.LoRAParam, ValueParam) if lora else nnx.Param
        self.policy_graphdef, params, rest = nnx.split(policy, trainable, ...)
        self.reward_graphdef, reward_state = nnx.split(reward_model)
        ref_state = None
        if reference is not None:
            self.reference_graphdef, ref_state = nnx.split(reference)
        self.frozen = Frozen(rest, ref_state, reward_state, standardizer)
        self.tx = optax.chain(optax.clip_by_global_norm(ppo.max_grad_norm), optax.adam(ppo.learning_rate))
        self.kl_control = kl_controller(ppo)
        self._initial_params = params
        self._iteration = jax.jit(self._iteration_impl, donate_argnums=0)

    def init_state(self) -> PPOState:
        # A copy: the state is donated each step, and the initial weights may share buffers with the reference.
        params = jax.tree.map(jnp.copy, self._initial_params)
        num_groups = self.frozen.standardizer.mean.shape[0]
        state = PPOState(params, self.tx.init(params), self.kl_control.init(), self.objective.init(num_groups),
                         jnp.zeros((), jnp.int32))
        # The small state (step, Adam count, KL beta, objective) is created on one device, but the iteration returns
        # it replicated over the weights' mesh: start it there, or the second call compiles the iteration again.
        return replicate_on_mesh_of(state, params)

    def policy(self, state: PPOState) -> PolicyWithValue:
        return nnx.merge(self.policy_graphdef, state.trainable, self.frozen.policy_rest)

    def step(self, state: PPOState, prompts, prompt_mask, key) -> tuple[PPOState, dict]:
        """One PPO iteration on a batch of left-padded prompts. `state` is donated: use the returned one."""
        b = prompts.shape[0]
        if b % self.ppo.minibatches:
            raise ValueError(f"prompt batch {b} is not divisible by PPOConfig.minibatches={self.ppo.minibatches}")
        return self._iteration(state, self.frozen, prompts, prompt_mask, key)

    # The jitted body ----------------------------------------------------------------------------------------
    def _reference_logits(self, frozen: Frozen, policy: PolicyWithValue, seq, mask):
        if frozen.reference is None:
            return policy.lm(seq, mask, use_lora=False)
        return nnx.merge(self.reference_graphdef, frozen.reference)(seq, mask)

    def _iteration_impl(self, state: PPOState, frozen: Frozen, prompts, prompt_mask, key):
        cfg, roll = self.ppo, self.rollout
        b, t = prompts.shape
        key_rollout, key_shuffle = jax.random.split(jax.random.fold_in(key, state.step))
        policy = nnx.merge(self.policy_graphdef, state.trainable, frozen.policy_rest)
        rollout = sample_continuations(policy.lm, prompts, prompt_mask, key_rollout,
                                       max_new_tokens=roll.max_new_tokens, cfg=roll.sampling,
                                       temperature=roll.temperature or 1.0, top_p=roll.top_p or 1.0,
                                       eos_ids=eos_array(roll.eos_token_id), pad_token_id=roll.pad_token_id)
        seq = jnp.concatenate([prompts, rollout.tokens], axis=1)
        seq_mask = jnp.concatenate([prompt_mask, rollout.mask], axis=1)
        mask = rollout.mask.astype(jnp.float32)
        tokens = rollout.tokens

        group_rewards = nnx.merge(self.reward_graphdef, frozen.reward)(seq, seq_mask).astype(jnp.float32)
        standardized = frozen.standardizer.apply(group_rewards)
        score, weights, objective_state = self.objective.update(standardized, state.objective)

        def response_view(logits, values=None):
            # Position i predicts token i+1: the response tokens are predicted from positions t-1 .. T-2.
            lp = token_logprobs(logits[:, t - 1:-1], tokens)
            return lp if values is None else (lp, values[:, t - 1:-1])

        logits, values = policy(seq, seq_mask)
        old_logprobs, old_values = response_view(logits, values)
        ref_logprobs = response_view(self._reference_logits(frozen, policy, seq, seq_mask))
        old_logprobs, old_values, ref_logprobs = jax.lax.stop_gradient((old_logprobs, old_values, ref_logprobs))
        rewards = token_rewards(score, old_logprobs, ref_logprobs, mask, state.kl.beta, kind=cfg.kl_kind)
        advantages, returns = gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            advantages = whiten(advantages, mask)

        def loss_fn(trainable, idx):
            model = nnx.merge(self.policy_graphdef, trainable, frozen.policy_rest)
            logits, values = model(seq[idx], seq_mask[idx])
            logprobs = token_logprobs(logits[:, t - 1:-1], tokens[idx])
            pg, pg_metrics = policy_loss(logprobs, old_logprobs[idx], advantages[idx], mask[idx], cfg.clip_eps)
            vf, vf_metrics = value_loss(values[:, t - 1:-1], old_values[idx], returns[idx], mask[idx],
                                        cfg.clip_value)
            entropy = masked_entropy(logits[:, t - 1:-1], mask[idx])
            loss = pg + cfg.vf_coef * vf - cfg.entropy_coef * entropy
            return loss, {"policy_loss": pg, "value_loss": vf, "entropy": entropy, **pg_metrics, **vf_metrics}

        def minibatch_step(carry, idx):
            trainable, opt_state = carry
            (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable, idx)
            updates, opt_state = self.tx.update(grads, opt_state, trainable)
            metrics["grad_norm"] = optax.tree.norm(grads)
            return (optax.apply_updates(trainable, updates), opt_state), metrics

        per_minibatch = b // cfg.minibatches
        order = jnp.concatenate([jax.random.permutation(jax.random.fold_in(key_shuffle, e), b)
                                 for e in range(cfg.epochs)]).reshape(cfg.epochs * cfg.minibatches, per_minibatch)
        (trainable, opt_state), update_metrics = jax.lax.scan(minibatch_step, (state.trainable, state.opt_state),
                                                              order)
        sequence_kl = jnp.sum((old_logprobs - ref_logprobs) * mask, axis=1)
        kl_state = self.kl_control.update(sequence_kl.mean(), b, state.kl)
        metrics = {
            **{k: v.mean() for k, v in update_metrics.items()},
            "kl": sequence_kl.mean(), "beta": state.kl.beta, "score": score.mean(),
            "group_reward": group_rewards.mean(0), "group_reward_std": standardized.mean(0),
            "group_weights": weights, "response_length": mask.sum(1).mean(),
            "token_reward": masked_mean(rewards, mask),
        }
        new_state = PPOState(trainable, opt_state, kl_state, objective_state, state.step + 1)
        return new_state, metrics
