"""PPO for causal LMs, token level: pure jittable functions (the model forward passes live in the trainer).

Conventions: per-token arrays are [B, T] over the RESPONSE tokens only; `mask` [B, T] is 1 for real response
tokens up to and including EOS and 0 after. Masked positions never contribute: their outputs are 0 and every
mean is a masked mean over all real tokens of the batch (token-level averaging, as in TRL's PPO).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp

from maxmin_jax import validate

if TYPE_CHECKING:  # shape annotations only; jaxtyping is not a runtime dependency
    from jaxtyping import Array, Float, Int

__all__ = [
    "AdaptiveKLController",
    "FixedKLController",
    "KLControllerState",
    "PPOConfig",
    "approx_kl",
    "clipped_surrogate",
    "gae",
    "kl_controller",
    "kl_penalty",
    "masked_entropy",
    "masked_mean",
    "policy_loss",
    "terminal_rewards",
    "token_logprobs",
    "token_rewards",
    "value_loss",
    "whiten",
]

KL_KINDS = ("kl", "mse", "k3")


def masked_mean(x: Float[Array, "..."], mask: Float[Array, "..."], axis=None) -> Float[Array, "..."]:
    """Mean of x over positions where mask is 1; 0 where nothing is unmasked (instead of NaN)."""
    mask = mask.astype(x.dtype)
    return jnp.sum(x * mask, axis=axis) / jnp.maximum(jnp.sum(mask, axis=axis), 1.0)


def token_logprobs(logits: Float[Array, "b t v"], tokens: Int[Array, "b t"]) -> Float[Array, "b t"]:
    """log pi(token_t | ...) from logits aligned with the tokens (logits[:, t] predicts tokens[:, t]), in float32.

    Computed as logit(token) - logsumexp(logits), with a hand-written gradient `(onehot - softmax) * g` that reads
    the logits once and keeps only the [B, T] logsumexp besides them: a log-softmax would write a float32 [B, T, V]
    array and read it back in its backward, and autodiff of logsumexp keeps another [B, T, V] of exponentials."""
    return _token_logprobs(logits.astype(jnp.float32), tokens)


@jax.custom_vjp
def _token_logprobs(logits, tokens):
    return _token_logprobs_fwd(logits, tokens)[0]


def _token_logprobs_fwd(logits, tokens):
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, tokens[..., None], axis=-1)[..., 0]
    return picked - lse, (logits, tokens, lse)


def _token_logprobs_bwd(residuals, g):
    logits, tokens, lse = residuals
    onehot = jnp.arange(logits.shape[-1]) == tokens[..., None]
    return g[..., None] * (onehot - jnp.exp(logits - lse[..., None])), None


_token_logprobs.defvjp(_token_logprobs_fwd, _token_logprobs_bwd)


def masked_entropy(logits: Float[Array, "b t v"], mask: Float[Array, "b t"]) -> Float[Array, ""]:
    """Mean per-token entropy of the policy over real tokens (for the entropy bonus and logging):
    logsumexp(z) - sum softmax(z) z, fused reductions in float32 (no log-softmax array)."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    entropy = lse[..., 0] - jnp.sum(jnp.exp(logits - lse) * logits, axis=-1)
    return masked_mean(entropy, mask)


def kl_penalty(
    logprobs: Float[Array, "b t"],
    ref_logprobs: Float[Array, "b t"],
    mask: Float[Array, "b t"],
    kind: str = "kl",
) -> Float[Array, "b t"]:
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi, zero on masked positions.

    kind="kl":  logp - ref_logp (k1): unbiased, its sum over a response is the sequence log-ratio; can be < 0.
    kind="mse": 0.5 * (logp - ref_logp)^2 (k2): biased but non-negative and low variance.
    kind="k3":  (r - 1) - log r with r = pi_ref / pi (GRPO's estimator): unbiased and non-negative.
    """
    log_ratio = logprobs - ref_logprobs
    if kind == "kl":
        per_token = log_ratio
    elif kind == "mse":
        per_token = 0.5 * jnp.square(log_ratio)
    elif kind == "k3":
        per_token = jnp.expm1(-log_ratio) + log_ratio
    else:
        raise ValueError(f"unknown kl kind {kind!r}; choose one of {KL_KINDS}")
    return per_token * mask.astype(per_token.dtype)


def _last_token_one_hot(mask: Float[Array, "b t"]) -> Float[Array, "b t"]:
    """One-hot at the last real token of each row (all zeros for an empty response)."""
    t = mask.shape[1]
    real = mask > 0
    last = t - 1 - jnp.argmax(real[:, ::-1], axis=1)
    return jax.nn.one_hot(last, t, dtype=jnp.float32) * jnp.any(real, axis=1, keepdims=True)


def terminal_rewards(score: Float[Array, "b"], mask: Float[Array, "b t"]) -> Float[Array, "b t"]:
    """Per-token rewards with each response's score on its last real token and 0 elsewhere."""
    return score[:, None] * _last_token_one_hot(mask)


def token_rewards(
    score: Float[Array, "b"],
    logprobs: Float[Array, "b t"],
    ref_logprobs: Float[Array, "b t"],
    mask: Float[Array, "b t"],
    beta: float | Float[Array, ""],
    kind: str = "kl",
) -> Float[Array, "b t"]:
    """Per-token rewards: -beta * KL estimate on every real token, plus the sequence score on the last one."""
    kl = kl_penalty(logprobs, ref_logprobs, mask, kind)
    return -beta * kl + terminal_rewards(score, mask)


def gae(
    rewards: Float[Array, "b t"],
    values: Float[Array, "b t"],
    mask: Float[Array, "b t"],
    gamma: float,
    lam: float,
) -> tuple[Float[Array, "b t"], Float[Array, "b t"]]:
    """Generalised advantage estimation (Schulman et al. 2016), a backward `lax.scan` over time.

    delta_t = r_t + gamma * V_{t+1} - V_t and A_t = delta_t + gamma * lam * A_{t+1}, where V_{t+1} and A_{t+1}
    count as 0 once t+1 is past the last real token (the episode ends at EOS: no bootstrap). Returns
    (advantages, returns = advantages + values), both 0 on masked positions.
    """
    mask = mask.astype(jnp.float32)
    rewards = rewards * mask
    values = values * mask
    pad = jnp.zeros_like(mask[:, :1])
    next_mask = jnp.concatenate([mask[:, 1:], pad], axis=1)
    next_values = jnp.concatenate([values[:, 1:], pad], axis=1) * next_mask
    deltas = rewards + gamma * next_values - values

    def step(next_adv, xs):
        delta, cont = xs
        adv = delta + gamma * lam * cont * next_adv
        return adv, adv

    _, adv_t = jax.lax.scan(step, jnp.zeros_like(mask[:, 0]), (deltas.T, next_mask.T), reverse=True)
    advantages = adv_t.T * mask
    return advantages, (advantages + values) * mask


def whiten(
    x: Float[Array, "b t"], mask: Float[Array, "b t"], shift_mean: bool = True, eps: float = 1e-8
) -> Float[Array, "b t"]:
    """Normalise x to unit (population) variance over real tokens; zero mean too unless shift_mean=False
    (then the original mean is kept, as TRL does for rewards). Masked positions are 0."""
    mean = masked_mean(x, mask)
    var = masked_mean(jnp.square(x - mean), mask)
    out = (x - mean) * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.astype(out.dtype)


def clipped_surrogate(
    logprobs: Float[Array, "b t"],
    old_logprobs: Float[Array, "b t"],
    advantages: Float[Array, "b t"],
    clip_eps: float,
) -> tuple[Float[Array, "b t"], Float[Array, "b t"]]:
    """Per-token clipped surrogate loss max(-A * ratio, -A * clip(ratio, 1 +- eps)), unreduced, and a 0/1 array
    marking where the clipped term is the active one (for the clip fraction)."""
    ratio = jnp.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    return jnp.maximum(unclipped, clipped), (clipped > unclipped).astype(jnp.float32)


def approx_kl(log_ratio: Float[Array, "b t"], mask: Float[Array, "b t"]) -> Float[Array, ""]:
    """k3 estimate of KL(old || new) over real tokens from log(new / old): mean of (ratio - 1) - log ratio
    (non-negative, low variance; Schulman 2020). Under top-k or top-p sampling a token can leave the new policy's
    support (log-prob ~ the dtype's minimum, ratio 0, no gradient); its log-ratio counts as -20 so one such token
    does not make the metric infinite."""
    bounded = jnp.maximum(log_ratio, -20.0)
    return masked_mean(jnp.expm1(bounded) - bounded, mask)


def policy_loss(
    logprobs: Float[Array, "b t"],
    old_logprobs: Float[Array, "b t"],
    advantages: Float[Array, "b t"],
    mask: Float[Array, "b t"],
    clip_eps: float,
) -> tuple[Float[Array, ""], dict[str, Float[Array, ""]]]:
    """Clipped surrogate loss: mean over real tokens of max(-A * ratio, -A * clip(ratio, 1 +- eps)).

    metrics: clipfrac = fraction of tokens where the clipped term is the active one; approx_kl = k3 estimate
    of KL(old || new) (`approx_kl`).
    """
    per_token, clipped = clipped_surrogate(logprobs, old_logprobs, advantages, clip_eps)
    metrics = {"clipfrac": masked_mean(clipped, mask), "approx_kl": approx_kl(logprobs - old_logprobs, mask)}
    return masked_mean(per_token, mask), metrics


def value_loss(
    values: Float[Array, "b t"],
    old_values: Float[Array, "b t"],
    returns: Float[Array, "b t"],
    mask: Float[Array, "b t"],
    clip_value: float,
) -> tuple[Float[Array, ""], dict[str, Float[Array, ""]]]:
    """Clipped value loss: 0.5 * mean over real tokens of max((V - R)^2, (V_clipped - R)^2), where V_clipped
    stays within clip_value of the rollout's values (keeps the value head from jumping on one batch).

    metrics: vf_clipfrac = fraction of tokens where the clipped error is the larger one.
    """
    clipped_values = old_values + jnp.clip(values - old_values, -clip_value, clip_value)
    err = jnp.square(values - returns)
    err_clipped = jnp.square(clipped_values - returns)
    loss = 0.5 * masked_mean(jnp.maximum(err, err_clipped), mask)
    return loss, {"vf_clipfrac": masked_mean((err_clipped > err).astype(jnp.float32), mask)}


class KLControllerState(NamedTuple):
    beta: Float[Array, ""]


class AdaptiveKLController(NamedTuple):
    """Ziegler et al. 2019: beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n_steps / horizon).

    KL above target raises beta (pull back toward the reference), below lowers it. `kl` is the mean
    per-sequence KL of the last rollout; `n_steps` the number of sequences it had.
    """

    init_kl_coef: float
    target: float
    horizon: float

    def init(self) -> KLControllerState:
        return KLControllerState(beta=jnp.asarray(self.init_kl_coef, jnp.float32))

    def update(self, kl: Float[Array, ""], n_steps: int, state: KLControllerState) -> KLControllerState:
        error = jnp.clip(kl / self.target - 1.0, -0.2, 0.2)
        return KLControllerState(beta=state.beta * (1.0 + error * n_steps / self.horizon))


class FixedKLController(NamedTuple):
    """Constant beta, same interface as AdaptiveKLController."""

    kl_coef: float

    def init(self) -> KLControllerState:
        return KLControllerState(beta=jnp.asarray(self.kl_coef, jnp.float32))

    def update(self, kl: Float[Array, ""], n_steps: int, state: KLControllerState) -> KLControllerState:
        del kl, n_steps
        return state


@dataclasses.dataclass(frozen=True, kw_only=True)
class PPOConfig:
    """PPO hyperparameters (defaults follow TRL's PPO for LMs where the paper does not say)."""

    clip_eps: float = 0.2
    """Policy ratio clip range: ratios outside [1 - clip_eps, 1 + clip_eps] give no further gradient."""
    clip_value: float = 0.2
    """Value clip range around the rollout's values."""
    vf_coef: float = 0.1
    """Weight of the value loss in the total loss."""
    entropy_coef: float = 0.0
    """Weight of the entropy bonus (subtracted from the loss); 0 disables it."""
    gamma: float = 1.0
    """Discount over response tokens; 1 = undiscounted, as the terminal score is the whole point."""
    lam: float = 0.95
    """GAE lambda: bias-variance trade-off of the advantages."""
    init_kl_coef: float = 0.05
    """Initial (or fixed) beta of the per-token KL penalty to the reference policy."""
    kl_kind: str = "kl"
    """Per-token KL estimator in the reward: "kl" (logp - ref_logp), "mse" (0.5 * squared log-ratio) or "k3"."""
    adaptive_kl: bool = False
    """Adapt beta toward target_kl (Ziegler et al. 2019) instead of keeping it fixed."""
    target_kl: float = 6.0
    """Target per-sequence KL for the adaptive controller (nats)."""
    horizon: float = 10000.0
    """Adaptive controller horizon in sequences: larger = slower beta changes."""
    epochs: int = 4
    """Optimisation passes over each rollout batch."""
    minibatches: int = 4
    """Minibatches per epoch; the rollout batch size must be divisible by it."""
    learning_rate: float = 1.41e-5
    """Adam learning rate for policy and value head."""
    max_grad_norm: float = 1.0
    """Global gradient-norm clip."""
    whiten_advantages: bool = True
    """Whiten advantages over the rollout batch's real tokens before the update."""
    early_stop_kl: float | None = None
    """The update's KL early stop, per token: when a minibatch step finds the policy further than this from the
    rollout's (`approx_kl`, measured on its minibatch, and after the last step), the step that moved it there is
    undone and the iteration's remaining steps are skipped (`policy.training.minibatch_updates`). None: off."""

    def __post_init__(self):
        validate.positive(self, "clip_eps", "clip_value", "horizon", "target_kl")
        validate.positive(self, "early_stop_kl", optional=True)
        validate.non_negative(self, "vf_coef", "entropy_coef", "init_kl_coef")
        validate.fraction(self, "gamma", "lam")
        validate.positive_int(self, "epochs", "minibatches")
        validate.check_optimizer(self)  # learning_rate > 0, max_grad_norm > 0 (finite)
        validate.one_of(self, "kl_kind", KL_KINDS)


def kl_controller(config: PPOConfig) -> AdaptiveKLController | FixedKLController:
    if config.adaptive_kl:
        return AdaptiveKLController(config.init_kl_coef, config.target_kl, config.horizon)
    return FixedKLController(config.init_kl_coef)
