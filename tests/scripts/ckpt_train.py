"""A tiny, real, resumable training run, used by tests/test_checkpoint.py as a subprocess (so it can be killed).

Trains a tiny GPT-2 LM with optax on fixed synthetic tokens. The state lives on a one-device mesh (in-process CPU
collectives between fake devices deadlocked here under heavy load; sharded restore is tested in-process); the
jitted step is `(state, batch, key) -> (state, metrics)` with the state donated and per-step keys
`fold_in(root, step)` (the key drops random loss positions, so a wrong key after resuming changes the result).
Data come in epochs of a seeded permutation; the position (epoch, index) is checkpointed with the state, as is an
"extra" pytree standing in for EM state. Every `--ckpt-every` steps the state is saved (asynchronously); each step
appends a line to `--progress`. At the end the parameters are written to `--out` (npz).
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from maxmin_jax.checkpoint import CheckpointManager, TrainState
from maxmin_jax.models import GPT2Config, build_model
from maxmin_jax.sharding import make_mesh, shard_batch, shard_module

BATCH, SEQ, ROWS = 4, 16, 24


def batches(tokens: np.ndarray, position: dict[str, int]):
    """Rows of an epoch-seeded permutation, from `position` on; yields (batch, position after it)."""
    epoch, index = position["epoch"], position["index"]
    while True:
        order = np.random.default_rng(epoch).permutation(len(tokens))
        while index + BATCH <= len(tokens):
            rows = tokens[order[index: index + BATCH]]
            index += BATCH
            yield rows, {"epoch": epoch, "index": index}
        epoch, index = epoch + 1, 0


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--ckpt-dir", required=True)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--ckpt-every", type=int, default=2)
    parser.add_argument("--progress", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--sleep", type=float, default=0.0, help="seconds per step, so a test can kill mid-run")
    args = parser.parse_args()

    config = GPT2Config.tiny(vocab_size=64, max_position_embeddings=SEQ)
    mesh = make_mesh(data=1, fsdp=1, tensor=1, devices=jax.devices()[:1])
    tx = optax.adamw(3e-3)
    model = shard_module(build_model(config, rngs=nnx.Rngs(0)), mesh)
    graphdef, params = nnx.split(model)
    state = TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params), rng=jax.random.key(42),
                       data_position=None, extra=None)
    position = {"epoch": 0, "index": 0}
    extra = {"mixing": np.full(3, 1 / 3), "round": 0}
    tokens = np.random.default_rng(123).integers(0, config.vocab_size, (ROWS, SEQ), dtype=np.int32)

    ckpt = CheckpointManager(args.ckpt_dir, fingerprint={"model": config, "num_groups": 3, "lr": 3e-3},
                             max_to_keep=2, save_interval_steps=args.ckpt_every)
    template = state._replace(data_position=position, extra=extra)
    restored = ckpt.restore_latest(template)
    if restored is not None:
        state = restored._replace(data_position=None, extra=None)
        position, extra = restored.data_position, restored.extra
    start = int(state.step)
    with open(args.progress, "a") as f:
        f.write(json.dumps({"start": start}) + "\n")

    def train_step(state: TrainState, batch, key):
        keep = jax.random.bernoulli(key, 0.8, batch[:, 1:].shape).astype(jnp.float32)

        def loss_fn(params):
            logits = nnx.merge(graphdef, params)(batch[:, :-1])
            nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:])
            return (nll * keep).sum() / jnp.maximum(keep.sum(), 1.0)

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return state._replace(step=state.step + 1, params=params, opt_state=opt_state), {"loss": loss}

    train_step = jax.jit(train_step, donate_argnums=0)
    stream = batches(tokens, position)
    for step in range(start, args.steps):
        batch, position = next(stream)
        state, metrics = train_step(state, shard_batch(jnp.asarray(batch), mesh), jax.random.fold_in(state.rng, step))
        extra = {"mixing": extra["mixing"], "round": extra["round"] + 1}
        ckpt.save(step + 1, state._replace(data_position=position, extra=extra))
        with open(args.progress, "a") as f:
            f.write(json.dumps({"step": step + 1, "loss": float(metrics["loss"])}) + "\n")
        time.sleep(args.sleep)
    ckpt.wait_until_finished()
    ckpt.close()
    flat = {"/".join(map(str, path)): np.asarray(v.get_value()) for path, v in nnx.to_flat_state(state.params)}
    np.savez(args.out, **flat, __round__=np.asarray(extra["round"]), __epoch__=np.asarray(position["epoch"]),
             __index__=np.asarray(position["index"]))


if __name__ == "__main__":
    main()
