"""The jitted PPO iteration: it runs, trains what the `trainable` filter selects and only that, computes its
log-probabilities under the distribution it samples from, refuses what it cannot train, and compiles once for
every trainer built alike."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import left_padded_prompts
from maxmin_jax.generate import SamplingConfig, generate
from maxmin_jax.models import GPT2Config, build_model
from maxmin_jax.policy.model import PolicyWithValue
from maxmin_jax.policy.objectives import RewardStandardizer, make_objective
from maxmin_jax.policy.ppo import PPOConfig, token_logprobs
from maxmin_jax.policy.trainer import PPOTrainer, _iteration
from maxmin_jax.rewards.model import RewardModel
from maxmin_jax.trainable import trainable_filter

CONFIG = GPT2Config.tiny(vocab_size=64, max_position_embeddings=48)
# Tempered and truncated sampling: the iteration must score tokens under this distribution, not the model's.
SAMPLING = SamplingConfig(max_new_tokens=8, temperature=0.7, top_k=5, top_p=0.9, eos_token_id=1, pad_token_id=0)
PPO = PPOConfig(learning_rate=1e-3, epochs=2, minibatches=2)


def prompts(batch=8, length=6, seed=0):
    return left_padded_prompts(CONFIG.vocab_size, batch, length, seed)


def make_trainer(objective="maxmin", *, lora=False, sampling=SAMPLING, **kwargs):
    reward = RewardModel.from_backbone(build_model(CONFIG, rngs=nnx.Rngs(1)), 2, nnx.Rngs(2))
    lm = build_model(CONFIG, rngs=nnx.Rngs(0))
    reference = None
    if lora:
        from maxmin_jax.models.lora import add_lora

        add_lora(lm, rank=4, rngs=nnx.Rngs(3))
    else:
        reference = build_model(CONFIG, rngs=nnx.Rngs(0))
    kwargs = {"reference": reference, "trainable": trainable_filter(lora=lora), **kwargs}
    return PPOTrainer(PolicyWithValue(lm), reward, make_objective(objective), RewardStandardizer.identity(2),
                      ppo=PPO, sampling=sampling, **kwargs)


def flat_params(tree):
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.fixture(scope="module")
def first_iteration():
    trainer = make_trainer()
    state = trainer.init_state()
    before = flat_params(state.trainable)
    state, metrics = trainer.step(state, *prompts(), jax.random.key(0))
    return trainer, before, state, jax.device_get(metrics)


def test_iteration_updates_policy_and_reports_finite_metrics(first_iteration):
    _, before, state, metrics = first_iteration
    after = flat_params(state.trainable)
    assert int(state.step) == 1
    assert any(not np.array_equal(before[k], after[k]) for k in before)
    for name, value in metrics.items():
        assert np.all(np.isfinite(np.asarray(value))), name
    weights = np.asarray(metrics["group_weights"])
    np.testing.assert_array_equal(weights, np.eye(2)[np.argmin(metrics["group_reward_std"])])  # the worst group
    assert abs(float(metrics["kl"])) < 1e-3  # the policy equals the reference before its first update


def test_log_probs_are_those_of_the_sampled_distribution(first_iteration):
    """The update's log-probs of the sampled tokens are the sampler's (temperature, top-k, top-p), not the model's
    own distribution's: those differ by far more than rounding."""
    trainer, _, _, metrics = first_iteration
    assert float(metrics["rollout_logprob_error"]) < 1e-4
    lm = build_model(CONFIG, rngs=nnx.Rngs(0))
    ids, mask = prompts()
    t, n = ids.shape[1], SAMPLING.max_new_tokens
    seq, logprobs = generate(lm, ids, mask, max_new_tokens=n, rng=jax.random.key(1), temperature=0.7, top_k=5,
                             top_p=0.9, return_logprobs=True)  # no EOS: every token is real
    untempered = token_logprobs(jax.jit(lm)(seq, jnp.concatenate([mask, jnp.ones((8, n), jnp.int32)], 1))[:, t - 1:-1],
                                seq[:, t:])
    assert np.abs(np.asarray(untempered - logprobs)).mean() > 0.1


def test_trainers_built_alike_share_one_compiled_iteration_and_state_is_donated(first_iteration):
    compiled = _iteration._cache_size()
    trainer = make_trainer()  # a new trainer, same models, objective and configs
    state = trainer.init_state()
    for i in range(2):
        state, _ = trainer.step(state, *prompts(seed=i), jax.random.key(i))
    assert _iteration._cache_size() == compiled
    old = state
    state, _ = trainer.step(state, *prompts(), jax.random.key(9))
    assert jax.tree.leaves(old.trainable)[0].is_deleted()


def test_lora_trains_only_adapters_and_value_head():
    trainer = make_trainer(lora=True, sampling=SamplingConfig(max_new_tokens=8, eos_token_id=1))
    state = trainer.init_state()
    frozen_before = flat_params(trainer.frozen.policy_rest)
    names = set(flat_params(state.trainable))
    assert names and all("lora" in n or "value" in n for n in names), names
    state, metrics = trainer.step(state, *prompts(), jax.random.key(0))
    assert abs(float(metrics["kl"])) < 1e-3  # zero-initialised adapters: policy == reference at first
    frozen_after = flat_params(trainer.frozen.policy_rest)
    for k in frozen_before:
        np.testing.assert_array_equal(frozen_before[k], frozen_after[k])


def test_what_cannot_be_trained_is_refused():
    with pytest.raises(ValueError, match="has no adapters: pass reference="):
        make_trainer(reference=None)
    with pytest.raises(ValueError, match="needs the base weights frozen"):
        make_trainer(lora=True, trainable=nnx.Param)
    with pytest.raises(ValueError, match="selects no variable"):
        make_trainer(trainable=nnx.LoRAParam)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        make_trainer(sampling=SamplingConfig(temperature=0.0))


def test_batch_must_divide_into_minibatches(first_iteration):
    trainer = first_iteration[0]
    with pytest.raises(ValueError, match="not divisible by PPOConfig.minibatches"):
        trainer.step(trainer.init_state(), *prompts(batch=7), jax.random.key(0))
