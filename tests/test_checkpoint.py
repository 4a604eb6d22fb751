"""Orbax full-state checkpoints: exact resume after SIGKILL, sharded/abstract restore, refusal of mismatches."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from conftest import xla_flags
from maxmin_jax.checkpoint import CheckpointManager, CheckpointMismatchError, TrainState, with_param_shardings
from maxmin_jax.models import GPT2Config, LlamaConfig, build_model
from maxmin_jax.sharding import make_mesh, shard_module, state_shardings

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "ckpt_train.py"
TIMEOUT = 90


def _env(cache_dir):
    env = dict(os.environ)
    env.update(JAX_PLATFORMS="cpu",
               XLA_FLAGS=xla_flags(1),
               PYTHONPATH=f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}",
               # The three runs compile the same programs: share a compilation cache to keep the test quick.
               JAX_COMPILATION_CACHE_DIR=str(cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return env


def _launch(tmp_path, name, *, steps, sleep=0.0):
    args = [sys.executable, str(SCRIPT), "--ckpt-dir", str(tmp_path / f"ckpt_{name}"), "--steps", str(steps),
            "--ckpt-every", "2", "--progress", str(tmp_path / f"progress_{name}"), "--out",
            str(tmp_path / f"params_{name}.npz"), "--sleep", str(sleep)]
    log = open(tmp_path / f"log_{name}", "w")
    return subprocess.Popen(args, env=_env(tmp_path / "jax_cache"), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)


def _finish(proc, tmp_path, name):
    try:
        rc = proc.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"run {name} did not finish in {TIMEOUT}s:\n{(tmp_path / f'log_{name}').read_text()[-3000:]}")
    assert rc == 0, f"run {name} failed (rc {rc}):\n{(tmp_path / f'log_{name}').read_text()[-3000:]}"


def _progress(path):
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def _committed_steps(directory):
    return sorted(int(p.name) for p in directory.glob("*") if p.name.isdigit()) if directory.exists() else []


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    steps = 10
    # Uninterrupted reference (also warms the shared compilation cache).
    reference = _launch(tmp_path, "ref", steps=steps)
    _finish(reference, tmp_path, "ref")

    victim = _launch(tmp_path, "run", steps=steps, sleep=0.4)
    deadline = time.monotonic() + TIMEOUT
    while True:
        done = [p["step"] for p in _progress(tmp_path / "progress_run") if "step" in p]
        if done and done[-1] >= 5 and _committed_steps(tmp_path / "ckpt_run"):
            break
        if victim.poll() is not None:
            pytest.fail(f"run exited (rc {victim.returncode}) before it could be killed:\n"
                        f"{(tmp_path / 'log_run').read_text()[-3000:]}")
        if time.monotonic() > deadline:
            victim.kill()
            pytest.fail("run made no checkpoint in time")
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait(timeout=TIMEOUT) == -signal.SIGKILL
    assert not (tmp_path / "params_run.npz").exists()

    resumed = _launch(tmp_path, "run", steps=steps)
    _finish(resumed, tmp_path, "run")
    starts = [p["start"] for p in _progress(tmp_path / "progress_run") if "start" in p]
    assert starts[0] == 0 and 0 < starts[1] < steps, starts
    assert starts[1] % 2 == 0

    ref, got = np.load(tmp_path / "params_ref.npz"), np.load(tmp_path / "params_run.npz")
    assert sorted(ref) == sorted(got)
    for key in ref:
        np.testing.assert_allclose(got[key], ref[key], rtol=0, atol=1e-6, err_msg=key)
    assert int(got["__round__"]) == steps  # the extra (EM-like) state resumed too
    assert _committed_steps(tmp_path / "ckpt_run") == [8, 10]  # max_to_keep=2


def _state(config, seed, *, mesh=None, extra_size=3):
    model = build_model(config, rngs=nnx.Rngs(seed))
    if mesh is not None:
        model = shard_module(model, mesh)
    params = nnx.state(model, nnx.Param)
    return TrainState(step=jnp.int32(seed), params=params, opt_state=optax.adam(1e-3).init(params),
                      rng=jax.random.key(seed), data_position={"epoch": seed, "index": 4 * seed},
                      extra={"mixing": np.full(extra_size, 1.0 / extra_size), "round": seed})


def _host(x):
    if jnp.issubdtype(getattr(x, "dtype", np.float32), jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    return np.asarray(x)


def _assert_same(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(_host(x), _host(y)), a, b)


def test_sharded_state_restores_sharded_into_abstract_template(tmp_path):
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    config = LlamaConfig.tiny()
    saved = _state(config, 1, mesh=mesh)
    with CheckpointManager(tmp_path / "ckpt", fingerprint={"model": config}, max_to_keep=2) as ckpt:
        assert ckpt.restore_latest(saved) is None
        for step in (1, 2, 3):
            ckpt.save(step, saved)
        ckpt.wait_until_finished()
        assert ckpt.all_steps() == [2, 3]

    # Abstract template: shapes and shardings only, nothing allocated.
    abstract_model = nnx.eval_shape(lambda: build_model(config, rngs=nnx.Rngs(0)))
    abstract_params = nnx.state(abstract_model, nnx.Param)
    shardings = state_shardings(abstract_params, mesh)
    abstract_params = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                   abstract_params, shardings)
    template = TrainState(step=jnp.int32(0), params=abstract_params,
                          opt_state=with_param_shardings(jax.eval_shape(optax.adam(1e-3).init, abstract_params),
                                                         abstract_params),
                          rng=jax.eval_shape(lambda: jax.random.key(0)), data_position={"epoch": 0, "index": 0},
                          extra={"mixing": np.zeros(3), "round": 0})
    restored = CheckpointManager(tmp_path / "ckpt", fingerprint={"model": config}).restore_latest(template)
    _assert_same(restored, saved)
    assert restored.data_position == {"epoch": 1, "index": 4} and type(restored.extra["round"]) is int
    assert restored.params["layers"]["q"].get_value().sharding == saved.params["layers"]["q"].get_value().sharding
    assert restored.params["layers"]["q"].get_value().sharding.spec[1] == "fsdp"
    mu = restored.opt_state[0].mu["layers"]["up"].get_value()
    assert mu.sharding == shardings["layers"]["up"].get_value()
    assert restored.opt_state[0].count.sharding.is_fully_replicated

    # A concrete (freshly initialised, sharded) state works as the template too, and keeps its shardings.
    fresh = _state(config, 5, mesh=mesh)
    again = CheckpointManager(tmp_path / "ckpt", fingerprint={"model": config}).restore_latest(fresh)
    _assert_same(again, saved)
    assert (again.opt_state[0].nu["layers"]["q"].get_value().sharding
            == fresh.opt_state[0].nu["layers"]["q"].get_value().sharding)


def test_refuses_other_model_config_and_other_shapes(tmp_path):
    config = GPT2Config.tiny()
    with CheckpointManager(tmp_path / "ckpt", fingerprint={"model": config, "num_groups": 2}) as ckpt:
        ckpt.save(4, _state(config, 0))
        ckpt.wait_until_finished()

    other = GPT2Config(vocab_size=128, max_position_embeddings=64, hidden_size=48, num_layers=2, num_heads=4)
    other_state = _state(other, 0)
    with pytest.raises(CheckpointMismatchError, match="fingerprint differs") as err:
        CheckpointManager(tmp_path / "ckpt", fingerprint={"model": other, "num_groups": 2}).restore_latest(
            other_state)
    assert "model.hidden_size: checkpoint 32 != current 48" in str(err.value)
    assert "num_groups" not in str(err.value)

    with pytest.raises(CheckpointMismatchError, match="num_groups: checkpoint 2 != current 3"):
        CheckpointManager(tmp_path / "ckpt", fingerprint={"model": config, "num_groups": 3}).restore_latest(
            _state(config, 0))

    # Same fingerprint, but a template of another shape: every mismatched leaf is listed.
    with pytest.raises(CheckpointMismatchError, match="state structure/shapes differ") as err:
        CheckpointManager(tmp_path / "ckpt", fingerprint={"model": config, "num_groups": 2}).restore_latest(
            other_state._replace(extra={"mixing": np.zeros(2)}))
    msg = "\n".join(err.value.mismatches)
    assert "extra/mixing" in str(err.value) and "... and" in str(err.value)
    assert "params/layers/qkv/value: checkpoint float32[2, 32, 3, 4, 8] != template float32[2, 48, 3, 4, 12]" in msg
    assert "extra/mixing: checkpoint float64[3] != template float64[2]" in msg
    assert "extra/round: in the checkpoint but not in the template" in msg
