"""EM over users on a planted world with three groups of sizes 60:30:10 (24 labelled pairs per user): recovery of
the groups, the single-reward baseline's failure on the minority, monotone objective, and the E-step against NumPy.

One-layer GPT-2 reward models (hidden 32) trained from scratch over the world's word tokenizer; every fit is a
module-scoped fixture, and all fits share one compiled M-step / E-step per head count.
"""

import functools

import jax
import numpy as np
import pytest
from flax import nnx

from maxmin_jax.data import planted_world, tokenize_pairs
from maxmin_jax.models import GPT2Config, build_model
from maxmin_jax.models.lora import add_lora
from maxmin_jax.rewards import (EMConfig, MStepConfig, RewardModel, assign_user, clustering_metrics, e_step_hard,
                                e_step_soft, evaluate_pairs, fit_em, fit_single_reward, log_likelihood_matrix,
                                mixture_log_likelihood)

ROUNDS, STEPS, BATCH = 10, 60, 32
M_STEP = MStepConfig(learning_rate=1e-3)
# The E-step / M-step mechanics from the paper's round-robin start, users assigned by the reward model: what these
# tests check does not depend on the start, and the token-feature start (the default) costs more than the fits here.
# The defaults' recovery of the groups is tested across zoo worlds in test_em_zoo.py.
MECHANICS = dict(init="round_robin", assign_by="reward_model")
MINORITY = "g2"  # planted_world names groups g0, g1, g2 in the order of the sizes (6, 3, 1)


@pytest.fixture(scope="module")
def world():
    return planted_world(3, (6, 3, 1), pairs_per_user=24, num_users=100, seed=0)


@pytest.fixture(scope="module")
def data(world):
    tok = world.tokenizer()
    train = tokenize_pairs(tok, world.preference_rows(), max_length=64)
    heldout = tokenize_pairs(tok, world.preference_rows(rng=7), max_length=64)  # same users, new pairs
    assert world.group_sizes == (60, 30, 10) and train.num_pairs == 2400
    return train, heldout


@pytest.fixture(scope="module")
def config(world):
    return GPT2Config(vocab_size=len(world.tokenizer()), max_position_embeddings=64, hidden_size=32, num_layers=1,
                      num_heads=4)


@pytest.fixture(scope="module")
def em(data, config):
    model = RewardModel.from_config(config, 3, nnx.Rngs(0))
    return fit_em(model, data[0], EMConfig(num_groups=3, rounds=ROUNDS, steps_per_round=STEPS, batch_size=BATCH,
                                           m_step=M_STEP, progress=False, **MECHANICS))


@pytest.fixture(scope="module")
def single(data, config, em):
    # The same optimiser-step budget as the mixture used.
    steps = STEPS * len(em.history)
    return fit_single_reward(RewardModel.from_config(config, 1, nnx.Rngs(0)), data[0], steps=steps,
                             batch_size=BATCH, m_step_config=M_STEP, progress=False)


def test_em_recovers_planted_groups(em, data):
    metrics = clustering_metrics(em.assignments, data[0].groups)
    print(f"\nhard EM: ARI {metrics['ari']:.3f}, purity {metrics['purity']:.3f} after {len(em.history)} rounds; "
          f"group sizes per round {[h['group_sizes'] for h in em.history]}, "
          f"changed {[h['changed_users'] for h in em.history]}, accepted {[h['m_step_accepted'] for h in em.history]}")
    assert metrics["ari"] >= 0.9
    assert sorted(np.bincount(em.assignments, minlength=3)) == pytest.approx([10, 30, 60], abs=3)
    # Hard EM with the guarded M-step never lowers its objective, sum_h max_k L_hk.
    objective = [h["classification_log_likelihood"] for h in em.history]
    assert all(b >= a for a, b in zip(objective, objective[1:])), objective


def test_mixture_beats_single_reward_on_minority(em, single, data):
    mix, one = evaluate_pairs(em, data[1]), evaluate_pairs(single, data[1])
    gap = mix["accuracy_by_group"][MINORITY] - one["accuracy_by_group"][MINORITY]
    print(f"\nheld-out pairwise accuracy by group: mixture {mix['accuracy_by_group']}, "
          f"single {one['accuracy_by_group']}; minority gap {gap:.3f}")
    # 240 held-out minority pairs: each accuracy has standard error <= 0.5 / sqrt(240) = 0.032, their difference
    # <= 0.046 even if independent (they share the pairs, so less). A gap of 0.15 is over 3 standard errors; the
    # single model follows the majority, whose planted preference disagrees with the minority's on many pairs.
    assert gap >= 0.15
    # ...and the mixture does not pay for it on the majority.
    assert mix["accuracy_by_group"]["g0"] >= one["accuracy_by_group"]["g0"] - 0.05
    assert mix["log_likelihood"] > one["log_likelihood"]


@functools.partial(jax.jit, static_argnums=0)
def _rewards(graphdef, state, ids, mask):
    return nnx.merge(graphdef, state)(ids, mask)


def test_jitted_estep_matches_numpy(em, data):
    train = data[0]
    sub = train.take(np.flatnonzero(train.user_index < 8))  # 8 users' pairs, scored without chunking below
    graphdef, state = nnx.split(em.model)
    chosen = np.asarray(_rewards(graphdef, state, sub.chosen_ids, sub.chosen_mask), np.float64)
    rejected = np.asarray(_rewards(graphdef, state, sub.rejected_ids, sub.rejected_mask), np.float64)
    ll = -np.logaddexp(0.0, -(chosen - rejected))  # log sigmoid, stably
    L_np = np.zeros((train.num_users, 3))
    np.add.at(L_np, sub.user_index, ll)
    log_w = np.log(em.weights)
    gamma_np = np.exp(log_w + L_np - np.logaddexp.reduce(log_w + L_np, axis=1, keepdims=True))

    L = log_likelihood_matrix(em.model, sub, chunk_size=64)  # chunked, jitted, segment-summed
    np.testing.assert_allclose(L, L_np, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(e_step_soft(L, log_w), gamma_np, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(np.argmax(e_step_hard(L)[:8], -1), np.argmax(L_np[:8], -1))
    assert float(mixture_log_likelihood(L, log_w)) == pytest.approx(np.logaddexp.reduce(log_w + L_np, axis=1).sum(),
                                                                    rel=1e-5)


def test_soft_em_objective_never_decreases(data, config):
    model = RewardModel.from_config(config, 3, nnx.Rngs(1))
    result = fit_em(model, data[0], EMConfig(num_groups=3, method="soft", rounds=5, steps_per_round=20,
                                             batch_size=BATCH, m_step=M_STEP, tol=-1.0, progress=False,
                                             **MECHANICS))
    objective = [h["log_likelihood"] for h in result.history]
    print(f"\nsoft EM objective per round: {np.round(objective, 2).tolist()}, "
          f"M-steps accepted: {[h['m_step_accepted'] for h in result.history]}")
    assert len(objective) == 5
    # Bound: 1e-6 relative, i.e. float32 rounding of a sum over 100 users. The guarded (generalised EM) M-step keeps
    # new reward weights only when they raise sum gamma * L, and w's update is exact, so in exact arithmetic the
    # objective cannot decrease; minibatch wobble is undone rather than tolerated.
    for a, b in zip(objective, objective[1:]):
        assert b >= a - 1e-6 * abs(a), objective
    np.testing.assert_allclose(result.responsibilities.sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(result.weights.sum(), 1.0, rtol=1e-5)


def test_assign_new_user_from_few_pairs(em, data):
    train, heldout = data
    minority_cluster = np.bincount(em.assignments[np.asarray(train.groups) == MINORITY]).argmax()
    user = next(u for u, g in enumerate(heldout.groups) if g == MINORITY)
    pairs = heldout.take(np.flatnonzero(heldout.user_index == user)[:12])  # 12 fresh pairs, as from a new user
    posterior = assign_user(em.model, pairs, em.weights)
    print(f"\nposterior of a new minority user from 12 pairs: {np.round(posterior, 3).tolist()}")
    assert posterior.shape == (3,) and posterior.sum() == pytest.approx(1.0, rel=1e-5)
    assert posterior.argmax() == minority_cluster


def test_trainable_filter_trains_only_the_selected_variables(data, config):
    """EM over a LoRA reward model: only the adapters and the heads move; the base weights are untouched."""
    backbone = add_lora(build_model(config, rngs=nnx.Rngs(0)), rank=2, rngs=nnx.Rngs(1))
    model = RewardModel(backbone, 2, rngs=nnx.Rngs(2))
    trainable = nnx.Any(nnx.LoRAParam, nnx.PathContains("head"), nnx.PathContains("head_bias"))
    flat = lambda: {".".join(map(str, path)): np.array(v[...]) for path, v in nnx.to_flat_state(nnx.state(model))}
    before = flat()
    fit_em(model, data[0], EMConfig(num_groups=2, rounds=1, steps_per_round=5, batch_size=BATCH, m_step=M_STEP,
                                    progress=False, guard=False, **MECHANICS), trainable=trainable)
    moved = {name for name, value in flat().items() if not np.array_equal(value, before[name])}
    assert moved and all("lora" in name or name.startswith("head") for name in moved), moved
    assert any("lora" in name for name in moved) and any(name.startswith("head") for name in moved), moved
    with pytest.raises(ValueError, match="selects no variable"):
        fit_em(model, data[0], EMConfig(num_groups=2, progress=False), trainable=nnx.PathContains("nothing"))
