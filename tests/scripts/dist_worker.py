"""One process of a multi-process run on localhost, used by tests/test_distributed.py.

Each process has 2 CPU devices; together they form a (data=1, fsdp=2, tensor=2) mesh whose FSDP axis spans the
two processes, so parameters are split across processes and the step needs cross-process collectives. Each process
loads only its rows of a fixed global batch; together they compute the loss and gradient of a tiny GPT-2, gathered
and written (npz) by every process for the test to compare with a single-process computation.
"""

from __future__ import annotations

import argparse

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from maxmin_jax import distributed
from maxmin_jax.models import GPT2Config, build_model
from maxmin_jax.sharding import make_mesh, shard_module

GLOBAL_BATCH, SEQ = 8, 12


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()  # coordinator, process count and id come from JAX_* environment variables

    assert distributed.initialize(initialization_timeout=60), "expected a multi-process run"
    assert jax.process_count() == 2 and jax.local_device_count() == 2 and jax.device_count() == 4

    config = GPT2Config.tiny(vocab_size=64, max_position_embeddings=SEQ)
    mesh = make_mesh(data=1, fsdp=2, tensor=2)
    graphdef, params = nnx.split(shard_module(build_model(config, rngs=nnx.Rngs(0)), mesh))
    assert not params["layers"]["fc"].get_value().is_fully_addressable  # really split across processes

    tokens = np.random.default_rng(7).integers(0, config.vocab_size, (GLOBAL_BATCH, SEQ), dtype=np.int32)
    rows = distributed.process_batch_slice(GLOBAL_BATCH, mesh=mesh)
    assert rows == distributed.process_batch_slice(GLOBAL_BATCH, jax.process_index(), jax.process_count())
    batch = distributed.host_local_to_global({"tokens": tokens[rows]}, mesh)
    assert batch["tokens"].shape == (GLOBAL_BATCH, SEQ)

    def loss_fn(params, tokens):
        logits = nnx.merge(graphdef, params)(tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params, batch["tokens"])
    grads = jax.jit(lambda g: g, out_shardings=NamedSharding(mesh, P()))(grads)  # gather for comparison
    flat = {"/".join(map(str, path)): np.asarray(v.get_value()) for path, v in nnx.to_flat_state(grads)}
    np.savez(args.out, loss=np.asarray(loss), rows=np.asarray([rows.start, rows.stop]), **flat)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
