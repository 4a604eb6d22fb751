"""Pure building blocks shared by the model families: parameters with logical axes, norms, RoPE, attention.

Blocks are pure functions of a dict of one layer's arrays, so the same code runs under `lax.scan` over stacked
layers and in a plain Python loop over per-layer arrays (the decode loop, and `scan_layers=False`).
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from maxmin_jax.models.attention import self_attention

Initializer = Callable[..., jax.Array]
normal_init = nnx.initializers.normal(0.02)
ones_init = nnx.initializers.ones
zeros_init = nnx.initializers.zeros


def param(rngs: nnx.Rngs, init: Initializer, shape: tuple[int, ...], axes: tuple[str | None, ...],
          dtype) -> nnx.Param:
    """A parameter tagged with logical axis names; `maxmin_jax.sharding` maps the names to mesh axes."""
    assert len(shape) == len(axes), (shape, axes)
    return nnx.Param(init(rngs.params(), shape, dtype), logical_axes=axes)


class Stack(nnx.Module):
    """Holds one Param per block weight, each with a leading `layers` axis (scanned over)."""

    def arrays(self) -> dict[str, jax.Array]:
        return {name: var[...] for name, var in vars(self).items() if isinstance(var, nnx.Variable)}


class KVCache(NamedTuple):
    """Preallocated keys and values for every layer: [layers, batch, kv_heads, slots, head_dim].

    Slots sit next to head_dim, the layout the attention dots contract in, so a decode step reads each layer's keys
    and values as stored instead of transposing the whole cache (measured in benchmarks/NOTES.md)."""

    k: jax.Array
    v: jax.Array


class AttentionContext(NamedTuple):
    """What attention needs besides the block's weights, shared by all layers of one forward pass.

    Two modes. `key_valid` None: each token attends causally to the tokens of this call (training, scoring, and the
    prefill that starts a sequence in an empty cache), through a fused kernel. `key_valid` given: the call's tokens
    are written into the cache at `cache_index` and attend to every slot it marks, causally by slot (decoding)."""

    positions: Int[Array, "b t"]  # token positions, counted from each row's first real token
    valid: Bool[Array, "b t"] | None  # which of this call's tokens are real (None: all)
    key_valid: Bool[Array, "b s"] | None  # decoding: which cache slots hold real tokens
    cache_index: Int[Array, ""] | int | None  # where this call's tokens are written in the cache; None: no cache


def positions_from_mask(mask: Int[Array, "b t"]) -> Int[Array, "b t"]:
    """Left padding: the first real token is position 0 (pads get 0 too; their outputs are never used)."""
    return jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0).astype(jnp.int32)


def layer_norm(x, scale, bias, eps: float):
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


def rms_norm(x, scale, eps: float):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + eps)
    return (y * scale.astype(jnp.float32)).astype(x.dtype)


def apply_rope(x: Float[Array, "b t h d"], positions: Int[Array, "b t"], theta: float) -> Float[Array, "b t h d"]:
    """Rotary embedding in HF Llama's half-split layout (rotate_half), computed in float32."""
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [b, t, d/2]
    cos = jnp.cos(jnp.concatenate([angles, angles], -1))[:, :, None, :]
    sin = jnp.sin(jnp.concatenate([angles, angles], -1))[:, :, None, :]
    x32 = x.astype(jnp.float32)
    half = d // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], -1)
    return (x32 * cos + rotated * sin).astype(x.dtype)


def attention(q: Float[Array, "b t h d"], k: Float[Array, "b kv s d"], v: Float[Array, "b kv s d"],
              query_slots: Int[Array, "t"], key_valid: Bool[Array, "b s"]) -> Float[Array, "b t h d"]:
    """Grouped-query attention over a KV cache layer stored [b, kv, s, d], causal by slot; the decoding path.

    Hand-written because the fused kernels take keys as [b, s, kv, d]: handing them this layout would transpose the
    layer's whole cache on every step. Queries are grouped per key/value head instead of repeating k and v, so GQA
    reads each key once; MHA and MQA are the cases kv == h and kv == 1. Scores and softmax in float32.
    """
    b, t, h, d = q.shape
    kv = k.shape[1]
    qg = q.reshape(b, t, kv, h // kv, d)
    scores = jnp.einsum("btkgd,bksd->bkgts", qg, k, preferred_element_type=jnp.float32) / jnp.sqrt(d).astype(
        jnp.float32)
    key_slots = jnp.arange(k.shape[2])
    allowed = (key_slots[None, :] <= query_slots[:, None])[None] & key_valid[:, None, :]  # [b, t, s]
    scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    # Output in the dot's natural [b, kv, g, t, d] order, transposed after: asked for [b, t, kv, g, d] directly,
    # XLA:CPU swaps the operands into a dot its fast kernels reject (and whose fallback lacks bf16 -> f32).
    out = jnp.einsum("bkgts,bksd->bkgtd", probs, v, preferred_element_type=jnp.float32)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d).astype(q.dtype)


def attend_with_cache(q, k_new: Float[Array, "b t kv d"], v_new: Float[Array, "b t kv d"], ctx: AttentionContext,
                      cache: KVCache | None, layer, *, implementation: str = "auto", mesh=None):
    """Self-attention of this call's tokens through a fused kernel (`implementation`, `mesh`: see
    `self_attention`), also writing their keys into `cache` at `ctx.cache_index` when there is one; or, when
    `ctx.key_valid` is given, attention over every marked cache slot after writing them."""
    if ctx.key_valid is None:
        out = self_attention(q, k_new, v_new, ctx.valid, implementation, mesh=mesh)
        if cache is None:
            return out, None
    k_t, v_t = k_new.swapaxes(1, 2), v_new.swapaxes(1, 2)  # [b, kv, t, d], the cache's layout
    index = (layer, 0, 0, ctx.cache_index, 0)
    k_all = jax.lax.dynamic_update_slice(cache.k, k_t[None].astype(cache.k.dtype), index)
    v_all = jax.lax.dynamic_update_slice(cache.v, v_t[None].astype(cache.v.dtype), index)
    if ctx.key_valid is not None:
        out = attention(q, k_all[layer], v_all[layer], ctx.cache_index + jnp.arange(q.shape[1]), ctx.key_valid)
    return out, KVCache(k_all, v_all)


def float32_logits(spec: str, hidden: jax.Array, table: jax.Array) -> Float[Array, "..."]:
    """`einsum(spec, hidden, table)` with a float32 output (what log-probabilities are computed from) whose backward
    runs in the inputs' dtype. Plain autodiff of a bf16 x bf16 -> f32 dot would take the float32 cotangent into
    float32 x bf16 dots, the vocabulary-sized matmuls of the backward at float32 speed; here the cotangent is
    rounded to the compute dtype first, the usual mixed-precision backward."""
    table = table.astype(hidden.dtype)
    if hidden.dtype == jnp.float32:
        return jnp.einsum(spec, hidden, table)
    return _low_precision_backward_einsum(spec, hidden, table)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _low_precision_backward_einsum(spec, x, w):
    return jnp.einsum(spec, x, w, preferred_element_type=jnp.float32)


def _lpb_fwd(spec, x, w):
    return _low_precision_backward_einsum(spec, x, w), (x, w)


def _lpb_bwd(spec, residuals, g):
    x, w = residuals
    g = g.astype(x.dtype)
    (dx,) = jax.linear_transpose(lambda x_: jnp.einsum(spec, x_, w), x)(g)
    (dw,) = jax.linear_transpose(lambda w_: jnp.einsum(spec, x, w_), w)(g)
    return dx, dw


_low_precision_backward_einsum.defvjp(_lpb_fwd, _lpb_bwd)
