"""The jitted critic-free iteration: no value head, compiles once, learns the objective's reward, trains only the
adapters under LoRA, and a sharded run equals the single-device one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import left_padded_prompts
from maxmin_jax.errors import ConfigError
from maxmin_jax.models import GPT2Config, build_model
from maxmin_jax.models.lora import add_lora
from maxmin_jax.policy.advantages import make_estimator
from maxmin_jax.generate import SamplingConfig
from maxmin_jax.policy import critic_free
from maxmin_jax.policy.critic_free import CriticFreeConfig, CriticFreeTrainer
from maxmin_jax.policy.model import PolicyWithValue
from maxmin_jax.policy.objectives import RewardStandardizer, make_objective
from maxmin_jax.sharding import make_mesh, shard_batch, shard_module
from maxmin_jax.trainable import trainable_filter

CONFIG = GPT2Config.tiny(vocab_size=64, max_position_embeddings=48)
SAMPLING = SamplingConfig(max_new_tokens=8, eos_token_id=None, pad_token_id=0)
G = 4


class TokenTableReward(nnx.Module):
    """Group k's reward: the mean over real response tokens of table[token, k] (a known, learnable target)."""

    def __init__(self, table, prompt_length: int):
        self.table = nnx.Variable(jnp.asarray(table, jnp.float32))
        self.prompt_length = prompt_length

    def __call__(self, ids, mask):
        ids, mask = ids[:, self.prompt_length:], mask[:, self.prompt_length:].astype(jnp.float32)
        return jnp.einsum("btk,bt->bk", self.table[...][ids], mask) / jnp.maximum(mask.sum(1), 1.0)[:, None]


def prompts(batch=8, length=6, seed=0):
    return left_padded_prompts(CONFIG.vocab_size, batch, length, seed)


def flat(tree):
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def liked_tokens_table():
    table = np.zeros((CONFIG.vocab_size, 2), np.float32)
    table[3:20, 0] = 1.0
    table[20:40, 1] = 1.0
    return table


@pytest.fixture(scope="module")
def grpo_run():
    """GRPO + maxmin (lagged weights), full fine-tuning against a separate reference, on a reward that likes tokens
    3..19 for group 0 and 20..39 for group 1: 25 iterations of 8 prompts x 4 samples, one on-policy pass each."""
    trainer = CriticFreeTrainer(build_model(CONFIG, rngs=nnx.Rngs(0)), TokenTableReward(liked_tokens_table(), 6),
                                make_objective("maxmin", lagged=True), RewardStandardizer.identity(2),
                                estimator=make_estimator("grpo", group_size=G),
                                reference=build_model(CONFIG, rngs=nnx.Rngs(0)),
                                config=CriticFreeConfig(learning_rate=1e-2, kl_coef=0.01), sampling=SAMPLING)
    state = trainer.init_state()
    ids, mask = prompts()
    history = []
    for i in range(25):
        state, metrics = trainer.step(state, ids, mask, jax.random.key(i))
        history.append(jax.tree.map(np.asarray, metrics))
        compiled = critic_free._iteration._cache_size() if i == 0 else compiled
    assert critic_free._iteration._cache_size() == compiled  # the state comes back as it went in: one compile
    return trainer, state, history


def test_no_value_head_and_finite_metrics(grpo_run):
    trainer, state, history = grpo_run
    policy = trainer.policy(state)
    assert not isinstance(policy, PolicyWithValue)
    assert not any("value_head" in k or "value_bias" in k for k in flat(nnx.state(policy)))
    assert set(history[0]) >= {"policy_loss", "kl", "kl_penalty", "clipfrac", "entropy", "grad_norm", "score",
                               "group_reward", "group_weights", "reward_spread", "zero_spread_fraction"}
    for metrics in history:
        for name, value in metrics.items():
            assert np.all(np.isfinite(value)), name
        flagged = {"loss", "policy_loss", "grad_norm", "kl", "approx_kl", "score"}  # policy.training.FAULT_LIMITS
        assert {k for k in metrics if k.startswith("fault/")} == {f"fault/{k}" for k in flagged}
        assert not any(v for k, v in metrics.items() if k.startswith("fault/"))
    assert abs(float(history[0]["kl"])) < 1e-5  # the policy starts as the reference
    assert float(history[0]["clipfrac"]) == 0.0  # one on-policy pass: every ratio is 1
    np.testing.assert_allclose(history[0]["group_weights"], [0.5, 0.5])  # lagged: nothing seen before batch 1


def test_learns_the_worst_groups_reward(grpo_run):
    _, _, history = grpo_run
    worst = np.array([m["group_reward"].min() for m in history])
    # Random tokens hit the groups' liked ranges 17/64 and 20/64 of the time; training raises the worst group's
    # share of liked tokens well beyond that (a sign error anywhere would lower it).
    assert worst[:3].mean() < 0.3
    assert worst[-3:].mean() > worst[:3].mean() + 0.1, worst


def test_trainers_built_alike_share_the_program_and_the_state_is_donated(grpo_run):
    trainer, state, _ = grpo_run
    compiled = critic_free._iteration._cache_size()
    again = CriticFreeTrainer(build_model(CONFIG, rngs=nnx.Rngs(1)), TokenTableReward(liked_tokens_table(), 6),
                              make_objective("maxmin", lagged=True), RewardStandardizer.identity(2),
                              estimator=make_estimator("grpo", group_size=G),
                              reference=build_model(CONFIG, rngs=nnx.Rngs(0)),
                              config=CriticFreeConfig(learning_rate=1e-2, kl_coef=0.01), sampling=SAMPLING)
    again.step(again.init_state(), *prompts(seed=1), jax.random.key(0))
    assert critic_free._iteration._cache_size() == compiled
    ids, mask = prompts()
    trainer.step(state, ids, mask, jax.random.key(99))
    assert jax.tree.leaves(state.trainable)[0].is_deleted()


def test_bad_setups_are_refused():
    lm = build_model(CONFIG, rngs=nnx.Rngs(0))
    reward = TokenTableReward(np.zeros((CONFIG.vocab_size, 2)), 6)
    args = (reward, make_objective("maxmin"), RewardStandardizer.identity(2))
    grpo = make_estimator("grpo", group_size=G)
    with pytest.raises(TypeError, match="no value head"):
        CriticFreeTrainer(PolicyWithValue(lm), *args, estimator=grpo, reference=lm)
    with pytest.raises(ConfigError, match="needs a critic"):
        CriticFreeTrainer(lm, *args, estimator=make_estimator("gae"), reference=lm)
    with pytest.raises(ConfigError, match="temperature must be > 0"):
        CriticFreeTrainer(lm, *args, estimator=grpo, reference=lm, sampling=SamplingConfig(temperature=0.0))
    with pytest.raises(ConfigError, match="has no adapters: pass reference="):
        CriticFreeTrainer(lm, *args, estimator=grpo)
    with pytest.raises(ConfigError, match="kl_kind"):
        CriticFreeConfig(kl_kind="kl")
    with pytest.raises(ConfigError, match="epochs: expected an integer >= 1, got True"):
        CriticFreeConfig(epochs=True)
    trainer = CriticFreeTrainer(lm, *args, estimator=grpo, reference=lm, config=CriticFreeConfig(minibatches=5))
    with pytest.raises(ConfigError, match="= 12 responses, not divisible by CriticFreeConfig.minibatches=5"):
        trainer.step(trainer.init_state(), *prompts(batch=3), jax.random.key(0))


# Sharded, LoRA ------------------------------------------------------------------------------------------------------
TRAIN_TOL = dict(rtol=1e-4, atol=1e-4)
BASE = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))


def run_rloo_lora(mesh, iterations: int = 2):
    """RLOO + dro under LoRA (the reference is the base weights, adapters off), 2 epochs x 2 minibatches (the
    multi-pass path)."""
    policy = build_model(CONFIG, rngs=nnx.Rngs(0))
    reward = TokenTableReward(np.random.default_rng(1).normal(size=(CONFIG.vocab_size, 2)), 6)
    ids, mask = prompts(batch=4, seed=1)
    if mesh is not None:
        for module in (policy, reward):
            shard_module(module, mesh)
        ids, mask = shard_batch((ids, mask), mesh)
    add_lora(policy, rank=4, targets="all", rngs=nnx.Rngs(3), mesh=mesh)
    base = flat(nnx.state(policy, BASE))
    trainer = CriticFreeTrainer(policy, reward, make_objective("dro", step_size=0.5), RewardStandardizer.identity(2),
                                estimator=make_estimator("rloo", group_size=G), trainable=trainable_filter(lora=True),
                                config=CriticFreeConfig(learning_rate=1e-2, epochs=2, minibatches=2),
                                sampling=SAMPLING)
    state, metrics = trainer.init_state(), []
    for it in range(iterations):
        state, m = trainer.step(state, ids, mask, jax.random.key(it))
        metrics.append(jax.tree.map(np.asarray, m))
        compiled = critic_free._iteration._cache_size() if it == 0 else compiled
    assert critic_free._iteration._cache_size() == compiled  # the state comes back as it went in: one compile
    trained = trainer.policy(state)
    after = flat(nnx.state(trained, BASE))
    assert after.keys() == base.keys() and all(np.array_equal(after[k], base[k]) for k in base)  # adapters only
    assert all("lora" in k for k in flat(state.trainable))
    return trained, metrics


def test_sharded_lora_iteration_matches_single_device():
    mesh = make_mesh(2, 2, 2)
    policy, metrics = run_rloo_lora(mesh)
    ref_policy, ref_metrics = run_rloo_lora(None)
    assert abs(float(ref_metrics[0]["kl"])) < 1e-5 and abs(float(ref_metrics[1]["kl"])) > 1e-4  # adapters moved
    for m, ref in zip(metrics, ref_metrics, strict=True):
        assert m.keys() == ref.keys()
        for key in m:
            # A clip fraction counts tokens on either side of a threshold: a few of the 128 may flip.
            tol = dict(rtol=0, atol=4 / 128) if key == "clipfrac" else TRAIN_TOL
            np.testing.assert_allclose(m[key], ref[key], **tol, err_msg=key)
    single, sharded = flat(nnx.state(ref_policy, nnx.Param)), flat(nnx.state(policy, nnx.Param))
    for k in single:
        np.testing.assert_allclose(sharded[k], single[k], **TRAIN_TOL, err_msg=k)
    qkv = policy.layers.qkv[...]  # [L, D, 3, H, Dh]: embed over fsdp, heads over tensor
    assert {s.data.shape for s in qkv.addressable_shards} == {(qkv.shape[0], qkv.shape[1] // 2, 3,
                                                               qkv.shape[3] // 2, qkv.shape[4])}
