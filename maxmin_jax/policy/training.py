"""What the policy trainers share (PPO, critic-free, offline), so each is written once.

- `split_policy`: the graph, the trainable variables (the `trainable` filter's selection) and the rest, with the
  checks every trainer makes (the filter selects something; a reference that is the policy with its adapters off
  needs adapters and frozen base weights). `split_online` adds the reward model and the reference for the online
  trainers (PPO, critic-free): their graphs, and the `Frozen` state their iteration reads; `OnlineTrainer` is
  their common interface (state, step, policy, lower).
- `make_optimizer` and `start_state`: Adam behind a global-norm clip, and the starting state placed exactly as the
  jitted step returns it (one compile).
- `rollout_and_score`: sample a response per prompt, score it by the K reward heads, standardise, apply the
  objective.
- `response_outputs` / `reference_logprobs`: log-probabilities of the sampled tokens under the distribution they
  were sampled from (`SamplingConfig`: temperature, top-k, top-p), and the reference's at the same temperature on
  the policy's top-k / top-p set. The LM head is applied to the response positions only: over a 32k-128k vocabulary
  the logits are the largest activations, and the prompt's are never read.
- `minibatch_updates`: `epochs x minibatches` optimiser steps over shuffled rows, in one `lax.scan`, with the
  update's KL early stop.
- `flag_faults` (in the jitted step) and `check_step` (on the host, before a checkpoint): a non-finite or exploding
  loss, gradient norm or KL stops training with `NumericalFault`, the same way in every trainer.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from maxmin_jax.errors import ConfigError
from maxmin_jax.generate import SamplingConfig, reference_sampling_logits, sample_responses, sampling_logits
from maxmin_jax.guards import GRAD_NORM_LIMIT, KL_LIMIT, LOSS_LIMIT, fault_flags, raise_on_fault
from maxmin_jax.models.transformer import CausalLM
from maxmin_jax.policy.objectives import Objective, ObjectiveState, RewardStandardizer
from maxmin_jax.policy.ppo import token_logprobs
from maxmin_jax.sharding import canonical_shardings, replicate_on_mesh_of


# Building a trainer ---------------------------------------------------------------------------------------------
def split_policy(policy: nnx.Module, trainable: nnx.filterlib.Filter, *, adapters_off_reference: bool
                 ) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graphdef, trainable variables, the rest) of `policy`, after checking that `trainable` selects something and,
    when the reference is to be the policy with its adapters off, that there are adapters and the base weights stay
    out of the selection. `policy` is a causal LM, or a module holding one as `.lm` (the PPO policy)."""
    if not jax.tree.leaves(nnx.state(policy, trainable)):
        raise ConfigError(f"the trainable filter {trainable!r} selects no variable of the policy", key="trainable")
    if adapters_off_reference:
        lm = getattr(policy, "lm", policy)
        if not jax.tree.leaves(nnx.state(lm, nnx.LoRAParam)):
            raise ConfigError("reference=None means the policy with its LoRA adapters off, but the policy has no "
                              "adapters: pass reference= (a frozen copy of the starting model)", key="reference")
        if jax.tree.leaves(nnx.state(lm, nnx.All(trainable, nnx.Not(nnx.LoRAParam)))):
            raise ConfigError("reference=None (the policy with adapters off) needs the base weights frozen, but "
                              f"the trainable filter {trainable!r} selects some; use "
                              "maxmin_jax.trainable.trainable_filter(lora=True)", key="trainable")
    return nnx.split(policy, trainable, ...)


class Frozen(NamedTuple):
    """What an online trainer's jitted iteration reads and never updates."""

    policy_rest: nnx.State  # the policy's variables outside the trainable selection (the base weights under LoRA)
    reference: nnx.State | None  # a separate reference model; None: the policy with adapters off (or no KL term)
    reward: nnx.State
    standardizer: RewardStandardizer


class OnlineParts(NamedTuple):
    """An online trainer's models taken apart: graph definitions (static), starting weights, frozen state."""

    policy_def: nnx.GraphDef
    reference_def: nnx.GraphDef | None
    reward_def: nnx.GraphDef
    params: nnx.State
    frozen: Frozen


def split_online(policy: nnx.Module, reward_model: nnx.Module, standardizer: RewardStandardizer, *,
                 reference: nnx.Module | None, trainable: nnx.filterlib.Filter, uses_reference: bool = True
                 ) -> OnlineParts:
    """The parts PPO and the critic-free trainers share. `uses_reference=False` (no KL term) keeps no reference at
    all; otherwise `reference=None` means the policy with its adapters off (`split_policy` checks that it can)."""
    policy_def, params, rest = split_policy(policy, trainable, adapters_off_reference=reference is None
                                            and uses_reference)
    reward_def, reward_state = nnx.split(reward_model)
    reference_def, reference_state = (nnx.split(reference) if reference is not None and uses_reference
                                      else (None, None))
    return OnlineParts(policy_def, reference_def, reward_def, params,
                       Frozen(rest, reference_state, reward_state, standardizer))


class OnlineTrainer:
    """What the online trainers (PPO, critic-free) share: `init_state()`, `step(state, prompts, prompt_mask, key) ->
    (state, metrics)` with `state` donated, `policy(state)`, `lower(...)` (the compiled step's memory). A subclass
    builds its hashable `static` (graph definitions from `split_online`, configs) and provides `iteration` (its
    jitted step, called `(static, state, frozen, prompts, prompt_mask, key)`), `initial_state(params, num_groups)`
    and `check_batch(prompts)`."""

    iteration: Callable

    def __init__(self, static: Any, parts: OnlineParts):
        self.static, self.frozen, self._initial_params = static, parts.frozen, parts.params

    @property
    def sampling(self) -> SamplingConfig:
        return self.static.sampling

    def initial_state(self, params: nnx.State, num_groups: int) -> Any:
        raise NotImplementedError

    def check_batch(self, prompts: jax.Array) -> None:
        raise NotImplementedError

    def init_state(self) -> Any:
        # A copy: each step donates its state, and the starting weights may share buffers with the reference.
        params = jax.tree.map(jnp.copy, self._initial_params)
        return start_state(self.initial_state(params, self.frozen.standardizer.mean.shape[0]), params)

    def policy(self, state) -> nnx.Module:
        return nnx.merge(self.static.policy, state.trainable, self.frozen.policy_rest)

    def lower(self, state, prompts, prompt_mask, key) -> jax.stages.Lowered:
        """The jitted step lowered for these arguments: `.compile()` gives the executable (called with `state,
        trainer.frozen` and the inputs), whose `memory_analysis()` is what the step holds."""
        return self.iteration.lower(self.static, state, self.frozen, prompts, prompt_mask, key)

    def step(self, state, prompts, prompt_mask, key) -> tuple[Any, dict]:
        """One iteration on a batch of left-padded prompts. `state` is donated: use the returned one."""
        self.check_batch(prompts)
        return self.iteration(self.static, state, self.frozen, prompts, prompt_mask, key)


def make_optimizer(learning_rate: float, max_grad_norm: float | None) -> optax.GradientTransformation:
    """Adam after clipping the global gradient norm (None: no clipping)."""
    clip = optax.identity() if max_grad_norm is None else optax.clip_by_global_norm(max_grad_norm)
    return optax.chain(clip, optax.adam(learning_rate))


def start_state(state: Any, params: Any) -> Any:
    """A trainer's starting state, placed as its jitted step returns it: the small parts (step, Adam count,
    objective) replicated over the weights' mesh, every sharding spelled as a compiled program spells its outputs'.
    Otherwise the second step, called with the first's output, would compile the step again."""
    return canonical_shardings(replicate_on_mesh_of(state, params))


# Inside the jitted steps ------------------------------------------------------------------------------------------
class ScoredRollout(NamedTuple):
    seq: jax.Array  # [B, T + N] prompt then response
    seq_mask: jax.Array  # [B, T + N]
    tokens: jax.Array  # [B, N] the response tokens
    mask: jax.Array  # [B, N] float32, 1 up to and including EOS
    sampler_logprobs: jax.Array  # [B, N] the sampler's own log-probs (for the rounding check)
    group_rewards: jax.Array  # [B, K] raw
    standardized: jax.Array  # [B, K]
    score: jax.Array  # [B] the objective's reward
    weights: jax.Array  # [K] the objective's group weights
    objective: ObjectiveState


def rollout_and_score(lm: CausalLM, prompts, prompt_mask, key, sampling: SamplingConfig, reward: nnx.Module,
                      standardizer: RewardStandardizer, objective: Objective, objective_state: ObjectiveState
                      ) -> ScoredRollout:
    """One response per left-padded prompt, scored by the K reward heads and turned into one reward per response by
    the objective. Traceable."""
    rollout = sample_responses(lm, prompts, prompt_mask, key, sampling)
    seq = jnp.concatenate([prompts, rollout.tokens], axis=1)
    seq_mask = jnp.concatenate([prompt_mask, rollout.mask], axis=1)
    group_rewards = reward(seq, seq_mask).astype(jnp.float32)
    standardized = standardizer.apply(group_rewards)
    score, weights, objective_state = objective.update(standardized, objective_state)
    return ScoredRollout(seq, seq_mask, rollout.tokens, rollout.mask.astype(jnp.float32), rollout.logprobs,
                         group_rewards, standardized, score, weights, objective_state)


class ResponseOutputs(NamedTuple):
    logprobs: jax.Array  # [B, N] of the response tokens under the sampling distribution
    logits: jax.Array  # [B, N, V] the sampling distribution's logits (tempered, top-k / top-p restricted)
    hidden: jax.Array  # [B, N, D] the final hidden states at the positions predicting the response tokens


def response_outputs(lm: CausalLM, seq, seq_mask, tokens, sampling: SamplingConfig, *, use_lora: bool = True
                     ) -> ResponseOutputs:
    """The policy's log-probs of the response `tokens` (the last N of `seq`) under `sampling`'s distribution, the LM
    head applied only where it predicts them: position i predicts token i + 1, so positions T - 1 .. T + N - 2."""
    n = tokens.shape[1]
    hidden = lm.hidden_states(seq, seq_mask, use_lora=use_lora)[:, -n - 1:-1]
    logits = sampling_logits(lm.logits(hidden), sampling)
    return ResponseOutputs(token_logprobs(logits, tokens), logits, hidden)


def reference_logprobs(reference: CausalLM | None, policy: CausalLM, seq, seq_mask, tokens, policy_logits,
                       sampling: SamplingConfig) -> jax.Array:
    """The reference's log-probs of the response tokens at the sampling temperature, restricted to the tokens the
    policy can sample (`reference_sampling_logits`; `policy_logits` are `response_outputs(...).logits`, needed only
    under top-k or top-p sampling), under `stop_gradient`. `reference=None`: the policy with its adapters off."""
    lm, use_lora = (policy, False) if reference is None else (reference, True)
    n = tokens.shape[1]
    hidden = lm.hidden_states(seq, seq_mask, use_lora=use_lora)[:, -n - 1:-1]
    logits = reference_sampling_logits(lm.logits(hidden), policy_logits, sampling)
    return jax.lax.stop_gradient(token_logprobs(logits, tokens))


def minibatch_updates(loss_fn: Callable[[Any, jax.Array], tuple[jax.Array, dict]],
                      tx: optax.GradientTransformation, trainable: Any, opt_state: Any, key, *, rows: int,
                      epochs: int, minibatches: int, early_stop_kl: float | None = None) -> tuple[Any, Any, dict]:
    """`epochs` passes over `rows` rows in `minibatches` shuffled minibatches: one optimiser step each on
    `loss_fn(trainable, row_indices) -> (loss, metrics)`, in one `lax.scan`. Returns the trained variables, the
    optimiser state and each metric's mean over the steps taken, with `grad_norm` (before clipping) added.

    `early_stop_kl` (the update's KL early stop; None: off): each step's forward pass measures `approx_kl` (a metric
    `loss_fn` must report: KL(rollout policy || policy as it stands) per token, on the step's minibatch), which is
    the effect of the steps before it. When it exceeds `early_stop_kl`, the step before went too far: the variables
    and the optimiser state go back to before that step and the remaining steps are skipped. The last step's effect
    is measured the same way after the scan (one forward pass on the first minibatch), so no step's jump goes
    unmeasured into the next rollout. Costs one forward pass and one copy of the trainable variables and the
    optimiser state. Adds `update_steps` (optimiser steps kept) and `approx_kl_max` (the largest KL measured, the
    one after the last step included)."""
    order = jnp.concatenate([jax.random.permutation(jax.random.fold_in(key, e), rows)
                             for e in range(epochs)]).reshape(epochs * minibatches, rows // minibatches)

    def grad_step(trainable, opt_state, idx):
        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable, idx)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        metrics["grad_norm"] = optax.tree.norm(grads)
        return optax.apply_updates(trainable, updates), opt_state, metrics

    if early_stop_kl is None:
        def step(carry, idx):
            trainable, opt_state, metrics = grad_step(*carry, idx)
            return (trainable, opt_state), metrics

        (trainable, opt_state), metrics = jax.lax.scan(step, (trainable, opt_state), order)
        return trainable, opt_state, {k: v.mean() for k, v in metrics.items()}

    def select(take_first, a, b):
        return jax.tree.map(lambda x, y: jnp.where(take_first, x, y), a, b)

    def measured_step(carry, idx):
        current, before, kept, _ = carry  # `before`: the variables and optimiser state before the last kept step
        trainable, opt_state, metrics = grad_step(*current, idx)
        over = ~(metrics["approx_kl"] <= early_stop_kl)  # a non-finite KL is past any limit
        carry = (select(over, before, (trainable, opt_state)), select(over, before, current),
                 jnp.where(over, jnp.maximum(kept - 1, 0), kept + 1), over)
        return carry, (metrics, jnp.ones((), bool))

    metrics_shape = jax.eval_shape(lambda: grad_step(trainable, opt_state, order[0])[2])

    def skipped_step(carry, idx):
        return carry, (jax.tree.map(lambda m: jnp.zeros(m.shape, m.dtype), metrics_shape), jnp.zeros((), bool))

    def step(carry, idx):
        return jax.lax.cond(carry[3], skipped_step, measured_step, carry, idx)

    start = ((trainable, opt_state), (trainable, opt_state), jnp.zeros((), jnp.int32), jnp.zeros((), bool))
    (current, before, kept, stopped), (metrics, taken) = jax.lax.scan(step, start, order)

    def last_step_kl(current, before, kept):  # the last step's own effect
        kl = loss_fn(current[0], order[0])[1]["approx_kl"]
        over = ~(kl <= early_stop_kl)
        return select(over, before, current), jnp.where(over, jnp.maximum(kept - 1, 0), kept), kl

    current, kept, final_kl = jax.lax.cond(
        stopped, lambda c, b, k: (c, k, jnp.zeros((), jnp.float32)), last_step_kl, current, before, kept)
    weights = taken.astype(jnp.float32)
    means = {k: jnp.tensordot(weights, v, axes=1) / jnp.maximum(weights.sum(), 1.0) for k, v in metrics.items()}
    means["approx_kl_max"] = jnp.maximum(jnp.max(jnp.where(taken, metrics["approx_kl"], 0.0)), final_kl)
    means["update_steps"] = kept.astype(jnp.float32)
    return *current, means

# Numerical faults -----------------------------------------------------------------------------------------------
FAULT_LIMITS: dict[str, float | None] = {
    "loss": LOSS_LIMIT, "policy_loss": LOSS_LIMIT, "value_loss": LOSS_LIMIT, "group_loss": LOSS_LIMIT,
    "grad_norm": GRAD_NORM_LIMIT, "kl": KL_LIMIT, "approx_kl": KL_LIMIT, "score": None}
"""What stops a diverged policy run, whichever of these a trainer reports: losses, the gradient norm (before
clipping) and the KLs (to the reference; the update's approximate KL) beyond their limits, or any of them (or the
reward score) not finite."""


def flag_faults(metrics: dict) -> dict:
    """The `fault/...` flags (`maxmin_jax.guards`) of the metrics in `FAULT_LIMITS` a step reports. Jittable."""
    return fault_flags(metrics, {k: v for k, v in FAULT_LIMITS.items() if k in metrics})


def check_step(metrics: dict, *, where: str, step: int, last_good_step: int | None = None,
               checkpoints: str | None = None, learning_rate: str = "learning_rate") -> None:
    """Raises `NumericalFault` if a step's (host) metrics carry a raised fault flag, naming the quantity, the step,
    the last good checkpoint and the learning-rate option `learning_rate`. Call it before checkpointing the step."""
    from maxmin_jax.errors import option

    raise_on_fault(metrics, where=where, step=step, last_good_step=last_good_step, limits=FAULT_LIMITS,
                   checkpoints=checkpoints,
                   hint=f"lower the learning rate ({option(learning_rate)}), or check the rewards and the data")


__all__ = ["FAULT_LIMITS", "Frozen", "OnlineParts", "OnlineTrainer", "ResponseOutputs", "ScoredRollout", "check_step", "flag_faults",
           "make_optimizer", "minibatch_updates", "reference_logprobs", "response_outputs",
           "rollout_and_score", "split_online", "split_policy", "start_state"]
