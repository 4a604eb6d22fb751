"""A K-group, R-response bandit with known rewards: the smallest problem on which the objectives can be checked
against exact optima.

The policy is a softmax over R responses (logits theta [R]); group k's utility is U_k(pi) = sum_r pi_r R[k, r],
computed exactly (no sampling noise). `optimise_bandit` feeds U to the same objective code the PPO trainer uses
(as a batch of one row) and ascends `stop_gradient(weights) . U(pi)`: the objective's weights are the
(sub)gradient direction, e.g. grad U_{k*} for maxmin. `optimise_bandit_sampled` learns from sampled responses
instead, as the critic-free trainers do: G samples per "prompt", the objective on their [B, K] rewards, a
critic-free advantage estimator, and the clipped policy-gradient loss. The exact optima come independently from
linear programs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from maxmin_jax.policy.advantages import make_estimator, policy_gradient_loss
from maxmin_jax.policy.objectives import make_objective
from maxmin_jax.policy.ppo import terminal_rewards

if TYPE_CHECKING:  # shape annotations only; jaxtyping is not a runtime dependency
    from jaxtyping import Array, Float

__all__ = ["BanditResult", "LPSolution", "egalitarian_optimum", "optimise_bandit", "optimise_bandit_sampled",
           "utilitarian_optimum"]


class BanditResult(NamedTuple):
    probs: Float[Array, "r"]  # final policy
    utilities: Float[Array, "k"]  # U_k of the final policy
    weights: Float[Array, "k"]  # the objective's last group weights
    utility_trace: Float[Array, "steps k"]  # U_k before each step


class LPSolution(NamedTuple):
    value: float  # optimal objective value
    probs: np.ndarray  # [R] an optimal policy
    utilities: np.ndarray  # [K] group utilities of that policy


def _check_matrix(group_rewards) -> np.ndarray:
    r = np.asarray(group_rewards, dtype=np.float64)
    if r.ndim != 2 or 0 in r.shape:
        raise ValueError(f"group_rewards must be a non-empty [K, R] matrix, got shape {r.shape}")
    return r


def optimise_bandit(
    objective_name: str,
    group_rewards: Float[Array, "k r"],
    *,
    steps: int = 2000,
    lr: float = 0.1,
    objective_kwargs: dict | None = None,
    init_logits: Float[Array, "r"] | None = None,
) -> BanditResult:
    """Gradient ascent (Adam, cosine-decayed learning rate) on the objective applied to exact group utilities.

    The decay matters for maxmin: its subgradient jumps between tied groups, and a constant step would keep
    the iterate oscillating around the optimum instead of settling on it. Starts from the uniform policy.
    """
    rewards = jnp.asarray(_check_matrix(group_rewards), jnp.float32)
    num_groups, num_responses = rewards.shape
    objective = make_objective(objective_name, **(objective_kwargs or {}))
    optimiser = optax.adam(optax.cosine_decay_schedule(lr, steps))
    theta = jnp.zeros((num_responses,), jnp.float32) if init_logits is None else jnp.asarray(init_logits)

    def utilities(logits):
        return rewards @ jax.nn.softmax(logits)

    def step(carry, _):
        theta, opt_state, obj_state = carry
        u = utilities(theta)
        _, weights, obj_state = objective.update(u[None, :], obj_state)
        # Weights are constants of the step: the gradient of w . U is the (sub)gradient of the aggregate.
        grad = jax.grad(lambda t: -jnp.dot(jax.lax.stop_gradient(weights), utilities(t)))(theta)
        updates, opt_state = optimiser.update(grad, opt_state)
        return (optax.apply_updates(theta, updates), opt_state, obj_state), u

    @jax.jit
    def run(theta):
        init = (theta, optimiser.init(theta), objective.init(num_groups))
        (theta, _, obj_state), trace = jax.lax.scan(step, init, None, length=steps)
        return theta, obj_state.weights, trace

    theta, weights, trace = run(theta)
    return BanditResult(jax.nn.softmax(theta), utilities(theta), weights, trace)


def optimise_bandit_sampled(
    objective_name: str,
    estimator_name: str,
    group_rewards: Float[Array, "k r"],
    *,
    prompts: int = 16,
    group_size: int = 8,
    steps: int = 2000,
    lr: float = 0.1,
    seeds: Sequence[int] = (0,),
    objective_kwargs: dict | None = None,
) -> BanditResult:
    """Policy-gradient ascent from sampled responses: the critic-free trainers' update on the bandit.

    Each step draws `prompts` x `group_size` responses from the policy (row p * G + g is sample g of prompt p; the
    bandit has one context, so the prompts are alike), scores each by the K groups, lets the objective turn the
    [B, K] rewards into one reward per response, the estimator into advantages, and takes one Adam step
    (cosine-decayed) on `policy_gradient_loss` with the sampling policy as the old one (ratio 1: the REINFORCE
    gradient of that estimator). Starts from the uniform policy. One independent run per seed, vmapped into one
    program: every field of the result has a leading axis of len(seeds); `utility_trace` holds the exact U_k
    before each step.
    """
    rewards = jnp.asarray(_check_matrix(group_rewards), jnp.float32)
    num_groups, num_responses = rewards.shape
    objective = make_objective(objective_name, **(objective_kwargs or {}))
    estimator = make_estimator(estimator_name, group_size=group_size)
    if estimator.uses_critic:
        raise ValueError(f"estimator {estimator_name!r} needs a critic; the sampled bandit is critic-free")
    optimiser = optax.adam(optax.cosine_decay_schedule(lr, steps))
    batch = prompts * group_size
    mask = jnp.ones((batch, 1), jnp.float32)  # a response is one token

    def step(carry, key):
        theta, opt_state, obj_state = carry
        responses = jax.random.categorical(key, theta, shape=(batch,))
        reward, _, obj_state = objective.update(rewards[:, responses].T, obj_state)
        advantages, _ = estimator.estimate(terminal_rewards(reward, mask), mask)

        def loss(t):
            logprobs = jax.nn.log_softmax(t)[responses][:, None]
            value, _ = policy_gradient_loss(logprobs, jax.lax.stop_gradient(logprobs), advantages, mask,
                                            normalization=estimator.loss_normalization, clip_eps=0.2)
            return value

        updates, opt_state = optimiser.update(jax.grad(loss)(theta), opt_state)
        return (optax.apply_updates(theta, updates), opt_state, obj_state), rewards @ jax.nn.softmax(theta)

    def run(key):
        theta = jnp.zeros((num_responses,), jnp.float32)
        init = (theta, optimiser.init(theta), objective.init(num_groups))
        (theta, _, obj_state), trace = jax.lax.scan(step, init, jax.random.split(key, steps))
        probs = jax.nn.softmax(theta)
        return BanditResult(probs, rewards @ probs, obj_state.weights, trace)

    keys = jnp.stack([jax.random.key(s) for s in seeds])
    return jax.jit(jax.vmap(run))(keys)


def _linprog(c, **kwargs):
    from scipy.optimize import linprog  # test-extra dependency: imported only when an optimum is asked for

    res = linprog(c, method="highs", **kwargs)
    if not res.success:
        raise RuntimeError(f"linprog failed: {res.message}")
    return res.x


def egalitarian_optimum(group_rewards: Float[Array, "k r"]) -> LPSolution:
    """max_pi min_k U_k(pi) as the LP: max t s.t. R pi >= t, sum pi = 1, pi >= 0."""
    r = _check_matrix(group_rewards)
    num_groups, num_responses = r.shape
    # Variables [pi_1..pi_R, t]; linprog minimises, so minimise -t.
    c = np.zeros(num_responses + 1)
    c[-1] = -1.0
    a_ub = np.hstack([-r, np.ones((num_groups, 1))])  # t - R_k pi <= 0
    a_eq = np.hstack([np.ones((1, num_responses)), np.zeros((1, 1))])
    bounds = [(0.0, None)] * num_responses + [(None, None)]
    x = _linprog(c, A_ub=a_ub, b_ub=np.zeros(num_groups), A_eq=a_eq, b_eq=[1.0], bounds=bounds)
    pi = x[:-1]
    return LPSolution(value=float(x[-1]), probs=pi, utilities=r @ pi)


def utilitarian_optimum(group_rewards: Float[Array, "k r"], weights: Sequence[float] | None = None) -> LPSolution:
    """max_pi sum_k w_k U_k(pi) over the simplex (w normalised; uniform by default), as an LP."""
    r = _check_matrix(group_rewards)
    num_groups, num_responses = r.shape
    w = np.full(num_groups, 1.0 / num_groups) if weights is None else np.asarray(weights, np.float64)
    if w.shape != (num_groups,) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"weights must be {num_groups} non-negative numbers, got {weights}")
    w = w / w.sum()
    x = _linprog(
        -(w @ r),
        A_eq=np.ones((1, num_responses)),
        b_eq=[1.0],
        bounds=[(0.0, None)] * num_responses,
    )
    return LPSolution(value=float(w @ r @ x), probs=x, utilities=r @ x)
