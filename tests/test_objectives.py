"""Social-choice objectives on hand-made group rewards."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxmin_jax.policy.objectives import OBJECTIVES, RewardStandardizer, make_objective

# Two samples, three groups. Batch utilities U = [2, 0.75, 1.5]: group 1 is worst on average, but the
# per-sample minima are group 0 (sample 0) and group 2 (sample 1), so maxmin and maxmin_sample disagree.
R = jnp.array([[0.0, 1.0, 5.0], [4.0, 0.5, -2.0]])


def run(name, rewards=R, **kw):
    obj = make_objective(name, **kw)
    return obj.update(rewards, obj.init(rewards.shape[1]))


def test_maxmin_picks_worst_group():
    reward, weights, state = run("maxmin")
    np.testing.assert_allclose(weights, [0.0, 1.0, 0.0])
    np.testing.assert_allclose(reward, R[:, 1])
    np.testing.assert_allclose(state.weights, weights)
    assert int(state.step) == 1


def test_maxmin_ties_go_to_lowest_index():
    _, weights, _ = run("maxmin", jnp.array([[1.0, 0.0, 0.0]]))
    np.testing.assert_allclose(weights, [0.0, 1.0, 0.0])


def test_maxmin_sample_is_per_sample_min():
    reward, weights, _ = run("maxmin_sample")
    np.testing.assert_allclose(reward, [0.0, -2.0])
    np.testing.assert_allclose(weights, [0.5, 0.0, 0.5])


def test_utilitarian_weights():
    reward, weights, _ = run("utilitarian", weights=[2.0, 1.0, 1.0])  # normalised to [.5, .25, .25]
    np.testing.assert_allclose(weights, [0.5, 0.25, 0.25])
    np.testing.assert_allclose(reward, [1.5, 1.625])
    reward, weights, _ = run("utilitarian")
    np.testing.assert_allclose(weights, np.full(3, 1 / 3), rtol=1e-6)
    np.testing.assert_allclose(reward, R.mean(1), rtol=1e-6)
    with pytest.raises(ValueError, match="2 weights for K=3"):
        make_objective("utilitarian", weights=[1.0, 1.0]).init(3)
    with pytest.raises(ValueError, match="non-negative"):
        make_objective("utilitarian", weights=[1.0, -1.0, 1.0])


def test_softmin_limits():
    _, w_cold, _ = run("softmin", temperature=1e-4)
    np.testing.assert_allclose(w_cold, [0.0, 1.0, 0.0], atol=1e-6)
    reward, w_hot, _ = run("softmin", temperature=1e4)
    np.testing.assert_allclose(w_hot, np.full(3, 1 / 3), atol=1e-4)
    np.testing.assert_allclose(reward, R.mean(1), atol=1e-3)
    _, w, _ = run("softmin", temperature=0.5)
    u = np.asarray(R).mean(0)
    expected = np.exp(-u / 0.5) / np.exp(-u / 0.5).sum()
    np.testing.assert_allclose(w, expected, rtol=1e-5)
    with pytest.raises(ValueError, match="temperature"):
        make_objective("softmin", temperature=0.0)


def test_dro_weight_moves_to_losing_group():
    obj = make_objective("dro", step_size=0.5)
    state = obj.init(3)
    update = jax.jit(obj.update)
    u = np.asarray(R).mean(0)
    history = []
    for _ in range(5):
        reward, weights, state = update(R, state)
        history.append(np.asarray(weights))
        np.testing.assert_allclose(reward, R @ weights, rtol=1e-6)
    # First step is exactly lambda_0 * exp(-eta U), normalised.
    first = np.exp(-0.5 * u) / np.exp(-0.5 * u).sum()
    np.testing.assert_allclose(history[0], first, rtol=1e-5)
    losing = np.asarray(history)[:, 1]
    assert np.all(np.diff(losing) > 0) and losing[-1] > 0.75
    np.testing.assert_allclose(np.asarray(history).sum(1), 1.0, rtol=1e-6)
    assert int(state.step) == 5
    # step_size 0: the weights stay uniform.
    _, weights, _ = run("dro", step_size=0.0)
    np.testing.assert_allclose(weights, np.full(3, 1 / 3), rtol=1e-6)


def test_single_requires_one_group():
    reward, weights, _ = run("single", R[:, :1])
    np.testing.assert_allclose(reward, R[:, 0])
    np.testing.assert_allclose(weights, [1.0])
    with pytest.raises(ValueError, match="K=1"):
        make_objective("single").init(3)
    state = make_objective("single").init(1)
    with pytest.raises(ValueError, match="K=3"):
        make_objective("single").update(R, state)


@pytest.mark.parametrize("name", OBJECTIVES)
def test_jit_matches_eager(name):
    rewards = R[:, :1] if name == "single" else R
    obj = make_objective(name)
    state = obj.init(rewards.shape[1])
    eager = obj.update(rewards, state)
    jitted = jax.jit(obj.update)(rewards, state)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), eager, jitted)
    reward, weights, new_state = jitted
    assert reward.shape == (2,) and weights.shape == (rewards.shape[1],)
    assert jax.tree.structure(new_state) == jax.tree.structure(state)


def test_make_objective_errors():
    with pytest.raises(ValueError, match="unknown objective"):
        make_objective("nash")
    with pytest.raises(TypeError, match="maxmin"):
        make_objective("maxmin", temperature=1.0)


def test_reward_standardizer():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(256, 3)) * np.array([1.0, 5.0, 0.1]) + np.array([10.0, -3.0, 0.0])
    ref[:, 2] = 7.0  # a constant reward: the std floor keeps it finite
    s = RewardStandardizer.fit(ref)
    z = np.asarray(s.apply(jnp.asarray(ref)))
    np.testing.assert_allclose(z[:, :2].mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(z[:, :2].std(0), 1.0, rtol=1e-4)
    assert np.isfinite(z).all() and np.allclose(z[:, 2], 0.0)
    ident = RewardStandardizer.identity(3)
    np.testing.assert_allclose(ident.apply(jnp.asarray(ref)), ref, rtol=1e-6)


def test_standardisation_decides_who_is_worst_off():
    # Group 0's reward model has a +10 offset: raw maxmin always optimises group 1, even when group 0 has
    # fallen below its reference level and group 1 has improved on it.
    ref = jnp.array([[10.0, 0.0], [12.0, 2.0], [8.0, -2.0]])
    s = RewardStandardizer.fit(ref)
    batch = jnp.array([[9.0, 1.0], [8.0, 3.0]])  # group 0 below its reference mean, group 1 above
    obj = make_objective("maxmin")
    _, raw, _ = obj.update(batch, obj.init(2))
    _, std, _ = obj.update(s.apply(batch), obj.init(2))
    np.testing.assert_allclose(raw, [0.0, 1.0])
    np.testing.assert_allclose(std, [1.0, 0.0])
