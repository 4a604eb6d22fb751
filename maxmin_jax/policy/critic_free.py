"""Critic-free policy optimisation (GRPO, Dr.GRPO, RLOO) on the reward a social-choice objective chooses.

One jitted iteration, a pure function `(state, frozen, prompts, prompt_mask, key) -> (state, metrics)` like PPO's:
each prompt is repeated G times (`estimator.group_size`), the policy samples a response for every copy, the K reward
heads score them, the objective turns the [B, K] group rewards into one reward per response, the estimator compares
each response with the other samples of its prompt, and minibatch epochs of the clipped policy-gradient loss, with a
KL penalty to the reference inside the loss, update the policy. No value head is built or trained: the policy is the
language model itself. The frozen parts (base weights under LoRA, reference, reward model, standardiser) are
arguments, not closures, so they are not baked into the program as constants; the state is donated. Every pass
applies the LM head to the response positions only: over a vocabulary of 50k-128k the logits are the largest
activations, and the prompt's are never read.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from maxmin_jax import validate
from maxmin_jax.errors import ConfigError
from maxmin_jax.generate import eos_array, sample_continuations
from maxmin_jax.guards import GRAD_NORM_LIMIT, KL_LIMIT, LOSS_LIMIT, fault_flags
from maxmin_jax.models.transformer import CausalLM
from maxmin_jax.policy.advantages import LOSS_KL_KINDS, Estimator, group_view, policy_gradient_loss
from maxmin_jax.policy.objectives import Objective, ObjectiveState, RewardStandardizer
from maxmin_jax.policy.ppo import masked_entropy, terminal_rewards, token_logprobs
from maxmin_jax.policy.trainer import RolloutConfig
from maxmin_jax.sharding import replicate_on_mesh_of


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

    def __post_init__(self):
        validate.check_optimizer(self)
        validate.positive(self, "clip_eps")
        validate.non_negative(self, "kl_coef", "entropy_coef")
        validate.positive_int(self, "epochs", "minibatches")
        if self.kl_kind not in LOSS_KL_KINDS:
            raise ConfigError(f"CriticFreeConfig.kl_kind must be one of {LOSS_KL_KINDS}, got {self.kl_kind!r} "
                              "(k1 = logp - ref_logp has a zero-mean gradient as a loss term)", key="kl_kind")

    @property
    def single_pass(self) -> bool:
        return self.epochs == 1 and self.minibatches == 1


class CriticFreeState(NamedTuple):
    trainable: nnx.State  # policy parameters being optimised (all, or the LoRA adapters)
    opt_state: Any
    objective: ObjectiveState
    step: jax.Array


class CriticFreeFrozen(NamedTuple):
    policy_rest: nnx.State  # the policy's non-trainable variables (the base weights under LoRA)
    reference: nnx.State | None  # a separate reference model; None means the policy with adapters off
    reward: nnx.State
    standardizer: RewardStandardizer


class CriticFreeSpec(NamedTuple):
    """The static half of the iteration: module structures, the algorithm's pieces and its configuration."""

    policy_graphdef: Any
    reference_graphdef: Any  # None when the reference is the policy with adapters off
    reward_graphdef: Any
    objective: Objective
    estimator: Estimator
    config: CriticFreeConfig
    rollout: RolloutConfig
    tx: optax.GradientTransformation


def critic_free_iteration(spec: CriticFreeSpec, state: CriticFreeState, frozen: CriticFreeFrozen, prompts,
                          prompt_mask, key) -> tuple[CriticFreeState, dict]:
    """One iteration on P left-padded prompts: P x G responses sampled, scored and learned from. Traceable (the
    trainer jits it with `spec` closed over and the state donated)."""
    cfg, roll, group_size = spec.config, spec.rollout, spec.estimator.group_size
    t = prompts.shape[1]
    key_rollout, key_shuffle = jax.random.split(jax.random.fold_in(key, state.step))
    # Row p * G + g is sample g of prompt p: the layout the estimator's group view expects.
    prompts, prompt_mask = jnp.repeat(prompts, group_size, axis=0), jnp.repeat(prompt_mask, group_size, axis=0)
    b = prompts.shape[0]
    policy = nnx.merge(spec.policy_graphdef, state.trainable, frozen.policy_rest)
    rollout = sample_continuations(policy, prompts, prompt_mask, key_rollout, max_new_tokens=roll.max_new_tokens,
                                   cfg=roll.sampling, temperature=roll.temperature, top_p=roll.top_p or 1.0,
                                   eos_ids=eos_array(roll.eos_token_id), pad_token_id=roll.pad_token_id)
    seq = jnp.concatenate([prompts, rollout.tokens], axis=1)
    seq_mask = jnp.concatenate([prompt_mask, rollout.mask], axis=1)
    mask = rollout.mask.astype(jnp.float32)
    tokens = rollout.tokens

    group_rewards = nnx.merge(spec.reward_graphdef, frozen.reward)(seq, seq_mask).astype(jnp.float32)
    standardized = frozen.standardizer.apply(group_rewards)
    score, weights, objective_state = spec.objective.update(standardized, state.objective)
    advantages, _ = spec.estimator.estimate(terminal_rewards(score, mask), mask)

    def response_logprobs(model, rows, use_lora=True):
        """Log-probs of the response tokens (and their logits), the LM head applied to the positions predicting
        them only: position i predicts token i + 1, so the response is predicted from positions t - 1 .. T - 2."""
        hidden = model.hidden_states(seq[rows], seq_mask[rows], use_lora=use_lora)
        logits = model.logits(hidden[:, t - 1:-1])
        return token_logprobs(logits, tokens[rows]), logits

    everything = jnp.arange(b)
    ref_logprobs = None
    if cfg.kl_coef > 0:
        if frozen.reference is None:  # LoRA: the base weights are the reference
            ref_logprobs, _ = response_logprobs(policy, everything, use_lora=False)
        else:
            ref_logprobs, _ = response_logprobs(nnx.merge(spec.reference_graphdef, frozen.reference), everything)
        ref_logprobs = jax.lax.stop_gradient(ref_logprobs)
    # The sampling policy's log-probs, by teacher forcing (bit-identical numerics to the update's); when the update
    # is one on-policy pass they are the update's own, taken inside the loss.
    old_logprobs = None if cfg.single_pass else jax.lax.stop_gradient(response_logprobs(policy, everything)[0])

    def loss_fn(trainable, rows):
        model = nnx.merge(spec.policy_graphdef, trainable, frozen.policy_rest)
        logprobs, logits = response_logprobs(model, rows)
        old = jax.lax.stop_gradient(logprobs) if old_logprobs is None else old_logprobs[rows]
        loss, metrics = policy_gradient_loss(
            logprobs, old, advantages[rows], mask[rows], normalization=spec.estimator.loss_normalization,
            clip_eps=cfg.clip_eps, ref_logprobs=None if ref_logprobs is None else ref_logprobs[rows],
            kl_coef=cfg.kl_coef, kl_kind=cfg.kl_kind)
        entropy = masked_entropy(logits, mask[rows])
        metrics = {**metrics, "entropy": entropy, "loss": loss}
        if ref_logprobs is not None:  # the sequence KL of the policy being updated (the sampling one in one pass)
            metrics["kl"] = jnp.sum((old - ref_logprobs[rows]) * mask[rows], axis=1).mean()
        return loss - cfg.entropy_coef * entropy, metrics

    def minibatch_step(carry, rows):
        trainable, opt_state = carry
        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable, rows)
        updates, opt_state = spec.tx.update(grads, opt_state, trainable)
        metrics["grad_norm"] = optax.tree.norm(grads)
        return (optax.apply_updates(trainable, updates), opt_state), metrics

    order = jnp.concatenate([jax.random.permutation(jax.random.fold_in(key_shuffle, e), b)
                             for e in range(cfg.epochs)]).reshape(cfg.epochs * cfg.minibatches, -1)
    (trainable, opt_state), update_metrics = jax.lax.scan(minibatch_step, (state.trainable, state.opt_state), order)

    spread = jnp.std(group_view(score, group_size), axis=1)
    metrics = {
        **{k: v.mean() for k, v in update_metrics.items()},
        "score": score.mean(), "group_reward": group_rewards.mean(0), "group_reward_std": standardized.mean(0),
        "group_weights": weights, "response_length": mask.sum(1).mean(),
        "reward_spread": spread.mean(),  # mean within-prompt std of the reward: the signal the estimator sees
        "zero_spread_fraction": jnp.mean(spread == 0),  # prompts whose G samples all scored alike: no gradient
    }
    if ref_logprobs is not None and old_logprobs is not None:  # several passes: the sampling policy's KL
        metrics["kl"] = jnp.sum((old_logprobs - ref_logprobs) * mask, axis=1).mean()
    limits = {"loss": LOSS_LIMIT, "grad_norm": GRAD_NORM_LIMIT} | ({"kl": KL_LIMIT} if "kl" in metrics else {})
    metrics |= fault_flags(metrics, limits)  # checked on the host (guards.raise_on_fault) before a checkpoint
    return CriticFreeState(trainable, opt_state, objective_state, state.step + 1), metrics


def canonical_shardings(tree):
    """Every array of `tree` with its NamedSharding spelled as a jitted program spells its outputs' (trailing
    unsplit dimensions dropped from the PartitionSpec). Equivalent shardings spelled differently are different
    cache keys: a state built eagerly and donated to a jitted step would otherwise compile the step twice."""

    def canonical(x):
        sharding = getattr(x, "sharding", None)
        if not isinstance(sharding, NamedSharding):
            return x
        spec = list(sharding.spec)
        while spec and spec[-1] is None:
            spec.pop()
        return jax.device_put(x, NamedSharding(sharding.mesh, P(*spec), memory_kind=sharding.memory_kind))

    return jax.tree.map(canonical, tree)


class CriticFreeTrainer:
    """Critic-free RL on the reward chosen by a social-choice `objective` over the K group rewards of
    `reward_model`, with the advantages of a critic-free `estimator` (grpo, dr_grpo, rloo).

    `policy` is the causal LM itself (no value head). `reward_model(ids, mask) -> [B, K]` is any NNX module (the EM
    mixture; K = 1 for the `single` baseline). With `lora=True` only the LoRA adapters train, and the reference is
    the same weights with the adapters off, so policy and reference share one copy of the base model.
    Interface as `PPOTrainer`: `init_state()`, `step(state, prompts, prompt_mask, key) -> (state, metrics)` with
    `prompts` [P, T] (each sampled G times), `policy(state)`.
    """

    def __init__(self, policy: CausalLM, reward_model: nnx.Module, objective: Objective,
                 standardizer: RewardStandardizer, *, estimator: Estimator, reference: CausalLM | None = None,
                 config: CriticFreeConfig = CriticFreeConfig(), rollout: RolloutConfig = RolloutConfig(),
                 lora: bool = False):
        if not isinstance(policy, CausalLM):
            raise TypeError(f"CriticFreeTrainer trains the language model itself (no value head); got "
                            f"{type(policy).__name__} (pass PolicyWithValue.lm)")
        if estimator.uses_critic:
            raise ConfigError(f"estimator {estimator.name!r} needs a critic: train it with PPOTrainer, or choose "
                              "grpo, dr_grpo or rloo", key="estimator")
        if rollout.temperature <= 0:
            raise ConfigError(f"critic-free estimators compare {estimator.group_size} samples of each prompt, "
                              f"which greedy decoding makes identical: RolloutConfig.temperature must be > 0, got "
                              f"{rollout.temperature}", key="temperature")
        if reference is None and not lora and config.kl_coef > 0:
            raise ConfigError("CriticFreeTrainer needs a reference model for its KL penalty unless lora=True "
                              "(adapters off = reference) or CriticFreeConfig.kl_coef=0", key="reference")
        self.config, self.rollout, self.objective, self.estimator = config, rollout, objective, estimator
        policy_graphdef, params, rest = nnx.split(policy, nnx.LoRAParam if lora else nnx.Param, ...)
        if not jax.tree.leaves(params):
            raise ConfigError("nothing to train: lora=True but the policy has no LoRA adapters (see models.lora)",
                              key="lora")
        reward_graphdef, reward_state = nnx.split(reward_model)
        reference_graphdef, ref_state = None, None
        if reference is not None and config.kl_coef > 0:
            reference_graphdef, ref_state = nnx.split(reference)
        self.frozen = CriticFreeFrozen(rest, ref_state, reward_state, standardizer)
        clip = optax.identity() if config.max_grad_norm is None else optax.clip_by_global_norm(config.max_grad_norm)
        tx = optax.chain(clip, optax.adam(config.learning_rate))
        self.spec = CriticFreeSpec(policy_graphdef, reference_graphdef, reward_graphdef, objective, estimator,
                                   config, rollout, tx)
        self._initial_params = params
        self._iteration = jax.jit(functools.partial(critic_free_iteration, self.spec), donate_argnums=0)

    def init_state(self) -> CriticFreeState:
        # A copy: the state is donated each step, and the initial weights may share buffers with the reference.
        params = jax.tree.map(jnp.copy, self._initial_params)
        num_groups = self.frozen.standardizer.mean.shape[0]
        state = CriticFreeState(params, self.spec.tx.init(params), self.objective.init(num_groups),
                                jnp.zeros((), jnp.int32))
        # Started where and as the iteration returns it: else the second call would compile the iteration again.
        return canonical_shardings(replicate_on_mesh_of(state, params))

    def policy(self, state: CriticFreeState) -> CausalLM:
        return nnx.merge(self.spec.policy_graphdef, state.trainable, self.frozen.policy_rest)

    def step(self, state: CriticFreeState, prompts, prompt_mask, key) -> tuple[CriticFreeState, dict]:
        """One iteration on a batch of P left-padded prompts (P x G responses). `state` is donated: use the
        returned one."""
        responses = prompts.shape[0] * self.estimator.group_size
        if responses % self.config.minibatches:
            raise ConfigError(f"{prompts.shape[0]} prompts x {self.estimator.group_size} samples = {responses} "
                              f"responses, not divisible by CriticFreeConfig.minibatches={self.config.minibatches}",
                              key="minibatches")
        return self._iteration(state, self.frozen, prompts, prompt_mask, key)
