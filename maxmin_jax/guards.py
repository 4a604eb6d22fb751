"""Numerical-fault guards for training loops: flags computed inside the jitted step, checked on the host.

A loss, gradient norm or KL that is NaN, infinite or absurdly large means the run has diverged; continuing only
writes a broken model and overwrites good checkpoints. The check costs nothing extra: the flags are reduced on
device inside the step and travel to the host with the metrics it already fetches.

```
# inside the jitted step
metrics |= fault_flags(metrics, {"policy_loss": LOSS_LIMIT, "grad_norm": GRAD_NORM_LIMIT, "kl": KL_LIMIT})
# on the host, after fetching the metrics and before saving a checkpoint of this step
raise_on_fault(metrics, where="train-policy", step=it + 1, last_good_step=checkpoints.latest_step())
```
"""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np

from maxmin_jax.errors import NumericalFault, option

FLAG_PREFIX = "fault/"
"""`fault_flags` names the flag of quantity `q` `"fault/q"`."""

# Limits on |value| beyond which a finite quantity counts as exploded. Healthy values are orders of magnitude
# smaller: Bradley-Terry and PPO losses are O(1) on standardised rewards, clipped gradient norms are reported
# before clipping and stay below ~1e3 in fine-tuning, a per-sequence KL of 1e4 nats is a policy that has left the
# reference entirely. Pass None for a quantity to check only that it is finite.
LOSS_LIMIT = 1e4
GRAD_NORM_LIMIT = 1e6
KL_LIMIT = 1e4


def fault_flags(metrics: Mapping[str, jnp.ndarray], limits: Mapping[str, float | None]) -> dict[str, jnp.ndarray]:
    """`{"fault/<name>": bool}` for each `name` in `limits`: True when any element of `metrics[name]` is not
    finite or has |value| > limit. Jittable; scalars or arrays (e.g. one value per group or per minibatch)."""
    missing = sorted(set(limits) - set(metrics))
    if missing:
        raise KeyError(f"fault_flags: no metric {missing}; the metrics are {sorted(metrics)}")
    flags = {}
    for name, limit in limits.items():
        x = jnp.asarray(metrics[name])
        bad = ~jnp.all(jnp.isfinite(x))
        if limit is not None:
            bad = bad | jnp.any(jnp.abs(x) > limit)
        flags[FLAG_PREFIX + name] = bad
    return flags


def first_fault(metrics: Mapping[str, object]) -> tuple[str, object] | None:
    """(quantity, its value) of the first raised flag, or None. A flag averaged over minibatches (a fraction) counts
    as raised when it is above 0."""
    for key, flag in metrics.items():
        if key.startswith(FLAG_PREFIX) and np.any(np.asarray(flag) > 0):
            quantity = key[len(FLAG_PREFIX):]
            return quantity, metrics.get(quantity)
    return None


def _show(value: object) -> str:
    """The value, or for an array its worst element with its index."""
    x = np.asarray(value, dtype=np.float64) if value is not None else None
    if x is None:
        return "(value not in the metrics)"
    if x.ndim == 0:
        return f"{float(x):.4g}"
    bad = np.flatnonzero(~np.isfinite(x))
    i = int(bad[0]) if bad.size else int(np.argmax(np.abs(x)))
    return f"{x.flat[i]:.4g} at index {tuple(int(j) for j in np.unravel_index(i, x.shape))}"


def raise_on_fault(metrics: Mapping[str, object], *, where: str, step: int | None = None,
                   last_good_step: int | None = None, limits: Mapping[str, float | None] | None = None,
                   hint: str | None = None, checkpoints: str | None = None) -> None:
    """Raises `NumericalFault` if any `fault/...` flag in `metrics` (host values) is set: which quantity, its
    value, the limit (if `limits` is given), the step and the last good checkpoint step (or that there is none;
    `checkpoints`: their directory, named in the message).

    Call it before saving the step's checkpoint, so the newest checkpoint stays the last good state.
    """
    fault = first_fault(metrics)
    if fault is None:
        return
    quantity, value = fault
    finite = value is not None and bool(np.all(np.isfinite(np.asarray(value, dtype=np.float64))))
    limit = (limits or {}).get(quantity)
    why = "not finite" if not finite else (f"|value| above the limit {limit:.3g}" if limit is not None
                                            else "flagged as exploded")
    at = f" at step {step}" if step is not None else ""
    at_dir = f" ({checkpoints}/{last_good_step})" if checkpoints else ""
    kept = (f"the last good checkpoint is step {last_good_step}{at_dir}; it is kept" if last_good_step is not None
            else "no checkpoint was written before it")
    advice = hint or "lower the learning rate, or check the data and the reward scale"
    raise NumericalFault(f"{where}: {quantity} = {_show(value)}{at} ({why}); the run is stopped, {kept}. "
                         f"Usual fixes: {advice}.", quantity=quantity, value=value, step=step,
                         last_good_step=last_good_step)


def without_flags(metrics: Mapping[str, object]) -> dict[str, object]:
    """The metrics without their `fault/...` flags (what a metrics stream records)."""
    return {k: v for k, v in metrics.items() if not k.startswith(FLAG_PREFIX)}


_ABSENT_WITHOUT_STEPS = ("m_step_loss", "m_step_accuracy")  # NaN, not None, in older histories of step-less rounds


def check_fit_history(history: list[Mapping[str, object]], *, where: str, m_steps: int,
                      learning_rate: str = "learning_rate") -> None:
    """Raises `NumericalFault` for a fit that did not train: a non-finite number in its per-round `history` (EM's:
    rounds with `m_step_accepted`, `m_step_loss`, ...), or, when it took optimiser steps (`m_steps` per round),
    every M-step rejected by its guard (each made the objective worse: the model is as it started).
    `learning_rate` is the option the hint names. Call it before the fitted model is saved."""
    fix = f"lower the learning rate ({option(learning_rate)}), or check the data"
    for row in history:
        for key, value in row.items():
            x = np.asarray(value) if isinstance(value, (int, float, list, tuple, np.ndarray, np.generic)) else None
            if x is None or x.dtype.kind not in "fiu" or bool(np.all(np.isfinite(x))):
                continue
            if key in _ABSENT_WITHOUT_STEPS and not row.get("m_step_steps", m_steps):
                continue
            step = row.get("round")
            raise NumericalFault(f"{where}: {key} = {_show(value)} in round {step} (not finite); the run is stopped "
                                 f"and nothing is written. Usual fixes: {fix}.", quantity=str(key), value=value,
                                 step=step)
    accepted = [row.get("m_step_accepted") for row in history]
    if m_steps and history and not any(accepted):
        losses = [row.get("m_step_loss") for row in history]
        shown = ", ".join(f"{x:.3g}" for x in losses if isinstance(x, (int, float)))
        raise NumericalFault(
            f"{where}: every M-step was rejected ({len(history)} of {len(history)} rounds; each made the EM objective "
            f"worse{f', mean M-step losses {shown}' if shown else ''}): the model did not train, and it is not "
            f"written. Usual fixes: {fix}.", quantity="m_step_accepted", value=0, step=len(history))


__all__ = ["FLAG_PREFIX", "GRAD_NORM_LIMIT", "KL_LIMIT", "LOSS_LIMIT", "NumericalFault", "check_fit_history",
           "fault_flags", "first_fault", "raise_on_fault", "without_flags"]
