"""Where the time of one jitted call goes, per XLA operation, from the JAX profiler's trace.

    python -m benchmarks.profile --what generate            # GPT-2 124M, 8 prompts of 64, 48 greedy tokens
    python -m benchmarks.profile --what forward --model llama_small
    taskset -c 1 python -m benchmarks.profile --what generate   # one core: steadier on a shared machine

Prints, per HLO instruction name (fusions, dots, loops), the total time, the number of executions and the time
per execution. Names match the compiled HLO (`jax.jit(f).lower(...).compile().as_text()`), so a costly fusion can
be looked up there; `--hlo FILE` writes that text. Loop instructions (`while.*`) include their bodies.
"""

from __future__ import annotations

import argparse
import collections
import glob
import tempfile

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks.lm import FULL, _config
from maxmin_jax.generate import generate
from maxmin_jax.models import build_model


def _calls(what: str, family: str):
    model = build_model(_config(family, quick=False), rngs=nnx.Rngs(0))
    vocab = model.config.vocab_size
    if what == "generate":
        ids = jax.random.randint(jax.random.key(1), (FULL.batch, FULL.prompt), 0, vocab, jnp.int32)
        return lambda: generate(model, ids, jnp.ones_like(ids), max_new_tokens=FULL.new_tokens,
                                rng=jax.random.key(0), temperature=0.0), None
    ids = jax.random.randint(jax.random.key(1), (FULL.batch, FULL.seq), 0, vocab, jnp.int32)
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids))
    return lambda: forward(state, ids), lambda: forward.lower(state, ids).compile().as_text()


def op_times(fn) -> tuple[collections.Counter, collections.Counter]:
    """Total nanoseconds and counts per event name over one traced call of `fn` (after a warm-up call)."""
    jax.block_until_ready(fn())
    with tempfile.TemporaryDirectory() as logdir:
        jax.profiler.start_trace(logdir)
        jax.block_until_ready(fn())
        jax.profiler.stop_trace()
        (path,) = glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True)
        data = jax.profiler.ProfileData.from_file(path)
    total, count = collections.Counter(), collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            if line.name == "python":
                continue
            for event in line.events:
                total[event.name] += event.duration_ns
                count[event.name] += 1
    return total, count


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile", description=__doc__.splitlines()[0])
    p.add_argument("--what", choices=("generate", "forward"), default="generate")
    p.add_argument("--model", choices=("gpt2", "llama_small"), default="gpt2")
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--hlo", default=None, help="write the compiled HLO text here (forward only)")
    args = p.parse_args(argv)
    fn, hlo = _calls(args.what, "gpt2" if args.model == "gpt2" else "llama")
    if args.hlo and hlo is not None:
        with open(args.hlo, "w") as f:
            f.write(hlo())
    total, count = op_times(fn)
    skip = ("ThunkExecutor::Execute", "ThunkExecutor::Execute (wait for completion)")
    print(f"{'total ms':>10}  {'calls':>6}  {'ms/call':>8}  op")
    for name, ns in total.most_common():
        if name in skip:
            continue
        print(f"{ns / 1e6:10.1f}  {count[name]:6d}  {ns / 1e6 / count[name]:8.3f}  {name}")
        args.top -= 1
        if args.top == 0:
            break


if __name__ == "__main__":
    main()
