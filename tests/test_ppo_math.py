"""PPO math against straightforward NumPy loops, on random inputs with ragged response masks."""

import dataclasses
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxmin_jax.policy import ppo

B, T = 6, 7
LENGTHS = np.array([7, 3, 1, 0, 5, 6])  # includes an empty and a full response


def ragged_mask():
    return (np.arange(T)[None, :] < LENGTHS[:, None]).astype(np.float32)


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    f = lambda *s: rng.normal(size=s).astype(np.float32)  # noqa: E731
    return {
        "mask": ragged_mask(),
        "logp": -np.abs(f(B, T)),
        "ref": -np.abs(f(B, T)),
        "old": -np.abs(f(B, T)),
        "values": f(B, T),  # garbage on masked positions on purpose
        "old_values": f(B, T),
        "returns": f(B, T),
        "adv": f(B, T),
        "rewards": f(B, T),
        "score": f(B),
    }


def test_masked_mean_empty_is_zero():
    assert float(ppo.masked_mean(jnp.ones((2, 3)), jnp.zeros((2, 3)))) == 0.0


@pytest.mark.parametrize("kind", ["kl", "mse"])
def test_kl_penalty(data, kind):
    d = data["logp"] - data["ref"]
    expected = (d if kind == "kl" else 0.5 * d**2) * data["mask"]
    got = jax.jit(ppo.kl_penalty, static_argnames="kind")(data["logp"], data["ref"], data["mask"], kind=kind)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)


def test_kl_penalty_unknown_kind(data):
    with pytest.raises(ValueError, match="unknown kl kind"):
        ppo.kl_penalty(data["logp"], data["ref"], data["mask"], kind="full")


def test_token_rewards(data):
    beta = 0.3
    expected = np.zeros((B, T), np.float64)
    for b in range(B):
        for t in range(LENGTHS[b]):
            expected[b, t] = -beta * (data["logp"][b, t] - data["ref"][b, t])
        if LENGTHS[b] > 0:
            expected[b, LENGTHS[b] - 1] += data["score"][b]
    got = jax.jit(ppo.token_rewards)(data["score"], data["logp"], data["ref"], data["mask"], beta)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def gae_reference(rewards, values, lengths, gamma, lam):
    adv = np.zeros_like(rewards, dtype=np.float64)
    for b, n in enumerate(lengths):
        last = 0.0
        for t in reversed(range(n)):
            next_value = values[b, t + 1] if t + 1 < n else 0.0
            delta = rewards[b, t] + gamma * next_value - values[b, t]
            last = delta + gamma * lam * last
            adv[b, t] = last
    mask = np.arange(rewards.shape[1])[None] < np.asarray(lengths)[:, None]
    return adv, np.where(mask, adv + values, 0.0)


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (0.99, 1.0)])
def test_gae(data, gamma, lam):
    adv, ret = jax.jit(ppo.gae, static_argnums=(3, 4))(data["rewards"], data["values"], data["mask"], gamma, lam)
    ref_adv, ref_ret = gae_reference(data["rewards"], data["values"], LENGTHS, gamma, lam)
    np.testing.assert_allclose(adv, ref_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret, ref_ret, rtol=1e-5, atol=1e-5)


def test_gae_lambda_one_gamma_one_is_reward_to_go(data):
    # With gamma = lam = 1 the return is the plain sum of future rewards: values cancel.
    _, ret = ppo.gae(data["rewards"], data["values"], data["mask"], 1.0, 1.0)
    r = data["rewards"] * data["mask"]
    to_go = np.cumsum(r[:, ::-1], axis=1)[:, ::-1] * data["mask"]
    np.testing.assert_allclose(ret, to_go, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shift_mean", [True, False])
def test_whiten(data, shift_mean):
    x, m = data["adv"], data["mask"].astype(bool)
    mean, std = x[m].mean(), x[m].std()
    expected = (x - mean) / std + (0.0 if shift_mean else mean)
    expected = np.where(m, expected, 0.0)
    got = jax.jit(ppo.whiten, static_argnames="shift_mean")(x, data["mask"], shift_mean=shift_mean)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_policy_loss(data):
    eps = 0.2
    losses, clipped_count, kls = [], 0, []
    for b in range(B):
        for t in range(LENGTHS[b]):
            ratio = np.exp(float(data["logp"][b, t]) - float(data["old"][b, t]))
            a = float(data["adv"][b, t])
            l1, l2 = -a * ratio, -a * min(max(ratio, 1 - eps), 1 + eps)
            losses.append(max(l1, l2))
            clipped_count += l2 > l1
            kls.append(ratio - 1 - np.log(ratio))
    loss, metrics = jax.jit(ppo.policy_loss)(data["logp"], data["old"], data["adv"], data["mask"], eps)
    np.testing.assert_allclose(loss, np.mean(losses), rtol=1e-5)
    np.testing.assert_allclose(metrics["clipfrac"], clipped_count / len(losses), rtol=1e-6)
    np.testing.assert_allclose(metrics["approx_kl"], np.mean(kls), rtol=1e-5)
    assert 0 < metrics["clipfrac"] < 1  # the random data exercises both branches


def test_policy_loss_gradient_stops_outside_clip():
    old = jnp.zeros((1, 3))
    logp = jnp.log(jnp.array([[1.5, 0.5, 1.05]]))  # ratio above, below and inside [0.8, 1.2]
    adv = jnp.array([[1.0, -1.0, 1.0]])
    mask = jnp.ones((1, 3))
    grad = jax.grad(lambda lp: ppo.policy_loss(lp, old, adv, mask, 0.2)[0])(logp)
    np.testing.assert_allclose(grad[0, :2], 0.0)
    np.testing.assert_allclose(grad[0, 2], -1.05 / 3, rtol=1e-5)


def test_value_loss(data):
    c = 0.2
    errs, clipped_count = [], 0
    for b in range(B):
        for t in range(LENGTHS[b]):
            v, ov, r = (float(data[k][b, t]) for k in ("values", "old_values", "returns"))
            vc = ov + min(max(v - ov, -c), c)
            e1, e2 = (v - r) ** 2, (vc - r) ** 2
            errs.append(max(e1, e2))
            clipped_count += e2 > e1
    loss, metrics = jax.jit(ppo.value_loss)(data["values"], data["old_values"], data["returns"], data["mask"], c)
    np.testing.assert_allclose(loss, 0.5 * np.mean(errs), rtol=1e-5)
    np.testing.assert_allclose(metrics["vf_clipfrac"], clipped_count / len(errs), rtol=1e-6)


def test_token_logprobs_and_entropy():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 4, 5)).astype(np.float32)
    tokens = rng.integers(0, 5, size=(2, 4))
    mask = np.array([[1, 1, 1, 0], [1, 0, 0, 0]], np.float32)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    np.testing.assert_allclose(
        ppo.token_logprobs(logits, tokens), np.take_along_axis(logp, tokens[..., None], -1)[..., 0], rtol=1e-5
    )
    ent = -(np.exp(logp) * logp).sum(-1)
    np.testing.assert_allclose(ppo.masked_entropy(logits, mask), ent[mask > 0].mean(), rtol=1e-5)


def test_adaptive_kl_controller():
    ctl = ppo.AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=1000.0)
    state = ctl.init()
    update = jax.jit(ctl.update, static_argnums=1)
    up = update(jnp.float32(9.0), 100, state)  # KL above target: beta rises (error clipped to 0.2)
    np.testing.assert_allclose(up.beta, 0.1 * (1 + 0.2 * 100 / 1000), rtol=1e-6)
    down = update(jnp.float32(5.4), 100, state)  # KL 10% under target: beta falls by 1%
    np.testing.assert_allclose(down.beta, 0.1 * (1 - 0.1 * 100 / 1000), rtol=1e-5)
    same = update(jnp.float32(6.0), 100, state)
    np.testing.assert_allclose(same.beta, 0.1, rtol=1e-6)
    fixed = ppo.FixedKLController(0.05)
    np.testing.assert_allclose(fixed.update(jnp.float32(100.0), 100, fixed.init()).beta, 0.05)


def test_ppo_config():
    cfg = ppo.PPOConfig()
    assert cfg.clip_eps == 0.2 and cfg.vf_coef == 0.1 and cfg.gamma == 1.0 and cfg.lam == 0.95
    assert isinstance(ppo.kl_controller(cfg), ppo.FixedKLController)
    assert isinstance(ppo.kl_controller(ppo.PPOConfig(adaptive_kl=True)), ppo.AdaptiveKLController)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.clip_eps = 0.3
    with pytest.raises(TypeError):
        ppo.PPOConfig(0.3)  # keyword-only
    with pytest.raises(ValueError, match="lam"):
        ppo.PPOConfig(lam=1.5)
    with pytest.raises(ValueError, match="kl_kind"):
        ppo.PPOConfig(kl_kind="full")
    # Every field is documented (an attribute docstring on the line after it).
    src = inspect.getsource(ppo.PPOConfig)
    for f in dataclasses.fields(ppo.PPOConfig):
        assert f'{f.name}:' in src and '"""' in src.split(f"{f.name}:", 1)[1].split("\n", 2)[1]
