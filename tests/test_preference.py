"""Offline preference optimisation: DPO/IPO losses and gradients against NumPy (TRL's definitions), aggregation
over groups with explicit signs, group-robust weights by mirror descent, the data path, and the jitted step: it
compiles once, a sharded step equals the single-device one, and maxmin protects the minority's loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from maxmin_jax.data.batching import PairBatch
from maxmin_jax.errors import ConfigError, DataError
from maxmin_jax.models import GPT2Config, build_model
from maxmin_jax.policy.objectives import make_objective
from maxmin_jax.policy import offline
from maxmin_jax.policy.offline import (PreferenceConfig, PreferenceTrainer, pair_group_weights, preference_pairs,
                                       with_reference_logprobs)
from maxmin_jax.policy.preference import aggregate_group_losses, pair_losses, sequence_logprobs
from maxmin_jax.sharding import make_mesh, shard_batch, shard_module

CONFIG = GPT2Config.tiny(vocab_size=64, max_position_embeddings=32)
BETA = 0.3


# Losses and gradients against NumPy ------------------------------------------------------------------------------
def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def numpy_sequence_logprobs(logits, ids, response):
    """log pi(response) and its gradient with respect to the logits, by hand."""
    n, t, v = logits.shape
    logp = log_softmax(logits)
    total, grad = np.zeros(n), np.zeros_like(logits)
    for i in range(n):
        for pos in range(1, t):
            if response[i, pos]:
                total[i] += logp[i, pos - 1, ids[i, pos]]
                grad[i, pos - 1] += np.eye(v)[ids[i, pos]] - np.exp(logp[i, pos - 1])
    return total, grad


@pytest.mark.parametrize("kind", ["dpo", "ipo"])
def test_losses_and_gradients_match_numpy(kind):
    rng = np.random.default_rng(0)
    n, t, v = 5, 7, 11
    logits = rng.normal(size=(2 * n, t, v))  # chosen rows, then rejected rows
    ids = rng.integers(0, v, (2 * n, t))
    response = (np.arange(t)[None, :] >= rng.integers(1, t - 1, 2 * n)[:, None]).astype(np.int32)
    ref = rng.normal(size=2 * n) - 8.0  # the reference's summed log-probs

    logprob, dlogprob = numpy_sequence_logprobs(logits, ids, response)
    length = response[:, 1:].sum(1)
    d_chosen, d_rejected = logprob[:n] - ref[:n], logprob[n:] - ref[n:]  # TRL's log-ratios
    if kind == "dpo":
        margin = BETA * (d_chosen - d_rejected)
        losses = np.log1p(np.exp(-margin))  # -log sigmoid
        dloss_dd = -BETA / (1 + np.exp(margin))  # d loss / d chosen log-ratio (= - d loss / d rejected)
        dchosen, drejected = dloss_dd, -dloss_dd
    else:
        delta = d_chosen / length[:n] - d_rejected / length[n:] - 1 / (2 * BETA)
        losses = delta**2
        dchosen, drejected = 2 * delta / length[:n], -2 * delta / length[n:]
    expected_grad = np.concatenate([dchosen, drejected])[:, None, None] * dlogprob / n  # of the mean loss

    def mean_loss(lg):
        lp = sequence_logprobs(lg, ids, response)
        lens = response[:, 1:].sum(1).astype(np.float32)
        return jnp.mean(pair_losses(kind, lp[:n], lp[n:], ref[:n], ref[n:], lens[:n], lens[n:], BETA))

    lg = jnp.asarray(logits, jnp.float32)
    np.testing.assert_allclose(sequence_logprobs(lg, ids, response), logprob, rtol=1e-5)
    np.testing.assert_allclose(float(mean_loss(lg)), losses.mean(), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(jax.grad(mean_loss)(lg)), expected_grad, rtol=1e-4, atol=1e-7)


def test_unknown_loss_is_refused():
    x = jnp.zeros(2)
    with pytest.raises(ValueError, match="unknown preference loss 'kto'"):
        pair_losses("kto", x, x, x, x, x, x, 0.1)
    with pytest.raises(ConfigError, match="PreferenceConfig.loss"):
        PreferenceConfig(loss="hinge")


# Aggregation over groups: signs ----------------------------------------------------------------------------------
LOSSES = jnp.asarray([0.2, 0.4, 1.0, 1.4, 0.6, 0.9])
HARD = jax.nn.one_hot(jnp.asarray([0, 0, 1, 1, 2, 2]), 3)  # two pairs per group: group losses 0.3, 1.2, 0.75
SHARES = HARD.mean(0)


def aggregate(name, losses=LOSSES, membership=HARD, shares=SHARES, **kw):
    obj = make_objective(name, **kw)
    return aggregate_group_losses(obj, losses, membership, shares, obj.init(membership.shape[1]))


def test_group_losses_and_maxmin_takes_the_highest_loss():
    agg = aggregate("maxmin")
    np.testing.assert_allclose(agg.group_losses, [0.3, 1.2, 0.75], rtol=1e-6)
    np.testing.assert_allclose(agg.weights, [0.0, 1.0, 0.0])  # worst-off = highest loss = lowest utility
    np.testing.assert_allclose(agg.loss, 1.2, rtol=1e-6)
    # The gradient is the worst group's: d loss / d loss_n = w_nk / (p_k N) for its pairs, 0 elsewhere.
    grad = jax.grad(lambda l: aggregate("maxmin", losses=l).loss)(LOSSES)
    np.testing.assert_allclose(grad, [0, 0, 0.5, 0.5, 0, 0], atol=1e-7)


def test_utilitarian_with_shares_is_pooled_and_softmin_and_dro_weigh_by_loss():
    pooled = aggregate("utilitarian", weights=[1.0, 1.0, 1.0])
    np.testing.assert_allclose(pooled.loss, LOSSES.mean(), rtol=1e-6)  # equal shares: the plain mean
    soft = aggregate("softmin", temperature=0.5)
    group = np.array([0.3, 1.2, 0.75])
    np.testing.assert_allclose(soft.weights, np.exp(group / 0.5) / np.exp(group / 0.5).sum(), rtol=1e-5)
    dro = aggregate("dro", step_size=2.0)
    np.testing.assert_allclose(dro.weights, np.exp(2.0 * group) / np.exp(2.0 * group).sum(), rtol=1e-5)
    with pytest.raises(ConfigError, match="maxmin_sample"):
        aggregate("maxmin_sample")


def test_soft_membership_and_unbiased_minibatch_estimates():
    rng = np.random.default_rng(1)
    n = 12
    losses = jnp.asarray(rng.uniform(0.1, 2.0, n), jnp.float32)
    soft = jnp.asarray(rng.dirichlet(np.ones(3), n), jnp.float32)
    shares = soft.mean(0)
    full = aggregate("utilitarian", losses=losses, membership=soft, shares=shares).group_losses
    expected = (soft * losses[:, None]).sum(0) / soft.sum(0)  # each group's weighted mean loss
    np.testing.assert_allclose(full, expected, rtol=1e-5)
    # Averaged over a partition into equal minibatches, the minibatch estimates give the full-data group losses,
    # whatever each minibatch's group mix.
    parts = [aggregate("utilitarian", losses=losses[i::3], membership=soft[i::3], shares=shares).group_losses
             for i in range(3)]
    np.testing.assert_allclose(np.mean(parts, axis=0), expected, rtol=1e-5)
    # A minibatch of group 0's pairs only: each stands for 1 / p_0 = 3 pairs of the data set, and the absent groups
    # are estimated at 0 (no division by zero).
    absent = aggregate("maxmin", losses=LOSSES[:2], membership=HARD[:2], shares=SHARES)
    np.testing.assert_allclose(absent.group_losses, [0.9, 0.0, 0.0], rtol=1e-6)


def test_group_robust_weights_move_to_the_worst_group():
    """Exponentiated gradient on the group losses (Ramesh et al.): lambda_k <- lambda_k exp(eta L_k) / Z."""
    obj = make_objective("dro", step_size=0.5)
    state = obj.init(3)
    history = [np.asarray(state.weights)]
    for _ in range(30):
        agg = aggregate_group_losses(obj, LOSSES, HARD, SHARES, state)
        state = agg.objective
        history.append(np.asarray(agg.weights))
    history = np.array(history)
    assert np.all(np.diff(history[:, 1]) > 0) and np.all(np.diff(history[:, 0]) < 0)  # worst up, best down
    assert history[-1, 1] > 0.99
    np.testing.assert_allclose(np.log(history[-1, 1] / history[-1, 2]), 30 * 0.5 * (1.2 - 0.75), rtol=1e-4)


# Data path -------------------------------------------------------------------------------------------------------
def pad(seqs, t):
    ids, mask = np.zeros((len(seqs), t), np.int32), np.zeros((len(seqs), t), np.int32)
    for i, s in enumerate(seqs):
        ids[i, t - len(s):], mask[i, t - len(s):] = s, 1
    return ids, mask


def make_batch(triples, flips, t=12):
    """PairBatch of (prompt, a, b) triples: chosen a over b, or b over a where `flips` is set; EOS = 1."""
    chosen = [p + (b if f else a) + [1] for (p, a, b), f in zip(triples, flips)]
    rejected = [p + (a if f else b) + [1] for (p, a, b), f in zip(triples, flips)]
    (ci, cm), (ri, rm) = pad(chosen, t), pad(rejected, t)
    n = len(triples)
    return PairBatch(ci, cm, ri, rm, np.arange(n, dtype=np.int32), tuple(f"u{i}" for i in range(n)))


def random_triples(n, seed=0):
    rng = np.random.default_rng(seed)
    word = lambda lo, hi: [int(x) for x in rng.integers(3, CONFIG.vocab_size, rng.integers(lo, hi))]  # noqa: E731
    triples = []
    for _ in range(n):
        a, b = word(1, 5), word(1, 5)
        while a[0] == b[0]:  # responses that differ from their first token: the prompt is the shared prefix
            b = word(1, 5)
        triples.append((word(2, 5), a, b))
    return triples


def test_response_masks_and_group_weights():
    triples = random_triples(6)
    batch = make_batch(triples, [False] * 6)
    weights = pair_group_weights(batch.user_index, assignments=np.array([0, 1, 1, 0, 2, 2]))
    pairs = preference_pairs(batch, weights)
    prompt_lengths = np.array([len(p) for p, _, _ in triples])
    given = preference_pairs(batch, weights, prompt_lengths=prompt_lengths)
    np.testing.assert_array_equal(pairs.chosen_response, given.chosen_response)
    np.testing.assert_array_equal(pairs.rejected_response, given.rejected_response)
    np.testing.assert_array_equal(pairs.chosen_response.sum(1), [len(a) + 1 for _, a, _ in triples])  # + EOS
    np.testing.assert_allclose(pairs.group_shares(), [2 / 6, 2 / 6, 2 / 6])
    soft = pair_group_weights(batch.user_index, responsibilities=np.full((6, 2), 0.5))
    np.testing.assert_allclose(soft, 0.5)
    with pytest.raises(DataError, match="sum to 1.5000"):
        pair_group_weights(batch.user_index, responsibilities=np.full((6, 2), 0.75))
    with pytest.raises(ValueError, match="exactly one of"):
        pair_group_weights(batch.user_index)
    with pytest.raises(DataError, match="group 1 has no pairs"):
        preference_pairs(batch, pair_group_weights(batch.user_index, assignments=np.zeros(6, int), num_groups=3))
    same = make_batch([(triples[0][0], triples[0][1], triples[0][1])], [False])
    with pytest.raises(DataError, match="pair index 0: chosen and rejected are the same sequence"):
        preference_pairs(same, np.ones((1, 1)))
    with pytest.raises(DataError, match="pair index 2: prompt length 0; expected at least 1"):
        preference_pairs(batch, weights, prompt_lengths=np.where(np.arange(6) == 2, 0, prompt_lengths))
    with pytest.raises(DataError, match="pair index 0: the chosen response starts at the first token"):
        preference_pairs(make_batch([([], [5, 6], [7, 8])], [False]), np.ones((1, 1)))


def test_reference_logprobs_are_computed_once_in_chunks():
    triples = random_triples(7)
    pairs = preference_pairs(make_batch(triples, [False] * 7), np.ones((7, 1)))
    ref = build_model(CONFIG, rngs=nnx.Rngs(5))
    cached = with_reference_logprobs(ref, pairs, batch_size=3)  # 7 pairs: the last chunk wraps around
    logits = ref(jnp.asarray(pairs.chosen_ids), jnp.asarray(pairs.chosen_mask))
    np.testing.assert_allclose(cached.ref_chosen, sequence_logprobs(logits, pairs.chosen_ids, pairs.chosen_response),
                               rtol=1e-5)
    assert cached.ref_rejected.shape == (7,) and np.all(cached.ref_rejected < 0)
    trainer = PreferenceTrainer(build_model(CONFIG, rngs=nnx.Rngs(5)), make_objective("single"), [1.0])
    with pytest.raises(ValueError, match="no reference log-probs"):
        trainer.step(trainer.init_state(), pairs)
    with pytest.raises(ConfigError, match="has no offline meaning"):
        PreferenceTrainer(ref, make_objective("maxmin_sample"), [0.5, 0.5])


# The jitted step -------------------------------------------------------------------------------------------------
# 24 majority pairs (group 0) over 24 triples; the minority (group 1) reverses 8 of them: the two groups disagree
# on those 8, and agree on nothing else.
TRIPLES = random_triples(24, seed=3)
CONFLICT = make_batch(TRIPLES + TRIPLES[:8], [False] * 24 + [True] * 8, t=16)
GROUPS = np.array([0] * 24 + [1] * 8)
TOL = dict(rtol=1e-4, atol=1e-4)


def dpo_run(objective, mesh=None, steps=30, **objective_kwargs):
    """(history of metrics, the policy's parameters after 3 steps) of `steps` full-batch DPO steps."""
    pairs = preference_pairs(CONFLICT, pair_group_weights(CONFLICT.user_index, assignments=GROUPS))
    policy = build_model(CONFIG, rngs=nnx.Rngs(0))
    if mesh is not None:
        shard_module(policy, mesh)
    pairs = with_reference_logprobs(policy, pairs, batch_size=32, mesh=mesh)  # the reference is the initial policy
    trainer = PreferenceTrainer(policy, make_objective(objective, **objective_kwargs), pairs.group_shares(),
                                config=PreferenceConfig(loss="dpo", beta=0.5, learning_rate=3e-3))
    batch = shard_batch(pairs, mesh) if mesh is not None else pairs
    state, history, params = trainer.init_state(), [], None
    for step in range(steps):
        state, metrics = trainer.step(state, batch)
        history.append(jax.tree.map(np.asarray, metrics))
        compiled = offline._step._cache_size() if step == 0 else compiled
        if step == 2:
            params = {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(
                nnx.state(trainer.policy(state), nnx.Param))}
            wte = trainer.policy(state).wte[...]
            assert mesh is None or {s.data.shape for s in wte.addressable_shards} == {(wte.shape[0] // 2,
                                                                                       wte.shape[1] // 2)}
    assert offline._step._cache_size() == compiled  # the state comes back as it went in: one compile
    return history, params


@pytest.fixture(scope="module")
def dro_single():
    """Group-robust DPO: dro weights (step size 1) over the two groups, 30 full-batch steps."""
    return dpo_run("dro", step_size=1.0)


def test_sharded_step_matches_single_device(dro_single):
    """Three steps on a (2, 2, 2) mesh (the embedding split over tensor and fsdp, checked in `dpo_run`) against the
    first three of the single-device run."""
    history, params = dpo_run("dro", make_mesh(2, 2, 2), steps=3, step_size=1.0)
    ref_history, ref_params = dro_single
    for m, ref in zip(history, ref_history[:3]):
        for key in m:
            # Accuracies count the signs of margins, which start at 0 up to rounding: a few of 32 pairs may flip.
            tol = dict(rtol=0, atol=4 / 32) if key.endswith("accuracy") else TOL
            np.testing.assert_allclose(m[key], ref[key], **tol, err_msg=key)
    assert params.keys() == ref_params.keys()
    for key in params:
        np.testing.assert_allclose(params[key], ref_params[key], **TOL, err_msg=key)


def test_dro_weights_follow_the_group_losses(dro_single):
    """lambda after T steps = softmax(eta * sum_t L_t): the mirror-descent step on the losses the step logged."""
    history, _ = dro_single
    cumulative = np.cumsum([m["group_loss"].astype(np.float64) for m in history], axis=0)
    for m, c in zip(history, cumulative):
        np.testing.assert_allclose(m["group_weights"], np.exp(c) / np.exp(c).sum(), rtol=1e-4)
    assert history[0]["loss"] == pytest.approx(np.log(2), rel=1e-5)  # policy = reference: every margin is 0


def test_group_robust_dpo_protects_the_minority(dro_single):
    """Utilitarian DPO with the group shares as weights (= DPO on the pooled pairs) serves the majority and leaves
    the minority where the reference policy had it (log 2); group-robust weights lower the worst group's loss."""
    robust, _ = dro_single
    pooled, _ = dpo_run("utilitarian", weights=[24, 8])
    worst = lambda h: np.max(np.mean([m["group_loss"] for m in h[-5:]], axis=0))  # noqa: E731
    minority = lambda h: np.mean([m["group_loss"][1] for m in h[-5:]])  # noqa: E731
    # Measured: worst-group loss 0.39 with dro weights, 0.69 pooled (the minority's).
    assert worst(robust) < worst(pooled) - 0.1, (worst(robust), worst(pooled))
    assert minority(robust) < minority(pooled) - 0.1
    assert all(np.isfinite(m["loss"]) for m in robust + pooled)
    assert not any(v for m in robust + pooled for k, v in m.items() if k.startswith("fault/"))
    assert {k for k in robust[0] if k.startswith("fault/")} == {"fault/loss", "fault/group_loss", "fault/grad_norm"}
