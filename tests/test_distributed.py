"""Multi-process helpers: two real processes on localhost agree with one process; row slicing; no-op init."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from conftest import xla_flags
from maxmin_jax import distributed
from maxmin_jax.models import GPT2Config, build_model
from maxmin_jax.sharding import make_mesh, shard_batch

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "scripts" / "dist_worker.py"
TIMEOUT = 90
GLOBAL_BATCH, SEQ = 8, 12  # as in tests/scripts/dist_worker.py


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_single_process(tmp_path):
    port = _free_port()
    procs = []
    for pid in range(2):
        env = dict(os.environ)
        env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(2),
                   JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid),
                   PYTHONPATH=f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}")
        log = open(tmp_path / f"log_{pid}", "w")
        procs.append(subprocess.Popen([sys.executable, str(WORKER), "--out", str(tmp_path / f"out_{pid}.npz")],
                                      env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT))
    try:
        for pid, proc in enumerate(procs):
            try:
                rc = proc.wait(timeout=TIMEOUT)
            except subprocess.TimeoutExpired:
                pytest.fail(f"process {pid} hung for {TIMEOUT}s:\n{(tmp_path / f'log_{pid}').read_text()[-3000:]}")
            assert rc == 0, f"process {pid} failed (rc {rc}):\n{(tmp_path / f'log_{pid}').read_text()[-3000:]}"
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    # The same computation in this single process.
    config = GPT2Config.tiny(vocab_size=64, max_position_embeddings=SEQ)
    graphdef, params = nnx.split(build_model(config, rngs=nnx.Rngs(0)))
    tokens = np.random.default_rng(7).integers(0, config.vocab_size, (GLOBAL_BATCH, SEQ), dtype=np.int32)

    def loss_fn(params):
        logits = nnx.merge(graphdef, params)(tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
    expected = {"/".join(map(str, path)): np.asarray(v.get_value()) for path, v in nnx.to_flat_state(grads)}

    outs = [np.load(tmp_path / f"out_{pid}.npz") for pid in range(2)]
    assert [list(o["rows"]) for o in outs] == [[0, 4], [4, 8]]
    for out in outs:
        np.testing.assert_allclose(out["loss"], np.asarray(loss), rtol=1e-6, atol=1e-6)
        assert set(out) - {"loss", "rows"} == set(expected)
        for name, value in expected.items():
            np.testing.assert_allclose(out[name], value, rtol=1e-4, atol=1e-6, err_msg=name)
            assert np.abs(value).max() > 0 or "bias" in name


def test_process_batch_slice():
    assert distributed.process_batch_slice(12, 0, 3) == slice(0, 4)
    assert distributed.process_batch_slice(12, 2, 3) == slice(8, 12)
    assert distributed.process_batch_slice(12) == slice(0, 12)  # single process: everything
    with pytest.raises(ValueError, match="not divisible"):
        distributed.process_batch_slice(10, 0, 3)
    with pytest.raises(ValueError, match="out of range"):
        distributed.process_batch_slice(12, 3, 3)
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    assert distributed.process_batch_slice(16, mesh=mesh) == slice(0, 16)


def test_host_local_to_global_single_process_equals_shard_batch():
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    batch = {"ids": np.arange(32, dtype=np.int32).reshape(8, 4), "n": np.int32(3)}
    local = distributed.process_rows(batch, mesh=mesh)
    placed = distributed.host_local_to_global(local, mesh)
    reference = shard_batch(batch, mesh)
    for key in batch:
        np.testing.assert_array_equal(np.asarray(placed[key]), np.asarray(reference[key]))
        assert placed[key].sharding.is_equivalent_to(reference[key].sharding, np.ndim(batch[key]))


def test_initialize_is_a_noop_for_one_process(monkeypatch):
    for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_JOB_ID",
                "OMPI_MCA_orte_hnp_uri", "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(var, raising=False)
    called = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: called.append((a, k)))
    assert distributed.initialize() is False
    assert distributed.initialize(num_processes=1) is False
    monkeypatch.setenv("JAX_NUM_PROCESSES", "1")
    assert distributed.initialize() is False
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    with pytest.raises(ValueError, match="coordinator_address"):
        distributed.initialize()
    assert not called
