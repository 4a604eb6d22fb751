"""The token-feature mixture's likelihood with randomly flipped labels: the pair likelihood's arithmetic, the flip
rate it learns, plain Bradley-Terry at a fixed rate of 0, and the user that the flips save on a zoo world."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxmin_jax.errors import ConfigError
from maxmin_jax.rewards.bt import flipped_label_log_likelihood
from maxmin_jax.rewards.em import EMConfig
from maxmin_jax.rewards.linear_mixture import fit_linear_mixture


@pytest.mark.parametrize("on", ["numpy", "jax"])  # the host's held-out scoring, and the jitted fits
def test_flipped_label_likelihood_is_a_probability_with_a_floor(on):
    m = np.linspace(-40.0, 40.0, 81, dtype=np.float32)
    m = jnp.asarray(m) if on == "jax" else m
    np.testing.assert_allclose(flipped_label_log_likelihood(m, 0.0), jax.nn.log_sigmoid(m), rtol=1e-6)
    for eps in (0.01, 0.1):
        ll = np.asarray(flipped_label_log_likelihood(m, eps), np.float64)
        # The two labels' probabilities sum to one ...
        np.testing.assert_allclose(np.exp(ll) + np.exp(flipped_label_log_likelihood(-m, eps)), 1.0, rtol=1e-5)
        # ... and a contradicted pair costs at most log(1 / eps), however confident the margin.
        np.testing.assert_allclose(ll[0], np.log(eps), rtol=1e-4)
        assert np.all(ll >= np.log(eps) - 1e-6)


def _two_group_world(flip_rate: float, seed: int = 0, users: int = 24, pairs: int = 32, d: int = 4):
    """Pair features of users in two groups with opposite heads; labels by Bradley-Terry, flipped at a rate."""
    rng = np.random.default_rng(seed)
    heads = np.zeros((2, d))
    heads[0, 0], heads[1, 0], heads[:, 1] = 3.0, -3.0, 1.0  # groups disagree on feature 0, agree on feature 1
    groups = np.arange(users) % 2
    user_index = np.repeat(np.arange(users), pairs)
    x = rng.normal(size=(users * pairs, d))
    p = 1 / (1 + np.exp(-np.einsum("nd,nd->n", x, heads[groups[user_index]])))
    chosen_first = (rng.random(len(p)) < p) ^ (rng.random(len(p)) < flip_rate)
    x = np.where(chosen_first[:, None], x, -x).astype(np.float32)  # features are chosen minus rejected
    return x, user_index, groups


@pytest.mark.parametrize("flip_rate", [0.0, 0.05, 0.1])
def test_learned_flip_rate_follows_the_labels(flip_rate):
    """With enough pairs per head the learned rate is the true one; with few, the L2 penalty's smaller margins
    read some flips as Bradley-Terry noise (24 users of 32 pairs at 10% flips: 0.05), an estimate on the low side."""
    x, user_index, groups = _two_group_world(flip_rate, pairs=128)
    gamma0 = np.eye(2, dtype=np.float32)[groups][None]  # from the true partition: the rate is what is tested
    fit = jax.device_get(fit_linear_mixture(x, user_index, gamma0, num_users=len(groups), l2=1.0))
    learned = float(fit.flip_rate[0])
    assert abs(learned - flip_rate) < 0.02, learned
    np.testing.assert_array_equal(np.argmax(fit.gamma[0], -1), groups)


def test_flip_rate_zero_is_plain_logistic_regression():
    x, user_index, groups = _two_group_world(0.1, seed=1)
    gamma0 = np.eye(2, dtype=np.float32)[groups][None]
    fit = jax.device_get(fit_linear_mixture(x, user_index, gamma0, num_users=len(groups), l2=1.0, soft_iters=0,
                                            hard_iters=0, newton_steps=4, flip_rate=0.0))
    for k in range(2):  # each head: L2-regularised logistic regression on its group's pairs, by Newton in float64
        xk = x[groups[user_index] == k].astype(np.float64)
        theta = np.zeros(xk.shape[1])
        for _ in range(30):
            s = 1 / (1 + np.exp(-xk @ theta))
            theta -= np.linalg.solve((xk * (s * (1 - s))[:, None]).T @ xk + np.eye(len(theta)),
                                     -xk.T @ (1 - s) + theta)
        np.testing.assert_allclose(fit.theta[0, k], theta, atol=2e-3)
    assert float(fit.flip_rate[0]) == 0.0


def test_flips_keep_a_user_whom_plain_bradley_terry_misplaces():
    """tune lexical #10 (44:3, 3% flipped labels at low noise): under plain Bradley-Terry a few flipped pairs of
    one minority user, contradicted at large margins, outweigh the rest of their pairs, and the start puts them
    in the majority; with the learned flip rate every user is placed right."""
    from maxmin_jax.data.batching import tokenize_pairs
    from maxmin_jax.data.zoo import zoo
    from maxmin_jax.rewards.scoring import clustering_metrics
    from maxmin_jax.rewards.start import feature_start

    world = zoo("tune")[10]
    batch = tokenize_pairs(world.tokenizer(), world.preference_rows(), max_length=64)
    small = dict(num_groups=2, progress=False, feature_clusters=(8,), feature_tokens=(0,), feature_disputed_tokens=(),
                 prompt_features="off", feature_seeds=1, length_shape="off",
                 response_ends="off")  # one feature set: the likelihood is tested
    ari, rate = {}, {}
    for flips in ("auto", 0.0):
        _, mixture, _, _ = feature_start(batch, batch.num_pairs, batch.user_index, batch.num_users,
                                         EMConfig(**small, feature_flip_rate=flips))
        ari[flips], rate[flips] = clustering_metrics(mixture.assignments, batch.groups)["ari"], mixture.flip_rate
    assert ari["auto"] == 1.0 and ari[0.0] < 0.9, ari
    assert 0.005 < rate["auto"] < world.flip_rate + 0.02 and rate[0.0] == 0.0, rate


@pytest.mark.parametrize("bad", [0.5, -0.1, "learn", True])
def test_feature_flip_rate_is_checked(bad):
    with pytest.raises(ConfigError, match=r"feature_flip_rate.*expected 'auto' or a number in \[0, 0.5\)"):
        EMConfig(num_groups=2, feature_flip_rate=bad)


def test_users_left_out_of_a_fit_shape_neither_its_heads_nor_its_groups():
    """in_fit=0 leaves a user out: the heads equal those of a fit on the other users' pairs alone."""
    x, user_index, _ = _two_group_world(0.0)
    gamma0 = np.eye(2, dtype=np.float32)[np.arange(24) % 2][None]
    keep = np.arange(24) >= 6
    rows = keep[user_index]
    left_out = fit_linear_mixture(x, user_index, gamma0, num_users=24, in_fit=keep[None].astype(np.float32))
    remapped = np.cumsum(keep) - 1
    alone = fit_linear_mixture(x[rows], remapped[user_index[rows]], gamma0[:, keep], num_users=18)
    # The same fit up to float32 rounding (other padding, other order of sums, over 20 rounds).
    np.testing.assert_allclose(left_out.theta, alone.theta, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(left_out.score, alone.score, rtol=1e-4)
    np.testing.assert_array_equal(np.argmax(left_out.gamma[0, keep], -1), np.argmax(alone.gamma[0], -1))


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_population_of_one_group_is_not_split_by_users_held_out(seed):
    """48 users who all label at random, 40 features of noise: the held-out users' score finds no second group.
    With the heads only refitted on the all-user partition (each held-out user's pairs had shaped it), K=4, 3
    and 3 were chosen for these seeds; regrouping the others without the fold gives K=1."""
    from maxmin_jax.rewards.init import select_num_groups

    rng = np.random.default_rng(seed)
    x = (0.5 * rng.normal(size=(48 * 20, 40))).astype(np.float32)
    user_index = np.repeat(np.arange(48), 20)
    selection = select_num_groups(x, user_index, 48, (1, 4), restarts=8, l2=3.0, seed=0, user_folds=5)
    assert selection.chosen == 1, (selection.gains, selection.standard_errors)
