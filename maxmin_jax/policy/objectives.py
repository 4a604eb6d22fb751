"""Social-choice aggregators: how K group rewards become the one reward PPO maximises.

Each objective is an optax-style pair of pure functions:

    obj = make_objective("maxmin")
    state = obj.init(num_groups)
    reward, weights, state = obj.update(group_rewards, state)   # [B, K] -> [B], [K]

`weights` are the group weights the update used (for logging and for the bandit's subgradient); the reward is
always `group_rewards @ weights`, except `maxmin_sample`, whose weights differ per sample. Configuration is
static (closed over), so `update` is jittable and has no Python control flow on traced values.

Group rewards must be on one scale before they are compared: see `RewardStandardizer`.

`make_objective(name, lagged=True)` weighs each batch with the weights the previous batches chose (the state),
then updates them on this batch. By default maxmin, softmin and dro choose their weights on the very samples they
weigh, so a response that helps some groups and hurts another makes that group look worst in the batch it is in
and is penalised for it: the update then prefers responses every group rates alike over the egalitarian optimum
(on the sampled bandit it settles on the flat compromise, see docs/algorithms.md). Lagged weights do not depend
on the samples they weigh, at the price of one batch of staleness (the first batch is weighed uniformly).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

if TYPE_CHECKING:  # shape annotations only; jaxtyping is not a runtime dependency
    from jaxtyping import Array, Float, Int

__all__ = [
    "OBJECTIVES",
    "Objective",
    "ObjectiveState",
    "RewardStandardizer",
    "make_objective",
]


class ObjectiveState(NamedTuple):
    """One state type for every objective, so trainers can carry and checkpoint it uniformly.

    weights: the group weights of the last update (uniform after `init`); `dro` reads them back as lambda.
    step: number of updates so far.
    """

    weights: Float[Array, "k"]
    step: Int[Array, ""]


class Objective(NamedTuple):
    init: Callable[[int], ObjectiveState]
    update: Callable[
        [Float[Array, "b k"], ObjectiveState],
        tuple[Float[Array, "b"], Float[Array, "k"], ObjectiveState],
    ]
    name: str = ""  # the registry name `make_objective` built it under (for error messages and dispatch)


def _init(num_groups: int) -> ObjectiveState:
    if num_groups < 1:
        raise ValueError(f"num_groups must be >= 1, got {num_groups}")
    return ObjectiveState(
        weights=jnp.full((num_groups,), 1.0 / num_groups, jnp.float32),
        step=jnp.zeros((), jnp.int32),
    )


def _check_rewards(group_rewards, state: ObjectiveState) -> jax.Array:
    # Shapes are static under jit, so these checks cost nothing at run time.
    group_rewards = jnp.asarray(group_rewards)
    if group_rewards.ndim != 2:
        raise ValueError(f"group_rewards must be [B, K], got shape {group_rewards.shape}")
    if group_rewards.shape[1] != state.weights.shape[0]:
        raise ValueError(
            f"group_rewards has K={group_rewards.shape[1]} groups but the objective state was "
            f"initialised for K={state.weights.shape[0]}"
        )
    return group_rewards


def _advance(state: ObjectiveState, weights) -> ObjectiveState:
    return ObjectiveState(weights=weights.astype(state.weights.dtype), step=state.step + 1)


def _group_utilities(group_rewards) -> jax.Array:
    """Batch estimate of each group's utility U_k = mean_b r_bk."""
    return jnp.mean(group_rewards, axis=0)


def single() -> Objective:
    """Standard RLHF: the one reward of a BT model fitted on pooled data (K must be 1)."""

    def init(num_groups: int) -> ObjectiveState:
        if num_groups != 1:
            raise ValueError(
                f"objective 'single' takes the pooled reward model only (K=1), got K={num_groups}; "
                "use 'utilitarian' to combine several groups"
            )
        return _init(1)

    def update(group_rewards, state):
        group_rewards = _check_rewards(group_rewards, state)
        weights = jnp.ones((1,), group_rewards.dtype)
        return group_rewards[:, 0], weights, _advance(state, weights)

    return Objective(init, update)


def utilitarian(weights: Sequence[float] | None = None) -> Objective:
    """sum_k w_k r_k with fixed weights (the EM mixing weights, i.e. group shares); uniform by default.

    Weights are normalised to sum to one so the reward scale does not depend on how they were given.
    """
    if weights is not None:
        w = np.asarray(weights, dtype=np.float64)
        if w.ndim != 1 or w.size == 0 or np.any(w < 0) or not np.isfinite(w).all() or w.sum() <= 0:
            raise ValueError(f"utilitarian weights must be a non-empty 1-D non-negative vector, got {weights}")
        w = (w / w.sum()).astype(np.float32)

    def init(num_groups: int) -> ObjectiveState:
        if weights is not None and w.shape[0] != num_groups:
            raise ValueError(f"utilitarian got {w.shape[0]} weights for K={num_groups} groups")
        state = _init(num_groups)
        return state if weights is None else state._replace(weights=jnp.asarray(w))

    def update(group_rewards, state):
        group_rewards = _check_rewards(group_rewards, state)
        k = group_rewards.shape[1]
        if weights is not None and w.shape[0] != k:
            raise ValueError(f"utilitarian got {w.shape[0]} weights for K={k} groups")
        ws = jnp.full((k,), 1.0 / k, jnp.float32) if weights is None else jnp.asarray(w)
        ws = ws.astype(group_rewards.dtype)
        return group_rewards @ ws, ws, _advance(state, ws)

    return Objective(init, update)


def maxmin() -> Objective:
    """The paper's algorithm: optimise only the group whose batch utility is lowest (ties -> lowest index)."""

    def update(group_rewards, state):
        group_rewards = _check_rewards(group_rewards, state)
        worst = jnp.argmin(_group_utilities(group_rewards))
        ws = jax.nn.one_hot(worst, group_rewards.shape[1], dtype=group_rewards.dtype)
        return group_rewards @ ws, ws, _advance(state, ws)

    return Objective(_init, update)


def maxmin_sample() -> Objective:
    """The paper's released code: each sample's reward is its worst group reward, min_k r_bk.

    weights = fraction of samples whose minimum is group k (ties -> lowest index).
    """

    def update(group_rewards, state):
        group_rewards = _check_rewards(group_rewards, state)
        k = group_rewards.shape[1]
        ws = jnp.mean(jax.nn.one_hot(jnp.argmin(group_rewards, axis=1), k, dtype=group_rewards.dtype), axis=0)
        return jnp.min(group_rewards, axis=1), ws, _advance(state, ws)

    return Objective(_init, update)


def softmin(temperature: float = 1.0) -> Objective:
    """Smooth egalitarian: weights softmax(-U / tau). tau -> 0 recovers maxmin, tau -> inf the mean.

    With weights held constant, grad(w . U) equals the gradient of the soft minimum -tau logsumexp(-U / tau),
    so PPO on this reward ascends the soft minimum.
    """
    if not temperature > 0:
        raise ValueError(f"softmin temperature must be > 0, got {temperature}")

    def update(group_rewards, state):
        group_rewards = _check_rewards(group_rewards, state)
        ws = jax.nn.softmax(-_group_utilities(group_rewards) / temperature)
        return group_rewards @ ws, ws, _advance(state, ws)

    return Objective(_init, update)


def dro(step_size: float = 1.0) -> Objective:
    """Group DRO (Sagawa et al. 2020) on utilities: lambda <- normalise(lambda * exp(-eta * U)), kept across steps.

    The group that keeps losing accumulates weight; the reward uses the freshly updated lambda (online mirror
    descent order: update the adversary, then the learner). Done in log space for stability.
    """
    if not step_size >= 0:
        raise ValueError(f"dro step_size must be >= 0, got {step_size}")

    def update(group_rewards, state):
        group_rewards = _check_rewards(group_rewards, state)
        utilities = _group_utilities(group_rewards)
        ws = jax.nn.softmax(jnp.log(state.weights) - step_size * utilities.astype(state.weights.dtype))
        ws = ws.astype(group_rewards.dtype)
        return group_rewards @ ws, ws, _advance(state, ws)

    return Objective(_init, update)


_REGISTRY: dict[str, Callable[..., Objective]] = {
    "single": single,
    "utilitarian": utilitarian,
    "maxmin": maxmin,
    "maxmin_sample": maxmin_sample,
    "softmin": softmin,
    "dro": dro,
}
OBJECTIVES: tuple[str, ...] = tuple(_REGISTRY)


def _lagged(objective: Objective) -> Objective:
    """The same objective, but each batch is weighed by the weights chosen on the batches before it."""

    def update(group_rewards, state):
        _, _, new_state = objective.update(group_rewards, state)
        ws = state.weights.astype(group_rewards.dtype)
        return group_rewards @ ws, ws, new_state

    return Objective(objective.init, update, objective.name)


def make_objective(name: str, *, lagged: bool = False, **kwargs) -> Objective:
    """Build an objective by name: single, utilitarian(weights), maxmin, maxmin_sample, softmin(temperature),
    dro(step_size). `lagged=True`: weights chosen on the previous batches (see the module docstring). The same
    name and arguments give the same `Objective` object, so jitted steps that take it as a static argument compile
    once for all trainers built alike."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown objective {name!r}; choose one of {', '.join(OBJECTIVES)}")
    if lagged and name == "maxmin_sample":
        raise ValueError("objective 'maxmin_sample' weighs each sample by its own minimum: it cannot be lagged")
    frozen = tuple(sorted((k, _hashable(v)) for k, v in kwargs.items()))
    try:
        hash(frozen)
    except TypeError:
        return _build(name, bool(lagged), kwargs)
    return _cached(name, bool(lagged), frozen)


def _hashable(value):
    if isinstance(value, (list, tuple, np.ndarray)):
        return tuple(_hashable(v) for v in np.asarray(value).tolist()) if np.ndim(value) else value
    return value


@functools.lru_cache(maxsize=256)
def _cached(name: str, lagged: bool, frozen: tuple) -> Objective:
    return _build(name, lagged, dict(frozen))


def _build(name: str, lagged: bool, kwargs: dict) -> Objective:
    try:
        objective = _REGISTRY[name](**kwargs)._replace(name=name)
    except TypeError as e:  # unexpected keyword: say which objective
        raise TypeError(f"objective {name!r}: {e}") from None
    return _lagged(objective) if lagged else objective


class RewardStandardizer(NamedTuple):
    """Per-group affine standardisation against the reference policy: r_k <- (r_k - mean_k) / std_k.

    Reward models are identified only up to an offset (BT sees differences), so "worst-off group" is meaningless
    until each r_k is put on a common scale; after `fit` on the reference policy's samples, 0 is the reference
    policy's utility for every group and 1 is one reference standard deviation.
    """

    mean: Float[Array, "k"]
    std: Float[Array, "k"]

    @classmethod
    def fit(cls, reference_rewards: Float[Array, "n k"], eps: float = 1e-6) -> RewardStandardizer:
        r = jnp.asarray(reference_rewards, jnp.float32)
        if r.ndim != 2 or r.shape[0] < 1:
            raise ValueError(f"reference_rewards must be [N>=1, K], got shape {r.shape}")
        # The floor keeps a constant reward column from dividing by zero.
        return cls(mean=jnp.mean(r, axis=0), std=jnp.maximum(jnp.std(r, axis=0), eps))

    @classmethod
    def identity(cls, num_groups: int) -> RewardStandardizer:
        return cls(mean=jnp.zeros((num_groups,), jnp.float32), std=jnp.ones((num_groups,), jnp.float32))

    def apply(self, rewards: Float[Array, "... k"]) -> Float[Array, "... k"]:
        return (rewards - self.mean) / self.std
