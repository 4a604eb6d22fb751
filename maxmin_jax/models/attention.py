"""Causal self-attention of a call's own tokens through `jax.nn.dot_product_attention`: cuDNN flash attention on
GPUs (no [B, H, T, T] scores in memory), XLA's fused attention elsewhere.

Left padding is the library's convention (pads before each row's first real token; zeros after the last real token
are allowed and change nothing for real tokens, which never look ahead). The two kernels take it differently:

- `xla`: a boolean key mask [B, 1, 1, S] beside `is_causal`. A pad query then sees no key, and the kernel's finite
  large negative fill gives it a uniform (finite, unused) output.
- `cudnn`: flash attention has no left-padding mode, and a mask becomes an additive [B, 1, T, S] bias whose
  gradient the kernel computes too. Instead each row is rotated so its real tokens come first (right padding) and
  the kernel masks by sequence length (`PADDING_CAUSAL`); outputs are rotated back and pad rows set to 0.

`implementation="auto"` picks cuDNN only where it can serve: a GPU backend, bf16/fp16 inputs, a head dimension
that is a multiple of 8 and at most 128 (256 from Hopper on), and shapes whose forward and backward compiled in
a probe (once per shape, cached); anything else, including a failed probe, takes the XLA path with a warning. The
decoding step's attention over the KV cache is not here: see `layers.attention`.
"""

from __future__ import annotations

import functools
import warnings
from typing import Literal

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

AttentionImpl = Literal["auto", "xla", "cudnn"]
IMPLEMENTATIONS = ("auto", "xla", "cudnn")
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def self_attention(q: Float[Array, "b t h d"], k: Float[Array, "b t kv d"], v: Float[Array, "b t kv d"],
                   valid: Bool[Array, "b t"] | None, implementation: AttentionImpl = "auto") -> Float[Array, "b t h d"]:
    """Causal grouped-query attention of the tokens among themselves (MHA: kv == h, MQA: kv == 1), softmax in
    float32. `valid` marks real tokens (left padding; None: every token is real)."""
    impl = resolve_implementation(implementation, q, k)
    if impl == "cudnn":
        return _cudnn_left_padded(q, k, v, valid)
    mask = None if valid is None else valid[:, None, None, :]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation="xla")


def resolve_implementation(implementation: str, q, k) -> str:
    """The kernel `self_attention` runs for these operands: "cudnn" or "xla" (see the module docstring)."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    if implementation == "xla":
        return "xla"
    reason = cudnn_unsupported(q.shape, k.shape, q.dtype)
    if reason is None:
        reason = _cudnn_probe(tuple(q.shape), tuple(k.shape), jnp.dtype(q.dtype).name)
    if reason is None:
        return "cudnn"
    if implementation == "cudnn":
        raise ValueError(f"cuDNN attention cannot serve q {q.shape} / k {k.shape} {jnp.dtype(q.dtype).name}: {reason}")
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


def _compute_capability() -> tuple[int, ...]:
    capability = getattr(jax.devices()[0], "compute_capability", None)
    return tuple(int(x) for x in str(capability).split(".")) if capability else (0,)


@functools.lru_cache(maxsize=None)
def _cudnn_probe(q_shape: tuple[int, ...], k_shape: tuple[int, ...], dtype: str) -> str | None:
    """Compile cuDNN attention's forward and backward for these shapes on its own; the error text if it fails.
    A kernel cuDNN lacks for a shape (an engine not found, a version too old) fails at compile time, which a
    trace-time check cannot see, so the step falls back to XLA instead of crashing."""
    def loss(q, k, v, pads):
        valid = jnp.arange(q.shape[1])[None] >= pads[:, None]
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
