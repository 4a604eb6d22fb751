"""A mixture of K linear Bradley-Terry models over users, on fixed pair features: EM's initialisation.

Pair n of user h has features x_n (chosen minus rejected, `features.pair_features`); group k's reward difference
is `x_n . theta_k`. The same EM as the neural mixture, but each M-step is a few Newton steps of an L2-regularised
logistic regression per group (weighted by the responsibilities), so a whole fit takes milliseconds and many
restarts run at once (vectorised over a leading restart axis, one compiled program).

The E-step scores each user with heads fitted *without that user* (leave-one-user-out, one Newton step from the
fitted heads: `theta_k^(-h) = theta_k - (H_k - H_hk)^-1 g_hk`, g_hk and H_hk the gradient and curvature of user
h's weighted log-likelihood). Pairs are regrouped per user ([U, P, d], `by_user`), so these per-user terms are
contractions over each user's pairs. With
the user's own pairs in the fit, a head partly memorises its members, so every partition looks self-consistent
and EM stays wherever it starts; scored out of sample, a user moves to the group that predicts them best, and the
final leave-one-user-out log-likelihood is an honest score for choosing between restarts and between K.

Labels flipped at random (a rater's slip) are modelled: a pair's likelihood is `eps + (1 - 2 eps) sigmoid(m)`, so
one confidently contradicted pair costs a user at most log(1 / eps) nats instead of growing with the margin. By
plain Bradley-Terry, a few flipped pairs of a user at low noise can outweigh everything else the user's pairs say
(on two zoo worlds the *true* rewards place a user in the wrong group that way). The flip rate eps is learned per
restart by EM (each pair's posterior probability of being flipped, weighted by the responsibilities), and the
M-step fits each head to the labels weighted by that posterior (logistic regression with soft labels, still
convex). With few pairs per head the estimate is low (the L2 penalty's smaller margins read some flips as
Bradley-Terry noise); where labels are clean it falls towards its lower bound, nearly plain Bradley-Terry.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from maxmin_jax.rewards.bt import flipped_label_log_likelihood

_STEPS = (1.0, 0.5, 0.25, 0.125, 0.0)  # Newton step sizes tried in parallel (0: keep the old heads)
FLIP_RATE_START = 0.05  # where a learned flip rate starts
FLIP_RATE_BOUNDS = (1e-3, 0.25)  # a learned flip rate stays inside: 0 is a fixed point of its EM update
FEATURE_BUCKET = 16  # features padded with zero columns to a multiple of this
PAIR_BUCKET = 8  # pairs per user padded (masked) to a multiple of this


class LinearMixtureFit(NamedTuple):
    """Responsibilities [R, U, K], heads [R, K, d], leave-one-user-out scores L [R, U, K], the mixture's
    leave-one-user-out log-likelihood [R] (sum over users) and the label flip rate [R] for each of R restarts."""

    gamma: Array
    theta: Array
    loo: Array
    score: Array
    flip_rate: Array


def by_user(x: np.ndarray, user_index: np.ndarray, num_users: int) -> tuple[np.ndarray, np.ndarray]:
    """Pairs regrouped per user: features [U, P, d] and a 0/1 mask [U, P], P the most pairs any user has."""
    counts = np.bincount(user_index, minlength=num_users)
    order = np.argsort(user_index, kind="stable")
    slot = np.arange(len(user_index)) - np.repeat(np.cumsum(counts) - counts, counts)
    out = np.zeros((num_users, max(int(counts.max()), 1), x.shape[1]), np.float32)
    mask = np.zeros(out.shape[:2], np.float32)
    out[user_index[order], slot] = x[order]
    mask[user_index[order], slot] = 1.0
    return out, mask


def _spd_solve(a, b):
    """a^-1 b for symmetric positive definite a [..., d, d] (curvature + L2) and b [..., d]: Cholesky, about
    twice as fast as a general solve over the many small systems of the leave-one-user-out step."""
    return jax.scipy.linalg.cho_solve((jnp.linalg.cholesky(a), True), b[..., None])[..., 0]


def _kept(m, eps):
    """The posterior probability that each label is not flipped, given margin m (1 when eps = 0)."""
    return 1 - jnp.exp(jnp.log(eps) + jax.nn.log_sigmoid(-m) - flipped_label_log_likelihood(m, eps))


def _objective(x, w, theta, l2, kept):
    """Weighted negative log-likelihood of the soft labels `kept` + L2 of each head: [R, K]. x [U, P, d],
    w and kept [R, U, P, K]."""
    m = jnp.einsum("upd,rkd->rupk", x, theta)
    nll = -(kept * jax.nn.log_sigmoid(m) + (1 - kept) * jax.nn.log_sigmoid(-m))
    return jnp.einsum("rupk,rupk->rk", w, nll) + 0.5 * l2 * jnp.sum(theta**2, -1)


def _newton(x, w, theta, l2, steps, eps):
    """`steps` (traced) damped Newton steps on every head at once (the best of a few step sizes, so it never goes up),
    each on the soft labels of the flip model at the current heads (eps [R, 1, 1, 1]). Returns the heads and the
    per-user Hessian contributions [R, U, K, d, d] and the margins [R, U, P, K] at them (for the flip rate's update
    and the leave-one-user-out step). The Newton steps contract users and pairs in one go: materialising the
    per-user contributions at every step took two thirds of a fit's time."""
    eye = jnp.eye(x.shape[-1], dtype=x.dtype)

    def margins_and_curvature(theta):
        m = jnp.einsum("upd,rkd->rupk", x, theta)
        s = jax.nn.sigmoid(m)
        return m, s, w * s * (1 - s)

    def step(_, theta):
        m, s, c = margins_and_curvature(theta)
        kept = _kept(m, eps)
        h = jnp.einsum("upd,rupk,upe->rkde", x, c, x) + l2 * eye
        grad = -jnp.einsum("rupk,upd->rkd", w * (kept - s), x) + l2 * theta
        delta = _spd_solve(h, grad)
        candidates = theta[None] - jnp.asarray(_STEPS)[:, None, None, None] * delta[None]  # [S, R, K, d]
        values = jax.vmap(lambda t: _objective(x, w, t, l2, kept))(candidates)  # [S, R, K]
        best = jnp.argmin(values, axis=0)
        return jnp.take_along_axis(candidates, best[None, ..., None], axis=0)[0]

    theta = jax.lax.fori_loop(0, steps, step, theta)
    m, _, c = margins_and_curvature(theta)
    return theta, jnp.einsum("upd,rupk,upe->rukde", x, c, x), m


# A fit is twenty-odd rounds of Newton steps and leave-one-user-out solves, so its run time, not its compile
# time, counts: it is compiled at XLA's full backend optimisation (XLA's default) even where XLA_FLAGS lower it for
# quicker compiles. At level 0, as the test suite compiles, the start on a 32-user zoo world ran 2.7 times as long
# (22 s against 8 s, compiled).
_FULL_OPTIMISATION = {"xla_backend_optimization_level": 3}


@functools.partial(jax.jit, compiler_options=_FULL_OPTIMISATION)
def _fit(x, mask, gamma0, active, in_fit, l2, flip_rate, soft_iters, hard_iters, newton_steps, learn_flip_rate
         ) -> LinearMixtureFit:
    """The EM of `fit_linear_mixture`. The round counts and whether the flip rate is learned are traced, and the
    rounds are one loop whose round number says what it does, so fits of one shape with different rounds (the EM
    rounds' refits) share one compiled program, with one copy of the M-step in it."""
    r, _, k = gamma0.shape
    pair_mask = mask[None, :, :, None]  # [1, U, P, 1]
    users = in_fit[:, :, None]  # [R, U, 1]: 0 for users left out of a restart's fit

    def m_step(gamma, theta, steps, eps):
        w = (gamma * users)[:, :, None, :] * pair_mask  # [R, U, P, K]: each pair weighted by its user's
        # responsibilities
        theta, own, m = _newton(x, w, theta, l2, steps, eps[:, None, None, None])
        # EM for eps: the responsibility-weighted mean posterior probability of a flip
        flipped = 1 - _kept(m, eps[:, None, None, None])
        total = jnp.maximum(jnp.einsum("rupk->r", w), 1e-6)
        learned = jnp.clip(jnp.einsum("rupk,rupk->r", w, flipped) / total, *FLIP_RATE_BOUNDS)
        eps = jnp.where(learn_flip_rate, learned, eps)
        return theta, _loo(x, w, m, own, l2, pair_mask, eps[:, None, None, None]), eps

    def log_weights(gamma):  # [R, U, K]: user h's prior, the group sizes without h; switched-off groups get none
        fitted = gamma * users
        others = (jnp.sum(fitted, axis=1, keepdims=True) - fitted) / jnp.maximum(
            jnp.sum(users, axis=1, keepdims=True) - users, 1.0)
        return jnp.where(active > 0, jnp.log(jnp.maximum(others, 1e-6)), -1e30)

    def score(gamma, loo):  # [R]: the leave-one-user-out mixture log-likelihood of the users in the fit
        return jnp.sum(jax.nn.logsumexp(log_weights(gamma) + loo, axis=-1) * users[..., 0], axis=-1)

    def keep_better(best, new, allowed):  # per restart, the fit with the higher score (if `allowed`)
        better = allowed & (new.score > best.score)
        return jax.tree.map(lambda b, n: jnp.where(better.reshape((-1,) + (1,) * (n.ndim - 1)), n, b), best, new)

    # Round 0 is the first M-step (from zero heads, twice the Newton steps); rounds 1..soft_iters are soft (each
    # user's posterior responsibilities), the rest hard (argmax). The leave-one-user-out E-step is not a true EM
    # step (a user's move changes the heads the others are scored by), so the hard rounds can lower the score: the
    # best partition along the way is kept, and the last round is an M-step and its score only.
    def round_(i, carry):
        gamma, theta, eps, best = carry
        theta, loo, eps = m_step(gamma, theta, jnp.where(i == 0, 2 * newton_steps, newton_steps), eps)
        logits = log_weights(gamma) + loo
        hard = i > soft_iters
        best = keep_better(best, LinearMixtureFit(gamma, theta, loo, score(gamma, loo), eps), hard)
        gamma = jnp.where(i == 0, gamma, jnp.where(hard, jax.nn.one_hot(jnp.argmax(logits, -1), k, dtype=x.dtype),
                                                   jax.nn.softmax(logits, axis=-1)))
        return gamma, theta, eps, best

    theta = jnp.zeros((r, k, x.shape[-1]), x.dtype)
    worst = LinearMixtureFit(gamma0, theta, jnp.zeros(gamma0.shape, x.dtype), jnp.full((r,), -jnp.inf, x.dtype),
                             flip_rate)
    *_, best = jax.lax.fori_loop(0, 2 + soft_iters + hard_iters, round_, (gamma0, theta, flip_rate, worst))
    return best


def _loo(x, w, m, own, l2, pair_mask, eps):
    """L [R, U, K]: each user's log-likelihood (real pairs only) under each head refitted without them, by one
    Newton step of the objective without the user from the fitted heads: theta - (H_k - H_hk)^-1 g_hk, g_hk the
    gradient of user h's weighted log-likelihood (at the fitted heads' margins m [R, U, P, K]).
    Taking the user's own curvature out matters for small groups, where one user is a large part of the fit."""
    g = jnp.einsum("rupk,upd->rukd", w * (_kept(m, eps) - jax.nn.sigmoid(m)), x)
    h = jnp.sum(own, axis=1, keepdims=True) + l2 * jnp.eye(x.shape[-1], dtype=x.dtype)
    shift = _spd_solve(h - own, g)  # [R, U, K, d]
    m = m - jnp.einsum("upd,rukd->rupk", x, shift)
    return jnp.sum(flipped_label_log_likelihood(m, eps) * pair_mask, axis=2)


def fit_linear_mixture(x: Float[Array, "n d"], user_index: Int[Array, "n"], gamma0: Float[Array, "r u k"], *,
                       num_users: int, l2: float = 1.0, soft_iters: int = 12, hard_iters: int = 8,
                       newton_steps: int = 2, active: np.ndarray | None = None,
                       flip_rate: float | np.ndarray | None = None, in_fit: np.ndarray | None = None
                       ) -> LinearMixtureFit:
    """EM from R initial responsibilities at once: `soft_iters` soft rounds (posterior responsibilities) then
    `hard_iters` hard ones (argmax), each an M-step of `newton_steps` Newton steps from the previous heads and a
    leave-one-user-out E-step. `active` [K] (default all): groups with 0 stay empty, so fits of every K up to
    the array's K share one compiled program (one per shape: users, R, K, and the most pairs per user and the
    features rounded up to `PAIR_BUCKET` and `FEATURE_BUCKET`, so feature sets of one run share it too; the round
    counts are traced, so they do not add programs).
    `flip_rate`: the rate of randomly flipped labels, learned from `FLIP_RATE_START` when None; a number (or one
    per restart, [R]) fixes it (0: plain Bradley-Terry). `in_fit` [R, U] (default all 1): 0 leaves a user out of a
    restart's fit (its heads, group sizes and score), as cross-validation over users needs; their responsibilities
    and leave-one-user-out scores are still computed."""
    if flip_rate is not None and not np.all((0.0 <= np.asarray(flip_rate)) & (np.asarray(flip_rate) < 0.5)):
        raise ValueError(f"fit_linear_mixture: flip_rate must be in [0, 0.5) or None (learned), got {flip_rate!r}")
    x = np.asarray(x, np.float32)
    d = x.shape[1]
    x = np.pad(x, ((0, 0), (0, -x.shape[1] % FEATURE_BUCKET)))  # zero columns keep zero heads: same fit
    gamma0 = np.asarray(gamma0, np.float32)
    r, _, k = gamma0.shape
    xu, mask = by_user(x, np.asarray(user_index), num_users)
    xu, mask = (np.pad(a, ((0, 0), (0, -a.shape[1] % PAIR_BUCKET)) + ((0, 0),) * (a.ndim - 2)) for a in (xu, mask))
    active = np.ones(k, np.float32) if active is None else np.asarray(active, np.float32)
    eps = np.broadcast_to(np.asarray(FLIP_RATE_START if flip_rate is None else flip_rate, np.float32), (r,))
    in_fit = np.ones(gamma0.shape[:2], np.float32) if in_fit is None else np.asarray(in_fit, np.float32)
    fit = _fit(jnp.asarray(xu), jnp.asarray(mask), jnp.asarray(gamma0), jnp.asarray(active), jnp.asarray(in_fit),
               jnp.float32(l2), jnp.asarray(eps), jnp.int32(soft_iters), jnp.int32(hard_iters),
               jnp.int32(newton_steps), jnp.bool_(flip_rate is None))
    fit = jax.device_get(fit)  # sliced on the host: an eager slice would compile once per feature width
    return fit._replace(theta=fit.theta[..., :d])


# Initial partitions ---------------------------------------------------------------------------------------------
def _sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def user_score_embedding(x: np.ndarray, user_index: np.ndarray, num_users: int, *, l2: float = 1.0,
                         rank: int = 8) -> np.ndarray:
    """[U, rank]: how each user departs from the pooled preference.

    Fit one logistic head to all pairs; each user's gradient of their own log-likelihood there points to what
    they want that the pooled reward does not give; whitened by the pooled Fisher information (so each direction
    counts by how well the data determine it) and reduced to its top principal directions across users."""
    x = np.asarray(x, np.float64)
    theta = np.zeros(x.shape[1])
    for _ in range(25):  # Newton with step halving: pooled logistic regression
        s = _sigmoid(x @ theta)
        grad = -x.T @ (1 - s) + l2 * theta
        hess = (x * (s * (1 - s))[:, None]).T @ x + l2 * np.eye(x.shape[1])
        delta = np.linalg.solve(hess, grad)
        objective = lambda t: np.sum(np.logaddexp(0, -(x @ t))) + 0.5 * l2 * t @ t  # noqa: E731
        step, old = 1.0, objective(theta)
        while step > 1e-3 and objective(theta - step * delta) > old:
            step /= 2
        theta = theta - step * delta
        if np.max(np.abs(step * delta)) < 1e-6:
            break
    s = _sigmoid(x @ theta)
    hess = (x * (s * (1 - s))[:, None]).T @ x + l2 * np.eye(x.shape[1])
    g = np.zeros((num_users, x.shape[1]))
    np.add.at(g, user_index, (1 - s)[:, None] * x)
    eigvals, eigvecs = np.linalg.eigh(hess)
    e = g @ (eigvecs / np.sqrt(np.maximum(eigvals, 1e-12)))
    e -= e.mean(axis=0)
    _, _, vt = np.linalg.svd(e, full_matrices=False)
    return e @ vt[:rank].T


def kmeans_plus_plus(points: np.ndarray, k: int, rng: np.random.Generator, iters: int = 25) -> np.ndarray:
    """Lloyd's k-means from a k-means++ start; returns labels [U] with every cluster non-empty when U >= k."""
    n = len(points)
    centres = [points[rng.integers(n)]]
    for _ in range(1, k):
        d2 = np.min([np.sum((points - c) ** 2, axis=1) for c in centres], axis=0)
        centres.append(points[rng.choice(n, p=d2 / d2.sum())] if d2.sum() > 0 else points[rng.integers(n)])
    centres = np.stack(centres)
    labels = np.zeros(n, np.int64)
    for _ in range(iters):
        labels = np.argmin(((points[:, None] - centres[None]) ** 2).sum(-1), axis=1)
        for j in range(k):
            if not np.any(labels == j):  # re-seed an empty cluster at the point farthest from its centre
                far = int(np.argmax(((points - centres[labels]) ** 2).sum(-1)))
                labels[far] = j
            centres[j] = points[labels == j].mean(axis=0)
    return labels


__all__ = ["LinearMixtureFit", "fit_linear_mixture", "kmeans_plus_plus", "user_score_embedding"]
