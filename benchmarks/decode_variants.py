"""Experiment behind the decode changes in NOTES.md (not a registered benchmark): GPT-2 124M greedy decode loops,
47 steps at batch 8 after a 64-token prompt, in one jitted `fori_loop` with the KV cache in the carry, under two
layer strategies x two cache layouts. Checks that every variant emits the same tokens, then times them interleaved.

    taskset -c 1 python -m benchmarks.decode_variants --repeats 5

- `scan`: layers scanned over the stacked weights (what `maxmin_jax.generate` does with `unroll_layers=False`, its
  default on accelerators; on CPU, XLA copies each layer's weight slices into fresh buffers on every step, then
  YNNPACK reads them again).
- `hoisted`: the stacked weights are sliced into per-layer arrays once per call, outside the decode loop, and the
  loop body runs the layers unrolled over those arrays (no per-step copies; `generate`'s default on CPU).
- `bskd` / `bksd`: the cache stored [layers, batch, slots, kv_heads, head_dim] (the layout before 2026-11-26, kept
  here for the comparison; the attention dots transpose a layer's keys and values every step) or [layers, batch,
  kv_heads, slots, head_dim] (`CausalLM.init_cache`'s layout now).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import maxmin_jax.models.gpt2 as gpt2_module
from benchmarks.timing import jax_sync, measure_interleaved
from maxmin_jax.models import GPT2Config, build_model
from maxmin_jax.models.layers import AttentionContext, KVCache
from maxmin_jax.models.layers import attend_with_cache as attend_bksd

BATCH, PROMPT, NEW = 8, 64, 48


def attend_bskd(q, k_new, v_new, ctx: AttentionContext, cache: KVCache, layer):
    """`attend_with_cache` for a cache stored [L, B, S, KV, D] (decode only: a cache is always given)."""
    b, t, h, d = q.shape
    kv = k_new.shape[2]
    index = (layer, 0, ctx.cache_index, 0, 0)
    k_all = jax.lax.dynamic_update_slice(cache.k, k_new[None].astype(cache.k.dtype), index)
    v_all = jax.lax.dynamic_update_slice(cache.v, v_new[None].astype(cache.v.dtype), index)
    k, v = k_all[layer], v_all[layer]
    qg = q.reshape(b, t, kv, h // kv, d)
    scale = jnp.sqrt(d).astype(jnp.float32)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) / scale
    allowed = (jnp.arange(k.shape[1])[None, :] <= ctx.query_slots[:, None])[None] & ctx.key_valid[:, None, :]
    scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, h, d).astype(q.dtype), KVCache(k_all, v_all)


def decode_loop(model, *, hoisted: bool, layout: str):
    """A jitted greedy decode of NEW - 1 steps; returns (call, tokens of a first call)."""
    cfg = model.config
    slots = PROMPT + NEW
    gpt2_module.attend_with_cache = attend_bksd if layout == "bksd" else attend_bskd  # read when tracing
    graphdef, state = nnx.split(model)
    per_slot = (cfg.num_heads, slots) if layout == "bksd" else (slots, cfg.num_heads)
    shape = (cfg.num_layers, BATCH, *per_slot, cfg.head_dim)
    key_valid = jnp.ones((BATCH, slots), bool)

    @jax.jit
    def loop(state):
        m = nnx.merge(graphdef, state)
        layers = m.unstack_layers() if hoisted else None

        def body(i, carry):
            cache, token = carry
            positions, index = jnp.full((BATCH, 1), PROMPT + i, jnp.int32), PROMPT + i
            hidden, cache = m.forward(token[:, None], positions=positions, cache=cache, cache_index=index,
                                      key_valid=key_valid, layer_params=layers)
            return cache, jnp.argmax(m.logits(hidden)[:, 0], -1).astype(jnp.int32)

        cache = KVCache(jnp.zeros(shape, m.dtype), jnp.zeros(shape, m.dtype))
        return jax.lax.fori_loop(0, NEW - 1, body, (cache, jnp.ones((BATCH,), jnp.int32)))[1]

    first = np.asarray(loop(state))  # traced now, with this variant's attention in place
    gpt2_module.attend_with_cache = attend_bksd
    return jax_sync(lambda: loop(state)), first


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.decode_variants", description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    model = build_model(GPT2Config.gpt2(), rngs=nnx.Rngs(0))
    calls, tokens = {}, {}
    for name, hoisted, layout in (("scan", False, "bskd"), ("scan+bksd", False, "bksd"),
                                  ("hoisted", True, "bskd"), ("hoisted+bksd", True, "bksd")):
        calls[name], tokens[name] = decode_loop(model, hoisted=hoisted, layout=layout)
    same = all((tokens["scan"] == t).all() for t in tokens.values())
    print(f"all variants emit the same tokens: {same}")
    timings = measure_interleaved(calls, repeats=args.repeats, warmup=1)
    steps = NEW - 1
    for name, t in timings.items():
        print(f"{name:13s} {t.median_s / steps * 1e3:6.1f} ms/step (IQR {t.q1_s / steps * 1e3:.1f}-"
              f"{t.q3_s / steps * 1e3:.1f}), CPU {t.cpu_median_s / steps * 1e3:.1f} ms/step")


if __name__ == "__main__":
    main()
