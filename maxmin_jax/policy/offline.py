"""Offline egalitarian preference optimisation: DPO / IPO on the EM groups' pairs, one jitted, donated step.

    pairs = preference_pairs(pair_batch, pair_group_weights(pair_batch.user_index, assignments=em.assignments))
    pairs = with_reference_logprobs(reference_lm, pairs)             # once, before training
    trainer = PreferenceTrainer(policy_lm, make_objective("maxmin"), pairs.group_shares())
    state = trainer.init_state()
    state, metrics = trainer.step(state, pairs.take(indices))         # indices: e.g. data.batching.minibatches

The reference model's log-probs never change, so they are computed once and stored with the pairs; the step runs
the policy alone (no reference in memory while training). The losses and their aggregation over groups are in
`maxmin_jax.policy.preference` (signs and definitions there).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from maxmin_jax import validate
from maxmin_jax.data.batching import PairBatch
from maxmin_jax.errors import ConfigError, DataError, InputError
from maxmin_jax.models.transformer import CausalLM
from maxmin_jax.policy.objectives import Objective, ObjectiveState
from maxmin_jax.policy.preference import PREFERENCE_LOSSES, aggregate_group_losses, pair_losses, sequence_logprobs
from maxmin_jax.policy.training import flag_faults, make_optimizer, split_policy, start_state
from maxmin_jax.sharding import replicate_on_mesh_of, shard_batch


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PreferencePairs:
    """Tokenised preference pairs ready for DPO/IPO; a pytree of arrays with N leading rows.

    ids/mask: left padded, prompt + response + EOS, chosen and rejected of one pair sharing T. `*_response`: 1 on
    the response tokens whose log-probs count, always the last tokens of a row. `group_weights` [N, K]: how much
    each pair belongs to each group (one-hot rows for hard assignments, responsibilities for soft).
    `response_window` (static): the number of trailing columns that hold every response token of the data set; the
    LM head is applied there only. `ref_*` [N]: the reference's summed response log-probs, None until
    `with_reference_logprobs` fills them.
    """

    chosen_ids: Any
    chosen_mask: Any
    chosen_response: Any
    rejected_ids: Any
    rejected_mask: Any
    rejected_response: Any
    group_weights: Any
    response_window: int = dataclasses.field(metadata=dict(static=True))
    ref_chosen: Any = None
    ref_rejected: Any = None

    @property
    def num_pairs(self) -> int:
        return int(self.chosen_ids.shape[0])

    @property
    def num_groups(self) -> int:
        return int(self.group_weights.shape[1])

    def take(self, indices) -> PreferencePairs:
        """The pairs at `indices` (a minibatch); the response window stays the data set's (one compiled step)."""
        return jax.tree.map(lambda x: x[indices], self)

    def group_shares(self) -> np.ndarray:
        """p_k = mean_n w_nk: each group's share of the pairs (the normaliser of the group loss estimates)."""
        return np.asarray(self.group_weights, np.float32).mean(axis=0)


def pair_group_weights(user_index, *, assignments=None, responsibilities=None, num_groups: int | None = None
                       ) -> np.ndarray:
    """[N, K] group weights of N pairs from their users' EM result (`EMResult.assignments` / `.responsibilities`,
    rows following the pairs' `user_index`): one-hot rows from hard `assignments` [U] (K = `num_groups`, by default
    the largest assignment + 1), or the rows of the soft `responsibilities` [U, K]. Give exactly one of the two."""
    user_index = np.asarray(user_index)
    if (assignments is None) == (responsibilities is None):
        raise InputError("give exactly one of assignments (hard) or responsibilities (soft)")
    if responsibilities is not None:
        table = np.asarray(responsibilities, np.float32)
        if table.ndim != 2 or not np.isfinite(table).all() or (table < 0).any():
            raise DataError(f"responsibilities must be a finite non-negative [U, K] array, got shape {table.shape}")
        bad = np.flatnonzero(np.abs(table.sum(1) - 1) > 1e-3)
        if bad.size:
            raise DataError(f"responsibilities of user index {int(bad[0])} sum to {float(table[bad[0]].sum()):.4f}, "
                             "expected 1 (a distribution over groups)")
    else:
        assignments = np.asarray(assignments)
        k = int(assignments.max()) + 1 if num_groups is None else num_groups
        if assignments.ndim != 1 or (assignments < 0).any() or (assignments >= k).any():
            raise DataError(f"assignments must be a [U] array of group indices in [0, {k}), got {assignments!r}")
        table = np.eye(k, dtype=np.float32)[assignments]
    if user_index.size and (user_index.min() < 0 or user_index.max() >= table.shape[0]):
        raise DataError(f"user_index ranges over [{user_index.min()}, {user_index.max()}] but the EM result has "
                         f"{table.shape[0]} users")
    return table[user_index]


def response_masks(ids: np.ndarray, mask: np.ndarray, other_ids: np.ndarray, other_mask: np.ndarray,
                   prompt_lengths=None) -> np.ndarray:
    """[N, T] 1 on the response tokens of each left-padded sequence in `ids`: its real tokens after the first
    `prompt_lengths[n]`, or, without prompt lengths, after the longest prefix it shares with `other_ids` (its pair's
    other response; tokens of that prefix cancel exactly in DPO's margin, as both sides score them in the same
    context)."""
    n, t = ids.shape
    length, other_length = mask.sum(1), other_mask.sum(1)
    if prompt_lengths is None:
        col = np.arange(t)[None, :]
        left = np.take_along_axis(ids, np.minimum(col + (t - length)[:, None], t - 1), axis=1)  # left aligned
        other_left = np.take_along_axis(other_ids, np.minimum(col + (t - other_length)[:, None], t - 1), axis=1)
        same = (left == other_left) & (col < np.minimum(length, other_length)[:, None])
        prompt_lengths = np.cumprod(same, axis=1).sum(1)
    prompt_lengths = np.asarray(prompt_lengths)
    start = t - length + prompt_lengths  # first response column
    return ((np.arange(t)[None, :] >= start[:, None]) & (mask > 0)).astype(np.int32)


def preference_pairs(batch: PairBatch, group_weights, *, prompt_lengths=None) -> PreferencePairs:
    """PreferencePairs from tokenised pairs (`data.batching.tokenize_pairs`) and their [N, K] group weights.

    `prompt_lengths` [N]: prompt tokens at the start of both sequences of each pair (then IPO's token counts are
    the responses' own, as in TRL); by default the longest prefix chosen and rejected share (the prompt plus any
    leading response tokens they have in common, which change nothing in DPO).

    Raises ValueError naming the pair for weights of the wrong shape or negative, a pair whose responses are
    identical, a pair with no prompt token to condition on, or a group no pair belongs to.
    """
    n = batch.num_pairs
    weights = np.asarray(group_weights, np.float32)
    if weights.shape[:1] != (n,) or weights.ndim != 2 or not np.isfinite(weights).all() or (weights < 0).any():
        raise DataError(f"group_weights must be a finite non-negative [N={n}, K] array, got shape {weights.shape}")
    empty = np.flatnonzero(weights.sum(0) <= 0)
    if empty.size:
        raise DataError(f"group {int(empty[0])} has no pairs (its group weights are all 0): its loss is undefined")
    if prompt_lengths is not None:
        prompt_lengths = np.asarray(prompt_lengths)
        if prompt_lengths.shape != (n,):
            raise DataError(f"prompt_lengths must have shape [N={n}], got {prompt_lengths.shape}")
        shortest = np.minimum(batch.chosen_mask.sum(1), batch.rejected_mask.sum(1))
        bad = np.flatnonzero((prompt_lengths < 1) | (prompt_lengths >= shortest))
        if bad.size:
            raise DataError(f"pair index {int(bad[0])}: prompt length {int(prompt_lengths[bad[0]])}; expected at "
                            f"least 1 and below the shorter sequence's {int(shortest[bad[0]])} tokens")
    chosen = response_masks(batch.chosen_ids, batch.chosen_mask, batch.rejected_ids, batch.rejected_mask,
                            prompt_lengths)
    rejected = response_masks(batch.rejected_ids, batch.rejected_mask, batch.chosen_ids, batch.chosen_mask,
                              prompt_lengths)
    for name, resp, mask in (("chosen", chosen, batch.chosen_mask), ("rejected", rejected, batch.rejected_mask)):
        first = np.argmax(mask > 0, axis=1)
        no_prompt = np.flatnonzero(resp[np.arange(n), first] > 0)
        if no_prompt.size:
            raise DataError(f"pair index {int(no_prompt[0])}: the {name} response starts at the first token, with "
                            "no prompt to condition on (pass prompt_lengths >= 1)")
    identical = np.flatnonzero((chosen.sum(1) == 0) & (rejected.sum(1) == 0))
    if identical.size:
        raise DataError(f"pair index {int(identical[0])}: chosen and rejected are the same sequence (no preference)")
    window = int(max(chosen.sum(1).max(), rejected.sum(1).max()))
    return PreferencePairs(batch.chosen_ids, batch.chosen_mask, chosen, batch.rejected_ids, batch.rejected_mask,
                           rejected, weights, window)


def response_logprobs(lm: CausalLM, ids, mask, response, window: int, *, use_lora: bool = True) -> jax.Array:
    """`preference.sequence_logprobs` of the marked response tokens, the LM head applied only to the positions
    predicting the last `window` tokens (every marked token must lie there)."""
    hidden = lm.hidden_states(ids, mask, use_lora=use_lora)[:, -window - 1:]
    return sequence_logprobs(lm.logits(hidden), ids[:, -window - 1:], response[:, -window - 1:])


@functools.partial(jax.jit, static_argnames=("graphdef", "window", "use_lora"))
def _pair_logprobs(graphdef, state, chosen_ids, chosen_mask, chosen_response, rejected_ids, rejected_mask,
                   rejected_response, *, window: int, use_lora: bool):
    """Summed response log-probs of chosen and rejected, scored in one forward pass."""
    logprobs = response_logprobs(nnx.merge(graphdef, state), jnp.concatenate([chosen_ids, rejected_ids]),
                                 jnp.concatenate([chosen_mask, rejected_mask]),
                                 jnp.concatenate([chosen_response, rejected_response]), window, use_lora=use_lora)
    n = chosen_ids.shape[0]
    return logprobs[:n], logprobs[n:]


_SEQUENCE_FIELDS = ("chosen_ids", "chosen_mask", "chosen_response", "rejected_ids", "rejected_mask",
                    "rejected_response")


def with_reference_logprobs(reference: CausalLM, pairs: PreferencePairs, *, batch_size: int = 32,
                            use_lora: bool = False, mesh=None) -> PreferencePairs:
    """`pairs` with `ref_chosen`, `ref_rejected` filled by the reference model, in chunks of `batch_size` pairs
    (the last one wrapped around to full size, so one program serves every chunk). Under LoRA pass the policy
    itself with `use_lora=False`: the base weights are the reference. With a `mesh`, chunks are split over its
    batch axes."""
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}", key="batch_size")
    graphdef, state = nnx.split(reference)
    n = pairs.num_pairs
    order = np.resize(np.arange(n), -(-n // batch_size) * batch_size)
    arrays = [np.asarray(getattr(pairs, f)) for f in _SEQUENCE_FIELDS]
    scored = []
    for start in range(0, order.size, batch_size):
        chunk = [a[order[start:start + batch_size]] for a in arrays]
        # Dispatched without waiting: the next chunk is prepared while the device scores this one.
        scored.append(_pair_logprobs(graphdef, state, *(shard_batch(chunk, mesh) if mesh is not None else chunk),
                                     window=pairs.response_window, use_lora=use_lora))
    chosen, rejected = (np.concatenate([np.asarray(s[i]) for s in scored])[:n] for i in (0, 1))
    return dataclasses.replace(pairs, ref_chosen=chosen, ref_rejected=rejected)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PreferenceConfig:
    """Hyperparameters of offline preference optimisation (defaults follow TRL's DPOConfig)."""

    loss: str = "dpo"
    """Per-pair loss: "dpo" or "ipo"."""
    beta: float = 0.1
    """DPO: inverse temperature of the implicit reward beta * log-ratio. IPO: the regulariser tau (target margin
    1 / (2 beta))."""
    learning_rate: float = 1e-6
    """Adam learning rate."""
    max_grad_norm: float | None = 1.0
    """Global gradient-norm clip; None: no clipping."""

    def __post_init__(self):
        if self.loss not in PREFERENCE_LOSSES:
            raise ConfigError(f"PreferenceConfig.loss must be one of {PREFERENCE_LOSSES}, got {self.loss!r}",
                              key="loss")
        validate.check_optimizer(self)
        validate.positive(self, "beta")


class PreferenceState(NamedTuple):
    trainable: nnx.State
    opt_state: Any
    objective: ObjectiveState
    step: jax.Array


class PreferenceFrozen(NamedTuple):
    policy_rest: nnx.State  # the policy's non-trainable variables (the base weights under LoRA)
    group_shares: jax.Array  # [K] p_k


class _Static(NamedTuple):
    """Everything the compiled step depends on besides array values; hashable."""

    policy: nnx.GraphDef
    objective: Objective
    config: PreferenceConfig


@functools.partial(jax.jit, static_argnums=0, donate_argnums=1)
def _step(static: _Static, state: PreferenceState, frozen: PreferenceFrozen, batch: PreferencePairs
          ) -> tuple[PreferenceState, dict]:
    """One optimiser step on a minibatch of pairs (with reference log-probs)."""
    cfg = static.config
    tx = make_optimizer(cfg.learning_rate, cfg.max_grad_norm)
    n = batch.chosen_ids.shape[0]
    ids = jnp.concatenate([batch.chosen_ids, batch.rejected_ids])
    mask = jnp.concatenate([batch.chosen_mask, batch.rejected_mask])
    response = jnp.concatenate([batch.chosen_response, batch.rejected_response])
    lengths = jnp.sum(response[:, 1:], axis=1).astype(jnp.float32)  # the tokens `sequence_logprobs` scores

    def loss_fn(trainable):
        model = nnx.merge(static.policy, trainable, frozen.policy_rest)
        logprobs = response_logprobs(model, ids, mask, response, batch.response_window)
        chosen, rejected = logprobs[:n], logprobs[n:]
        losses = pair_losses(cfg.loss, chosen, rejected, batch.ref_chosen, batch.ref_rejected, lengths[:n],
                             lengths[n:], cfg.beta)
        agg = aggregate_group_losses(static.objective, losses, batch.group_weights, frozen.group_shares,
                                     state.objective)
        return agg.loss, (agg, chosen - batch.ref_chosen, rejected - batch.ref_rejected)

    (loss, (agg, chosen_ratio, rejected_ratio)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.trainable)
    updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)

    # TRL's implicit rewards: beta * log-ratio; a pair is ranked right when the chosen one's is higher.
    correct = (chosen_ratio > rejected_ratio).astype(jnp.float32)
    weights = batch.group_weights.astype(jnp.float32)
    metrics = {
        "loss": loss, "group_loss": agg.group_losses, "group_weights": agg.weights,
        "accuracy": correct.mean(),
        "group_accuracy": correct @ weights / jnp.maximum(weights.sum(0), 1e-6),  # 0 for a group not in the batch
        "margin": cfg.beta * (chosen_ratio - rejected_ratio).mean(),
        "chosen_reward": cfg.beta * chosen_ratio.mean(), "rejected_reward": cfg.beta * rejected_ratio.mean(),
        "grad_norm": optax.tree.norm(grads),
    }
    metrics |= flag_faults(metrics)  # checked on the host (`training.check_step`) before a checkpoint
    return PreferenceState(trainable, opt_state, agg.objective, state.step + 1), metrics


class PreferenceTrainer:
    """DPO / IPO per group, aggregated across groups by a social-choice `objective` (maxmin, dro, softmin,
    utilitarian; `single` for pooled pairs with K = 1). `group_shares` [K]: `PreferencePairs.group_shares()` of
    the training pairs. `trainable` (an nnx filter, `maxmin_jax.trainable`) selects what trains. No reference model
    is held: its log-probs come with the pairs (`with_reference_logprobs`). Interface as the online trainers:
    `init_state()`, `step(state, batch, key=None) -> (state, metrics)` (one jitted program, state donated; the step
    is deterministic, the key is accepted so every trainer steps alike), `policy(state)`.

    Log-probabilities are the model's own (temperature 1, no top-k / top-p), as DPO and IPO define them: offline
    pairs were not sampled from the policy.
    """

    def __init__(self, policy: CausalLM, objective: Objective, group_shares, *,
                 config: PreferenceConfig = PreferenceConfig(), trainable: nnx.filterlib.Filter = nnx.Param):
        if not isinstance(policy, CausalLM):
            raise TypeError(f"PreferenceTrainer trains a causal LM; got {type(policy).__name__}")
        if objective.name == "maxmin_sample":
            raise ConfigError("objective 'maxmin_sample' has no offline meaning (a pair belongs to its user's group); "
                              "use maxmin, softmin or dro", key="objective")
        shares = np.asarray(group_shares, np.float32)
        if shares.ndim != 1 or not (shares > 0).all():
            raise InputError(f"group_shares must be a [K] array of positive shares, got {shares!r}")
        graphdef, params, rest = split_policy(policy, trainable, adapters_off_reference=False)
        self.static = _Static(graphdef, objective, config)
        self.frozen = PreferenceFrozen(rest, replicate_on_mesh_of(jnp.asarray(shares), params))
        self._initial_params = params

    @property
    def config(self) -> PreferenceConfig:
        return self.static.config

    @property
    def num_groups(self) -> int:
        return int(self.frozen.group_shares.shape[0])

    def init_state(self) -> PreferenceState:
        params = jax.tree.map(jnp.copy, self._initial_params)  # the state is donated; keep the caller's weights
        state = PreferenceState(params, make_optimizer(self.config.learning_rate, self.config.max_grad_norm).init(
            params), self.static.objective.init(self.num_groups), jnp.zeros((), jnp.int32))
        return start_state(state, params)

    def policy(self, state: PreferenceState) -> CausalLM:
        return nnx.merge(self.static.policy, state.trainable, self.frozen.policy_rest)

    def lower(self, state: PreferenceState, batch: PreferencePairs) -> jax.stages.Lowered:
        """The jitted step lowered for these arguments: `.compile()` gives the executable (called with `state,
        trainer.frozen` and the inputs), whose `memory_analysis()` is what the step holds."""
        return _step.lower(self.static, state, self.frozen, batch)

    def step(self, state: PreferenceState, batch: PreferencePairs, key=None) -> tuple[PreferenceState, dict]:
        """One step on a minibatch of pairs. `state` is donated: use the returned one."""
        del key  # deterministic
        if batch.ref_chosen is None or batch.ref_rejected is None:
            raise InputError("the pairs have no reference log-probs: run with_reference_logprobs(reference, pairs) "
                             "once before training")
        if batch.num_groups != self.num_groups:
            raise InputError(f"the pairs have group weights for K={batch.num_groups} groups but the trainer was "
                             f"built for K={self.num_groups}")
        return _step(self.static, state, self.frozen, batch)


__all__ = ["PreferenceConfig", "PreferenceFrozen", "PreferencePairs", "PreferenceState", "PreferenceTrainer",
           "pair_group_weights", "preference_pairs", "response_masks", "with_reference_logprobs"]
