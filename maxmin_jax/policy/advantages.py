"""Advantage estimators: how the objective's reward becomes per-token advantages, chosen by name like objectives.

    estimator = make_estimator("grpo", group_size=8)
    advantages, returns = estimator.estimate(rewards, mask, values)   # [B, T] -> [B, T], [B, T] or None

The objective turns the K group rewards of each response into one reward (`objectives.py`); the estimator turns
those rewards into advantages; `policy_gradient_loss` turns advantages into the clipped loss. Any objective
composes with any estimator. Inputs follow `ppo.py`: `rewards` [B, T] are per response token (the objective's
reward on each response's last real token, `ppo.terminal_rewards`, plus any per-token penalty folded in), `mask`
[B, T] is 1 on real response tokens.

- `gae`: per-token advantages from a learned value (a critic; PPO). `returns` are the value targets.
- `grpo`, `dr_grpo`, `rloo`: critic-free. The batch is laid out as [P prompts x G samples]: row p * G + g is
  sample g of prompt p (`jnp.repeat(prompts, G, axis=0)`). A response's return is R = sum_t r_t; its advantage,
  the same on every one of its tokens, compares R with the other samples of the same prompt:
  - grpo (Shao et al. 2024): (R - mean_G R) / (std_G R + eps), std with Bessel's correction (as TRL);
  - dr_grpo (Liu et al. 2025, "GRPO done right"): R - mean_G R, no division by the std;
  - rloo (Ahmadian et al. 2024): R - mean of the G - 1 other samples' returns (leave-one-out baseline), which
    equals G / (G - 1) (R - mean_G R): unbiased, since the baseline does not depend on the response it scores.

Each estimator also fixes how the loss weighs tokens (`loss_normalization`), because GRPO and Dr.GRPO differ in
exactly that: "sequence" averages each response over its own tokens, then over responses (GRPO: a token of a short
response weighs more, the length bias Dr.GRPO removes); "constant" sums tokens and divides by B x T, the response
budget (Dr.GRPO, and RLOO's REINFORCE gradient, sum_t grad log pi, up to the constant 1 / T); "token" averages over
all real tokens of the batch (PPO).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Callable, NamedTuple

import jax.numpy as jnp

from maxmin_jax.errors import ConfigError
from maxmin_jax.policy.ppo import approx_kl, clipped_surrogate, gae, kl_penalty, masked_mean, whiten

if TYPE_CHECKING:  # shape annotations only; jaxtyping is not a runtime dependency
    from jaxtyping import Array, Float

__all__ = [
    "CRITIC_FREE_ESTIMATORS",
    "ESTIMATORS",
    "LOSS_KL_KINDS",
    "LOSS_NORMALIZATIONS",
    "Estimator",
    "group_relative_advantages",
    "group_view",
    "loss_token_weights",
    "make_estimator",
    "policy_gradient_loss",
    "rloo_advantages",
    "sequence_returns",
]

LOSS_NORMALIZATIONS = ("token", "sequence", "constant")
# KL estimators whose gradient, added to the loss, pulls toward the reference. On samples of pi the expected
# gradient of k3 (GRPO's) is grad KL(ref || pi), that of k2 ("mse") is grad KL(pi || ref). k1's has zero mean, so as
# a loss term it only adds noise: it belongs in the reward (PPO), not in the loss.
LOSS_KL_KINDS = ("k3", "mse")


class Estimator(NamedTuple):
    """An advantage estimator: `estimate(rewards [B, T], mask [B, T], values [B, T] | None) -> (advantages [B, T],
    returns [B, T] | None)`, pure and jittable; the rest is static configuration the trainers read."""

    estimate: Callable
    name: str
    group_size: int
    """Samples per prompt the batch must be laid out in (1: no grouping)."""
    uses_critic: bool
    """Needs the value head's `values` (and gives value targets as `returns`)."""
    loss_normalization: str
    """How `policy_gradient_loss` weighs tokens: one of LOSS_NORMALIZATIONS."""


def sequence_returns(rewards: Float[Array, "b t"], mask: Float[Array, "b t"]) -> Float[Array, "b"]:
    """Undiscounted return of each response: the sum of its per-token rewards over real tokens."""
    return jnp.sum(rewards * mask.astype(rewards.dtype), axis=1)


def group_view(x: Float[Array, "b *rest"], group_size: int) -> Float[Array, "p g *rest"]:
    """Rows regrouped as [prompts, samples]: row p * G + g becomes [p, g]. The batch must divide by G."""
    b = x.shape[0]
    if b % group_size:
        raise ValueError(f"batch of {b} responses is not a whole number of groups of {group_size} samples per "
                         "prompt; lay it out as jnp.repeat(prompts, group_size, axis=0)")
    return x.reshape(b // group_size, group_size, *x.shape[1:])


def group_relative_advantages(returns: Float[Array, "b"], group_size: int, *, scale: bool = True,
                              eps: float = 1e-4) -> Float[Array, "b"]:
    """R minus the mean return of its prompt's G samples; divided by their std (Bessel-corrected) + eps when
    `scale` (GRPO), not (Dr.GRPO). A prompt whose samples all score the same gives advantages of 0."""
    r = group_view(returns, group_size)
    centred = r - jnp.mean(r, axis=1, keepdims=True)
    if scale:
        centred = centred / (jnp.std(r, axis=1, ddof=1, keepdims=True) + eps)
    return centred.reshape(returns.shape)


def rloo_advantages(returns: Float[Array, "b"], group_size: int) -> Float[Array, "b"]:
    """R minus the mean return of the other G - 1 samples of the same prompt."""
    r = group_view(returns, group_size)
    baseline = (jnp.sum(r, axis=1, keepdims=True) - r) / (group_size - 1)
    return (r - baseline).reshape(returns.shape)


def loss_token_weights(mask: Float[Array, "b t"], normalization: str) -> Float[Array, "b t"]:
    """Weight of each token in the policy loss, 0 on masked positions; the loss is sum(per_token * weights)."""
    mask = mask.astype(jnp.float32)
    b, t = mask.shape
    if normalization == "token":
        return mask / jnp.maximum(jnp.sum(mask), 1.0)
    if normalization == "sequence":
        return mask / jnp.maximum(jnp.sum(mask, axis=1, keepdims=True), 1.0) / b
    if normalization == "constant":
        return mask / (b * t)
    raise ValueError(f"unknown loss normalization {normalization!r}; choose one of {LOSS_NORMALIZATIONS}")


def policy_gradient_loss(
    logprobs: Float[Array, "b t"],
    old_logprobs: Float[Array, "b t"],
    advantages: Float[Array, "b t"],
    mask: Float[Array, "b t"],
    *,
    normalization: str,
    clip_eps: float,
    ref_logprobs: Float[Array, "b t"] | None = None,
    kl_coef: float = 0.0,
    kl_kind: str = "k3",
) -> tuple[Float[Array, ""], dict[str, Float[Array, ""]]]:
    """Clipped surrogate plus `kl_coef` times a per-token KL estimate to the reference, both weighed by
    `loss_token_weights(mask, normalization)` (GRPO's loss with normalization="sequence", kl_kind="k3").

    metrics: policy_loss (the surrogate term), kl_penalty (the weighted KL estimate, when a reference is given),
    clipfrac and approx_kl (k3 estimate of KL(old || new)), both plain means over real tokens.
    """
    per_token, clipped = clipped_surrogate(logprobs, old_logprobs, advantages, clip_eps)
    weights = loss_token_weights(mask, normalization)
    pg = jnp.sum(per_token * weights)
    log_ratio = logprobs - old_logprobs
    metrics = {"policy_loss": pg, "clipfrac": masked_mean(clipped, mask),
               "approx_kl": approx_kl(log_ratio, mask)}
    if ref_logprobs is None:
        return pg, metrics
    if kl_kind not in LOSS_KL_KINDS:
        raise ValueError(f"kl_kind {kl_kind!r} cannot be a loss term; choose one of {LOSS_KL_KINDS}")
    kl = jnp.sum(kl_penalty(logprobs, ref_logprobs, mask, kl_kind) * weights)
    metrics["kl_penalty"] = kl
    return pg + kl_coef * kl, metrics


# The registry -----------------------------------------------------------------------------------------------------
def _check_group_size(name: str, group_size) -> int:
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 2:
        raise ConfigError(f"estimator {name!r} compares samples of the same prompt: group_size must be an int >= 2, "
                          f"got {group_size!r}", key="group_size")
    return group_size


def _critic_free(name: str, group_size: int, advantages_fn: Callable, normalization: str) -> Estimator:
    group_size = _check_group_size(name, group_size)

    def estimate(rewards, mask, values=None):
        del values  # critic-free: nothing to bootstrap from
        mask = mask.astype(jnp.float32)
        per_response = advantages_fn(sequence_returns(rewards, mask), group_size)
        return per_response[:, None] * mask, None

    return Estimator(estimate, name, group_size, False, normalization)


def gae_estimator(gamma: float = 1.0, lam: float = 0.95, whiten_advantages: bool = True) -> Estimator:
    """PPO's estimator: GAE(gamma, lambda) on the critic's values, then whitened over the batch's real tokens."""
    for field, value in (("gamma", gamma), ("lam", lam)):
        if not 0 <= value <= 1:
            raise ConfigError(f"estimator 'gae': {field} must be in [0, 1], got {value}", key=field)

    def estimate(rewards, mask, values=None):
        if values is None:
            raise ValueError("estimator 'gae' needs the critic's values; critic-free runs use grpo, dr_grpo or rloo")
        advantages, returns = gae(rewards, values, mask, gamma, lam)
        return (whiten(advantages, mask) if whiten_advantages else advantages), returns

    return Estimator(estimate, "gae", 1, True, "token")


def grpo(group_size: int, eps: float = 1e-4) -> Estimator:
    """Group-relative advantages standardised within the prompt's samples; per-response length normalisation."""
    if not eps > 0:
        raise ConfigError(f"estimator 'grpo': eps must be > 0, got {eps}", key="eps")
    return _critic_free("grpo", group_size, lambda r, g: group_relative_advantages(r, g, scale=True, eps=eps),
                        "sequence")


def dr_grpo(group_size: int) -> Estimator:
    """Group-relative advantages, centred only; tokens summed over a constant B x T (no length bias)."""
    return _critic_free("dr_grpo", group_size, lambda r, g: group_relative_advantages(r, g, scale=False),
                        "constant")


def rloo(group_size: int) -> Estimator:
    """REINFORCE with the leave-one-out baseline; tokens summed over a constant B x T."""
    return _critic_free("rloo", group_size, rloo_advantages, "constant")


_REGISTRY: dict[str, Callable[..., Estimator]] = {"gae": gae_estimator, "grpo": grpo, "dr_grpo": dr_grpo,
                                                  "rloo": rloo}
ESTIMATORS: tuple[str, ...] = tuple(_REGISTRY)
CRITIC_FREE_ESTIMATORS: tuple[str, ...] = ("grpo", "dr_grpo", "rloo")


def make_estimator(name: str, **kwargs) -> Estimator:
    """Build an estimator by name: gae(gamma, lam, whiten_advantages), grpo(group_size, eps), dr_grpo(group_size),
    rloo(group_size). The same name and arguments give the same `Estimator` object, so jitted steps that take it as
    a static argument compile once for all trainers built alike."""
    if name not in _REGISTRY:
        raise ConfigError(f"unknown estimator {name!r}; choose one of {', '.join(ESTIMATORS)}", key="estimator")
    frozen = tuple(sorted(kwargs.items()))
    try:
        hash(frozen)
    except TypeError:
        return _build(name, frozen)
    return _cached(name, frozen)


@functools.lru_cache(maxsize=64)
def _cached(name: str, frozen: tuple) -> Estimator:
    return _build(name, frozen)


def _build(name: str, frozen: tuple) -> Estimator:
    try:
        return _REGISTRY[name](**dict(frozen))
    except TypeError as e:  # unexpected or missing keyword: say which estimator
        raise TypeError(f"estimator {name!r}: {e}") from None
