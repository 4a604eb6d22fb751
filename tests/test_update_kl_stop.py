"""The update's KL early stop (`policy.training.minibatch_updates`): a step that moved the policy past the limit is
undone, the rest of the iteration's steps are skipped, and the last step is measured too. (In the PPO trainer:
the demo, tests/test_experiment.py.)"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from maxmin_jax.policy.training import minibatch_updates


def drift(trainable, rows, nan_from=None):
    """A parameter that plain gradient descent (step 1) moves by exactly 1 a step, and a 'KL' that is the square of
    how far it went."""
    w = trainable["w"]
    kl = jnp.square(w) if nan_from is None else jnp.where(w >= nan_from, jnp.nan, jnp.square(w))
    return -w, {"approx_kl": kl, "w": w}


def updates(early_stop_kl, *, epochs=2, minibatches=2, nan_from=None):
    tx = optax.scale_by_schedule(lambda count: -1.0)  # SGD at step size 1 that counts its steps
    trainable = {"w": jnp.zeros(())}
    loss_fn = functools.partial(drift, nan_from=nan_from)
    run = jax.jit(lambda t, s: minibatch_updates(loss_fn, tx, t, s, jax.random.key(0), rows=4, epochs=epochs,
                                                 minibatches=minibatches, early_stop_kl=early_stop_kl))
    trainable, opt_state, metrics = run(trainable, tx.init(trainable))
    return float(trainable["w"]), int(opt_state.count), jax.device_get(metrics)


def test_without_a_limit_every_step_is_taken():
    w, count, metrics = updates(None)
    assert (w, count) == (4.0, 4)
    np.testing.assert_allclose(metrics["approx_kl"], (0 + 1 + 4 + 9) / 4)  # measured before each step


def test_the_step_past_the_limit_is_undone_and_the_rest_skipped():
    # KL before the steps: 0, 1, 4 (> 2.5: the step from w=1 to w=2 is undone), then nothing more runs.
    w, count, metrics = updates(2.5)
    assert (w, count) == (1.0, 1)  # the optimiser state goes back with the variables
    assert metrics["update_steps"] == 1 and metrics["approx_kl_max"] == 4.0
    np.testing.assert_allclose(metrics["approx_kl"], (0 + 1 + 4) / 3)  # means over the steps that ran
    np.testing.assert_allclose(metrics["w"], (0 + 1 + 2) / 3)


def test_the_last_steps_jump_is_measured_and_undone():
    # All four steps pass their checks (0, 1, 4, 9 <= 10), the last one's effect does not (w = 4: 16 > 10).
    w, count, metrics = updates(10.0)
    assert (w, count) == (3.0, 3)
    assert metrics["update_steps"] == 3 and metrics["approx_kl_max"] == 16.0
    w, _, metrics = updates(20.0)  # 16 <= 20: everything is kept
    assert w == 4.0 and metrics["update_steps"] == 4 and metrics["approx_kl_max"] == 16.0


def test_a_non_finite_kl_counts_as_past_the_limit():
    w, count, metrics = updates(100.0, nan_from=2.0)  # the policy at w = 2 measures NaN: the step there is undone
    assert (w, count) == (1.0, 1) and metrics["update_steps"] == 1
