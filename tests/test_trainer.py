"""The jitted PPO iteration: it runs, trains what it should and only that, and compiles once."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from maxmin_jax.models import GPT2Config, build_model
from maxmin_jax.policy.model import PolicyWithValue
from maxmin_jax.policy.objectives import RewardStandardizer, make_objective
from maxmin_jax.policy.ppo import PPOConfig
from maxmin_jax.policy.trainer import PPOTrainer, RolloutConfig
from maxmin_jax.rewards.model import RewardModel

CONFIG = GPT2Config.tiny(vocab_size=64, max_position_embeddings=48)
ROLLOUT = RolloutConfig(max_new_tokens=8, eos_token_id=1, pad_token_id=0)
PPO = PPOConfig(learning_rate=1e-3, epochs=2, minibatches=2)


def prompts(batch=8, length=6, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, CONFIG.vocab_size, (batch, length)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[::2, :2] = 0
    ids[mask == 0] = 0
    return jnp.asarray(ids), jnp.asarray(mask)


def make_trainer(objective="maxmin", *, lora=False):
    reward = RewardModel.from_backbone(build_model(CONFIG, rngs=nnx.Rngs(1)), 2, nnx.Rngs(2))
    lm = build_model(CONFIG, rngs=nnx.Rngs(0))
    reference = None
    if lora:
        from maxmin_jax.models.lora import add_lora

        add_lora(lm, rank=4, rngs=nnx.Rngs(3))
    else:
        reference = build_model(CONFIG, rngs=nnx.Rngs(0))
    return PPOTrainer(PolicyWithValue(lm), reward, make_objective(objective), RewardStandardizer.identity(2),
                      reference=reference, ppo=PPO, rollout=ROLLOUT, lora=lora)


def flat_params(tree):
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_iteration_updates_policy_and_reports_finite_metrics():
    trainer = make_trainer()
    state = trainer.init_state()
    before = flat_params(state.trainable)
    ids, mask = prompts()
    state, metrics = trainer.step(state, ids, mask, jax.random.key(0))
    after = flat_params(state.trainable)
    assert int(state.step) == 1
    assert any(not np.array_equal(before[k], after[k]) for k in before)
    for name, value in metrics.items():
        assert np.all(np.isfinite(np.asarray(value))), name
    weights = np.asarray(metrics["group_weights"])
    rewards = np.asarray(metrics["group_reward_std"])
    np.testing.assert_array_equal(weights, np.eye(2)[np.argmin(rewards)])  # maxmin serves the worst group
    # KL starts at ~0: the policy equals the reference before its first update.
    assert abs(float(metrics["kl"])) < 1e-3


def test_iteration_compiles_once_and_state_is_donated():
    trainer = make_trainer("utilitarian")
    state = trainer.init_state()
    ids, mask = prompts()
    for i in range(3):
        state, _ = trainer.step(state, ids, mask, jax.random.key(i))
    assert trainer._iteration._cache_size() == 1
    old = state
    state, _ = trainer.step(state, ids, mask, jax.random.key(9))
    assert jax.tree.leaves(old.trainable)[0].is_deleted()


def test_lora_trains_only_adapters_and_value_head():
    trainer = make_trainer(lora=True)
    state = trainer.init_state()
    frozen_before = flat_params(trainer.frozen.policy_rest)
    names = set(flat_params(state.trainable))
    assert names and all("lora" in n or "value" in n for n in names), names
    ids, mask = prompts()
    state, metrics = trainer.step(state, ids, mask, jax.random.key(0))
    assert abs(float(metrics["kl"])) < 1e-3  # zero-initialised adapters: policy == reference at first
    frozen_after = flat_params(trainer.frozen.policy_rest)
    for k in frozen_before:
        np.testing.assert_array_equal(frozen_before[k], frozen_after[k])


def test_batch_must_divide_into_minibatches():
    trainer = make_trainer()
    ids, mask = prompts(batch=7)
    with pytest.raises(ValueError, match="not divisible by PPOConfig.minibatches"):
        trainer.step(trainer.init_state(), ids, mask, jax.random.key(0))
