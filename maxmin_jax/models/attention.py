"""Causal self-attention of a call's own tokens through fused kernels: cuDNN flash attention on GPUs and Pallas
splash attention on TPUs (neither keeps [B, H, T, T] scores in memory), XLA's fused attention elsewhere; the first
and last through `jax.nn.dot_product_attention`.

Left padding is the library's convention (pads before each row's first real token; zeros after the last real token
are allowed and change nothing for real tokens, which never look ahead). The kernels take it differently:

- `xla`: a boolean key mask [B, 1, 1, S] beside `is_causal`. A pad query then sees no key, and the kernel's finite
  large negative fill gives it a uniform (finite, unused) output.
- `cudnn`: flash attention has no left-padding mode, and a mask becomes an additive [B, 1, T, S] bias whose
  gradient the kernel computes too. Instead each row is rotated so its real tokens come first (right padding) and
  the kernel masks by sequence length (`PADDING_CAUSAL`); outputs are rotated back and pad rows set to 0.
- `splash`: segment ids (1 for real tokens, 0 for pads) beside a static causal mask: real tokens see real ones,
  a pad sees the pads up to itself (never an empty row). GQA runs the MQA kernel once per key/value head. On a mesh
  it runs under `shard_map`, split over the batch (and over heads where both head counts divide the tensor axis).

`implementation="auto"` picks cuDNN only where it can serve: a GPU backend, bf16/fp16 inputs, a head dimension
that is a multiple of 8 and at most 128 (256 from Hopper on), and shapes whose forward and backward compiled in
a probe (once per shape, cached); splash on a TPU backend for sequence lengths that are multiples of 128; anything
else, including a failed probe, takes the XLA path (a failed probe with a warning). The decoding step's attention
over the KV cache is not here: see `layers.attention`.
"""

from __future__ import annotations

import functools
import warnings
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P
from jaxtyping import Array, Bool, Float

from maxmin_jax.partitioning import ShardingError, logical_to_spec

AttentionImpl = Literal["auto", "xla", "cudnn", "splash"]
IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash")
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
SPLASH_BLOCKS = (512, 256, 128)  # the largest dividing the sequence length is used


def self_attention(q: Float[Array, "b t h d"], k: Float[Array, "b t kv d"], v: Float[Array, "b t kv d"],
                   valid: Bool[Array, "b t"] | None, implementation: AttentionImpl = "auto", *,
                   mesh: Mesh | None = None) -> Float[Array, "b t h d"]:
    """Causal grouped-query attention of the tokens among themselves (MHA: kv == h, MQA: kv == 1), softmax in
    float32. `valid` marks real tokens (left padding; None: every token is real). `mesh`: where the operands live,
    for the kernels that must be told (splash)."""
    impl = resolve_implementation(implementation, q, k, padded=valid is not None)
    if impl == "cudnn":
        return _cudnn_left_padded(q, k, v, valid)
    if impl == "splash":
        return _splash(q, k, v, valid, mesh)
    mask = None if valid is None else valid[:, None, None, :]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation="xla")


def resolve_implementation(implementation: str, q, k, *, padded: bool = True) -> str:
    """The kernel `self_attention` runs for these operands (`padded`: with a mask of real tokens): "cudnn",
    "splash" or "xla" (see the module docstring). "auto" falls back to "xla"; asking for a kernel that cannot serve
    raises, saying why."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    if implementation == "xla":
        return "xla"
    reasons = []
    for kernel in ("cudnn", "splash") if implementation == "auto" else (implementation,):
        reason = _UNSUPPORTED[kernel](tuple(q.shape), tuple(k.shape), jnp.dtype(q.dtype), padded)
        if reason is None:
            return kernel
        reasons.append(reason)
    if implementation != "auto":
        raise ValueError(f"{implementation} attention cannot serve q {tuple(q.shape)} / k {tuple(k.shape)} "
                         f"{jnp.dtype(q.dtype).name}: {reasons[0]}")
    return "xla"


def cudnn_unsupported(q_shape, k_shape, dtype) -> str | None:
    """Why cuDNN flash attention cannot take these operands (None: it may, subject to the compile probe)."""
    if jax.default_backend() != "gpu":
        return f"backend is {jax.default_backend()}, not gpu"
    if jnp.dtype(dtype) not in [jnp.dtype(d) for d in CUDNN_DTYPES]:
        return f"dtype {jnp.dtype(dtype).name} (cuDNN takes bfloat16 or float16)"
    head_dim = q_shape[-1]
    limit = 256 if _compute_capability() >= (9, 0) else 128
    if head_dim % 8 or head_dim > limit:
        return f"head dim {head_dim} (cuDNN takes multiples of 8 up to {limit} on this GPU)"
    return None


def _cudnn_unsupported_or_uncompilable(q_shape, k_shape, dtype, padded: bool) -> str | None:
    return cudnn_unsupported(q_shape, k_shape, dtype) or _cudnn_probe(q_shape, k_shape, dtype.name, padded)


def splash_unsupported(q_shape, k_shape, dtype, padded: bool = True) -> str | None:
    """Why Pallas splash attention cannot take these operands (None: it can)."""
    if jax.default_backend() != "tpu":
        return f"backend is {jax.default_backend()}, not tpu"
    if q_shape[1] % SPLASH_BLOCKS[-1]:
        return f"sequence length {q_shape[1]} (splash takes multiples of {SPLASH_BLOCKS[-1]})"
    return None


def _compute_capability() -> tuple[int, ...]:
    capability = getattr(jax.devices()[0], "compute_capability", None)
    return tuple(int(x) for x in str(capability).split(".")) if capability else (0,)


@functools.lru_cache(maxsize=None)
def _cudnn_probe(q_shape: tuple[int, ...], k_shape: tuple[int, ...], dtype: str, padded: bool) -> str | None:
    """Compile cuDNN attention's forward and backward for these shapes (and mask mode) on its own; the error text
    if it fails. A kernel cuDNN lacks for a shape (no engine, a version too old) fails at compile time, which a
    trace-time check cannot see, so the step falls back to XLA instead of crashing."""
    def loss(q, k, v, pads):
        valid = jnp.arange(q.shape[1])[None] >= pads[:, None] if padded else None
        return _cudnn_left_padded(q, k, v, valid).astype(jnp.float32).sum()

    args = (jax.ShapeDtypeStruct(q_shape, dtype), jax.ShapeDtypeStruct(k_shape, dtype),
            jax.ShapeDtypeStruct(k_shape, dtype), jax.ShapeDtypeStruct(q_shape[:1], jnp.int32))
    try:
        jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*args).compile()
    except Exception as error:  # noqa: BLE001 - any failure means: do not use cuDNN for this shape
        message = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        warnings.warn(f"cuDNN flash attention failed to compile for q {q_shape} k {k_shape} {dtype} "
                      f"({message}); using XLA's attention", RuntimeWarning, stacklevel=2)
        return message
    return None


def _cudnn_left_padded(q, k, v, valid, kernel: str = "cudnn"):
    """cuDNN flash attention of left-padded rows, rotated to right padding and back (see the module docstring).
    `kernel="xla"` runs the same rotation through XLA's attention (how the CPU tests check it)."""
    t = q.shape[1]
    if valid is None:
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=kernel)
    pads = jnp.argmax(valid, axis=1).astype(jnp.int32)  # leading pads per row (0 for a row without real tokens)
    lengths = t - pads
    slots = jnp.arange(t, dtype=jnp.int32)[None]
    to_right = (slots + pads[:, None]) % t  # right-padded row i holds left-padded token i + pads
    to_left = (slots - pads[:, None]) % t
    q, k, v = (_permute_tokens(x, to_right, to_left) for x in (q, k, v))
    out = jax.nn.dot_product_attention(q, k, v, is_causal=True, query_seq_lengths=lengths,
                                       key_value_seq_lengths=lengths, implementation=kernel)
    out = _permute_tokens(out, to_left, to_right)
    return jnp.where((slots >= pads[:, None])[:, :, None, None], out, jnp.zeros((), out.dtype))


@jax.custom_vjp
def _permute_tokens(x, order, inverse):
    """`x[b, order[b, i]]` for every row: a gather whose gradient is the inverse gather, not a scatter-add."""
    return jnp.take_along_axis(x, order[:, :, None, None], axis=1)


def _permute_fwd(x, order, inverse):
    return _permute_tokens(x, order, inverse), (order, inverse)


def _permute_bwd(residuals, g):
    order, inverse = residuals
    return _permute_tokens(g, inverse, order), None, None


_permute_tokens.defvjp(_permute_fwd, _permute_bwd)


def _splash(q, k, v, valid, mesh: Mesh | None, *, interpret: bool = False):
    """Pallas splash attention (see the module docstring); `interpret=True` runs the kernel's interpreter (CPU)."""
    b, t, h, d = q.shape
    kv = k.shape[2]
    kernel = _splash_kernel(t, h // kv, interpret)
    scale = jnp.asarray(1 / np.sqrt(d), q.dtype)  # splash does not scale the logits

    def run(q, k, v, valid):
        bl = q.shape[0]
        qg = (q * scale).reshape(bl, t, k.shape[2], -1, d).transpose(0, 2, 3, 1, 4)  # [b, kv, g, t, d]
        kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [b, kv, t, d]
        segments = jnp.ones((bl, t), jnp.int32) if valid is None else valid.astype(jnp.int32)

        def row(qg, kt, vt, ids):  # one sequence: the MQA kernel once per key/value head
            return jax.vmap(lambda q1, k1, v1: kernel(q1, k1, v1, segment_ids=_segment_ids(ids)))(qg, kt, vt)

        out = jax.vmap(row)(qg, kt, vt, segments)  # [b, kv, g, t, d]
        return out.transpose(0, 3, 1, 2, 4).reshape(bl, t, -1, d)

    if mesh is None:
        return run(q, k, v, valid)
    q_spec, kv_spec, rows = _splash_specs(mesh, q.shape, k.shape)
    return jax.shard_map(run, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, None if valid is None else rows),
                         out_specs=q_spec, check_vma=False)(q, k, v, valid)


def _splash_specs(mesh: Mesh, q_shape, k_shape) -> tuple[P, P, P]:
    """Batch split as the logical rules split it (whole where it does not divide); heads split over the tensor axis
    only where query and key/value heads both divide, so each shard keeps whole groups."""
    def spec(axes, shape):
        try:
            return logical_to_spec(axes, shape, mesh, name="attention")
        except ShardingError:
            return logical_to_spec((None, *axes[1:]), shape, mesh, name="attention")

    q_spec = spec(("batch", None, "heads", None), q_shape)
    kv_spec = spec(("batch", None, "kv_heads", None), k_shape)
    if q_spec[2] != kv_spec[2]:  # split one but not the other: keep both whole
        q_spec, kv_spec = P(q_spec[0], None, None, None), P(kv_spec[0], None, None, None)
    return q_spec, kv_spec, P(q_spec[0], None)


@functools.lru_cache(maxsize=None)
def _splash_kernel(t: int, groups: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    block = next(size for size in SPLASH_BLOCKS if t % size == 0)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    mask = masks.MultiHeadMask([masks.CausalMask((t, t)) for _ in range(groups)])
    with jax.ensure_compile_time_eval():  # concrete mask tables even when first built inside a trace (cached)
        return splash.make_splash_mqa(mask, head_shards=1, q_seq_shards=1, block_sizes=sizes, interpret=interpret)


def _segment_ids(ids):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash

    return splash.SegmentIds(q=ids, kv=ids)


_UNSUPPORTED = {"cudnn": _cudnn_unsupported_or_uncompilable, "splash": splash_unsupported}
