"""Reward models (shared heads vs separate backbones, last-token reading, jit, sharding), Bradley-Terry pieces,
and fit_rewards' files and checkpoints. Tiny GPT-2 models over the synthetic world's word tokenizer."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from maxmin_jax.data import planted_world, tokenize_pairs
from maxmin_jax.models import GPT2Config, build_model
from maxmin_jax.models.hf import CheckpointError, save_pretrained
from maxmin_jax.rewards import (RewardModel, SeparateRewardModels, bt_loss, fit_rewards, load_reward_model,
                                pairwise_accuracy, save_reward_model)
from maxmin_jax.sharding import make_mesh, shard_module

K = 3


@pytest.fixture(scope="module")
def world():
    return planted_world(3, (2, 1, 1), pairs_per_user=4, seed=1)


@pytest.fixture(scope="module")
def tok(world):
    return world.tokenizer()


@pytest.fixture(scope="module")
def config(tok):
    return GPT2Config.tiny(vocab_size=len(tok), max_position_embeddings=64)


@pytest.fixture(scope="module")
def batch(world, tok):
    return tokenize_pairs(tok, world.preference_rows(), max_length=64)


@pytest.fixture(scope="module")
def backbone(config):
    return build_model(config, rngs=nnx.Rngs(0))


@functools.partial(jax.jit, static_argnums=0)
def _apply(graphdef, state, ids, mask):
    return nnx.merge(graphdef, state)(ids, mask)


def _forward(model, ids, mask):
    """Jitted forward through split/merge, compiled once per architecture and shape (eager NNX calls would
    re-trace the layer scan every time)."""
    return _apply(*nnx.split(model), ids, mask)


def test_shared_heads_equal_single_head_models(backbone, batch):
    ids, mask = batch.chosen_ids[:8], batch.chosen_mask[:8]
    model = RewardModel.from_backbone(backbone, K, nnx.Rngs(1))
    rewards = _forward(model, ids, mask)
    assert rewards.shape == (8, K) and rewards.dtype == jnp.float32
    for k in range(K):
        single = RewardModel.from_backbone(backbone, 1, nnx.Rngs(2))
        single.head.set_value(model.head[...][:, k:k + 1])
        single.head_bias.set_value(model.head_bias[...][k:k + 1] + 0.5 * k)
        model.head_bias.set_value(model.head_bias[...].at[k].add(0.5 * k))
        np.testing.assert_allclose(_forward(single, ids, mask)[:, 0], _forward(model, ids, mask)[:, k],
                                   rtol=1e-6, atol=1e-6)


def test_separate_models_stack_backbones(backbone, config, batch):
    ids, mask = batch.chosen_ids[:8], batch.chosen_mask[:8]
    shared = RewardModel.from_backbone(backbone, K, nnx.Rngs(1))
    separate = SeparateRewardModels.from_backbone(backbone, K, nnx.Rngs(1))
    separate.head.set_value(shared.head[...])
    # K copies of one backbone with the same heads: the same rewards as the shared model.
    np.testing.assert_allclose(_forward(separate, ids, mask), _forward(shared, ids, mask), rtol=1e-5, atol=1e-6)
    axes = separate.stacked.layers.qkv.get_metadata()["logical_axes"]
    assert axes[0] == "groups" and separate.stacked.layers.qkv[...].shape[0] == K
    # Independent backbones: column k is backbone k with head k.
    fresh = SeparateRewardModels.from_config(config, K, nnx.Rngs(3))
    rewards = _forward(fresh, ids, mask)
    assert rewards.shape == (8, K)
    graphdef, state = nnx.split(fresh.stacked)
    for k in range(K):
        one = RewardModel(nnx.merge(graphdef, jax.tree.map(lambda x: x[k], state)), 1, rngs=nnx.Rngs(0))
        one.head.set_value(fresh.head[...][:, k:k + 1])
        np.testing.assert_allclose(_forward(one, ids, mask)[:, 0], rewards[:, k], rtol=1e-5, atol=1e-6)


def test_reward_read_at_last_real_token(backbone, batch):
    model = RewardModel.from_backbone(backbone, K, nnx.Rngs(1))
    ids, mask = batch.chosen_ids[:6], batch.chosen_mask[:6]
    base = _forward(model, ids, mask)
    extra = 5  # more left padding changes nothing
    padded_ids = np.concatenate([np.zeros((6, extra), np.int32), ids], axis=1)
    padded_mask = np.concatenate([np.zeros((6, extra), np.int32), mask], axis=1)
    np.testing.assert_allclose(_forward(model, padded_ids, padded_mask), base, rtol=1e-5, atol=1e-5)
    # Right padding too: the index of the last real token comes from the mask, not from the layout.
    right_ids, right_mask = np.zeros_like(ids), np.zeros_like(mask)
    for i in range(6):
        n = int(mask[i].sum())
        right_ids[i, :n], right_mask[i, :n] = ids[i, -n:], 1
    np.testing.assert_allclose(_forward(model, right_ids, right_mask), base, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shared", [True, False])
def test_sharded_forward_matches(backbone, batch, shared):
    cls = RewardModel if shared else SeparateRewardModels
    model = cls.from_backbone(backbone, K, nnx.Rngs(1))
    ids, mask = batch.chosen_ids[:8], batch.chosen_mask[:8]
    expected = _forward(model, ids, mask)
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    sharded = shard_module(nnx.clone(model), mesh)
    qkv = (sharded.backbone if shared else sharded.stacked).layers.qkv[...]
    assert not qkv.sharding.is_fully_replicated  # heads over "tensor", embed over "fsdp"
    np.testing.assert_allclose(_forward(sharded, ids, mask), expected, rtol=1e-5, atol=1e-5)


def test_bradley_terry_pieces():
    c = jnp.array([[1.0, 0.0], [2.0, -1.0], [0.5, 0.5]])
    r = jnp.array([[0.0, 1.0], [1.0, -1.0], [1.5, 0.0]])
    w = jnp.array([[1.0, 0.0], [0.25, 0.75], [0.5, 0.5]])
    ll = np.log(1 / (1 + np.exp(-(np.asarray(c) - np.asarray(r)))))
    np.testing.assert_allclose(bt_loss(c, r), -ll.sum() / 3, rtol=1e-6)
    np.testing.assert_allclose(bt_loss(c, r, w), -(np.asarray(w) * ll).sum() / 3, rtol=1e-6)
    ll_m = np.log(1 / (1 + np.exp(-(np.asarray(c) - np.asarray(r) - 0.5))))
    np.testing.assert_allclose(bt_loss(c, r, margin=0.5), -ll_m.sum() / 3, rtol=1e-6)
    penalty = 0.1 * np.sum((np.asarray(c) ** 2 + np.asarray(r) ** 2) / 2) / 3
    np.testing.assert_allclose(bt_loss(c, r, center_coef=0.1), -ll.sum() / 3 + penalty, rtol=1e-6)
    # Correct: (1, 0), (1, tie 0.5), (0, 1) -> 3.5 of 6; weighted: 1 + 0.25 + 0.375 + 0.5 = 2.125 of 3.
    assert float(pairwise_accuracy(c, r)) == pytest.approx(3.5 / 6)
    assert float(pairwise_accuracy(c, r, w)) == pytest.approx(2.125 / 3)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, backbone, tok):
    """An HF checkpoint directory (config.json + safetensors, as transformers writes them) plus the world
    tokenizer, so fit_rewards goes through load_pretrained and AutoTokenizer exactly as the CLI's --model does."""
    path = tmp_path_factory.mktemp("reward_base")
    save_pretrained(backbone, path)
    tok.save_pretrained(path)
    return path


def test_fit_rewards_files_and_checkpoint(hf_dir, world, tmp_path):
    out = tmp_path / "fit"
    result = fit_rewards(world.preference_rows(), model_path_or_config=str(hf_dir), num_groups=K, restarts=2,
                         rounds=2, steps_per_round=2, batch_size=8, chunk_size=16, learning_rate=1e-3, out_dir=out,
                         progress=False)
    assignments = json.loads((out / "assignments.json").read_text())
    assert set(assignments) == set(result.user_ids) and set(assignments.values()) <= set(range(K))
    history = json.loads((out / "em_history.json").read_text())
    assert history["history"] and {"log_likelihood", "changed_fraction", "weights"} <= set(history["history"][0])
    assert set(history["metrics"]) == {"ari", "purity"}  # the world's rows carry true groups
    assert len(result.restart_scores) == 2 and result.best_restart == int(np.argmax(result.restart_scores))

    loaded = load_reward_model(out / "reward_model", num_groups=K, shared_backbone=True)
    probe = tokenize_pairs(world.tokenizer(), world.preference_rows()[:4], max_length=64)
    np.testing.assert_array_equal(_forward(loaded, probe.chosen_ids, probe.chosen_mask),
                                  _forward(result.model, probe.chosen_ids, probe.chosen_mask))

    with pytest.raises(CheckpointError, match="num_groups: checkpoint has 3, expected 2"):
        load_reward_model(out / "reward_model", num_groups=2)
    with pytest.raises(CheckpointError, match="model config"):
        load_reward_model(out / "reward_model", config=GPT2Config.tiny(vocab_size=100))
    meta_path = out / "reward_model" / "reward_model.json"
    meta = json.loads(meta_path.read_text())
    meta["num_groups"] = 2  # the JSON now disagrees with the stored arrays
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"stored shape \(32, 3\), config needs \(32, 2\)"):
        load_reward_model(out / "reward_model")


def test_separate_models_checkpoint_roundtrip(backbone, batch, tmp_path):
    model = SeparateRewardModels.from_backbone(backbone, K, nnx.Rngs(4))
    save_reward_model(model, tmp_path / "rm")
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    loaded = load_reward_model(tmp_path / "rm", shared_backbone=False, mesh=mesh)
    assert isinstance(loaded, SeparateRewardModels)
    assert not loaded.stacked.layers.qkv[...].sharding.is_fully_replicated  # restored straight into its sharding
    ids, mask = batch.chosen_ids[:8], batch.chosen_mask[:8]
    np.testing.assert_allclose(_forward(loaded, ids, mask), _forward(model, ids, mask), rtol=1e-5, atol=1e-6)
    with pytest.raises(CheckpointError, match="shared_backbone: checkpoint has False, expected True"):
        load_reward_model(tmp_path / "rm", shared_backbone=True)
