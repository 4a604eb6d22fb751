"""Hardware ceilings measured in the same run as the figures they bound (at its start and its end).

Each ceiling is the best of a few ways of measuring it (recorded separately), on random data (never zeros), with
warm-up and the median of repeats:

- `matmul_f32` (CPU): GFLOP/s of an n x n x n float32 matmul (2 n^3 FLOPs), through XLA and through PyTorch.
- `read_bandwidth` (CPU): GB/s reading a 0.5 GiB float32 array once (GPT-2 124M's weights are 0.5 GB): a jitted
  `jnp.sum`, a jitted row sum, and `torch.sum` (multi-threaded).
- `matmul_bf16` (GPU): TFLOP/s of an n x n x n bfloat16 matmul, rotating over three input pairs.
- `copy_bandwidth` (GPU): GB/s of a device-to-device elementwise copy (bytes read + bytes written).
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.registry import Ceiling, Context, register_ceiling
from benchmarks.timing import jax_sync, measure, torch_sync


def _time(ctx: Context, fn, minimum_repeats: int = 10):
    """Time a short call: at least one warm-up (compilation), and more repeats in full runs (they cost little)."""
    return measure(fn, repeats=ctx.repeats_at_least(minimum_repeats), warmup=max(ctx.warmup, 1))


def _normal(key: int, shape, dtype):
    return jax.random.normal(jax.random.key(key), shape, jnp.float32).astype(dtype)


@register_ceiling("matmul_f32")
def matmul_f32(ctx: Context) -> Ceiling:
    import torch

    n = 256 if ctx.quick else 2048
    flops = 2.0 * n ** 3
    a, b = _normal(0, (n, n), jnp.float32), _normal(1, (n, n), jnp.float32)
    mm = jax.jit(jnp.matmul)
    ta, tb = torch.from_numpy(np.array(a)), torch.from_numpy(np.array(b))
    timings = {"xla": _time(ctx, jax_sync(lambda: mm(a, b))), "torch": _time(ctx, torch_sync(lambda: ta @ tb))}
    methods = {k: flops / t.median_s / 1e9 for k, t in timings.items()}
    return Ceiling.of_methods("matmul_f32", "GFLOP/s", methods, timings,
                              f"float32 {n}x{n} @ {n}x{n} matmul, best of XLA and PyTorch")


@register_ceiling("read_bandwidth")
def read_bandwidth(ctx: Context) -> Ceiling:
    import torch

    count = (2 << 20) if ctx.quick else (128 << 20)  # 8 MiB or 512 MiB of float32
    nbytes = 4.0 * count
    x = _normal(2, (count,), jnp.float32)
    rows = x.reshape(-1, 4096)
    total = jax.jit(jnp.sum)
    row_sum = jax.jit(lambda r: r.sum(axis=1))
    tx = torch.from_numpy(np.array(x))
    timings = {"xla_sum": _time(ctx, jax_sync(lambda: total(x))),
               "xla_row_sum": _time(ctx, jax_sync(lambda: row_sum(rows))),
               "torch_sum": _time(ctx, torch_sync(lambda: tx.sum()))}
    methods = {k: nbytes / t.median_s / 1e9 for k, t in timings.items()}
    return Ceiling.of_methods("read_bandwidth", "GB/s", methods, timings,
                              f"read {nbytes / 2**30:.3g} GiB of float32 once, best of a jitted sum, a jitted row "
                              "sum and torch.sum")


@register_ceiling("matmul_bf16")
def matmul_bf16(ctx: Context) -> Ceiling:
    n = 256 if ctx.quick else 8192
    flops = 2.0 * n ** 3
    pairs = [(_normal(10 + 2 * i, (n, n), jnp.bfloat16), _normal(11 + 2 * i, (n, n), jnp.bfloat16))
             for i in range(3)]
    mm = jax.jit(jnp.matmul)
    cycle = itertools.cycle(pairs)
    timing = _time(ctx, jax_sync(lambda: mm(*next(cycle))), 30)
    return Ceiling.of_methods("matmul_bf16", "TFLOP/s", {"xla": flops / timing.median_s / 1e12}, {"xla": timing},
                              f"bfloat16 {n}x{n} @ {n}x{n} matmul (float32 accumulation), three input pairs in "
                              "rotation")


@register_ceiling("copy_bandwidth")
def copy_bandwidth(ctx: Context) -> Ceiling:
    count = (4 << 20) if ctx.quick else (1 << 30)  # bf16: 8 MiB or 2 GiB, far beyond any cache
    x = _normal(20, (count,), jnp.bfloat16)
    scale = jax.jit(lambda v: v * jnp.asarray(1.5, v.dtype))
    timing = _time(ctx, jax_sync(lambda: scale(x)), 20)
    nbytes = 2.0 * x.nbytes  # each element read once and written once
    return Ceiling.of_methods("copy_bandwidth", "GB/s", {"xla_scale_copy": nbytes / timing.median_s / 1e9},
                              {"xla_scale_copy": timing}, f"device-to-device elementwise copy of "
                              f"{x.nbytes / 2**30:.3g} GiB bfloat16, bytes read + written")
