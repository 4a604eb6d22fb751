"""Pure building blocks shared by the model families: parameters with logical axes, norms, RoPE, attention.

Blocks are pure functions of a dict of one layer's arrays, so the same code runs under `lax.scan` over stacked
layers and in a plain Python loop (the unrolled debugging path).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

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
    """What attention needs besides the block's weights, shared by all layers of one forward pass."""

    positions: Int[Array, "b t"]  # token positions, counted from each row's first real token
    key_valid: Bool[Array, "b s"]  # which key slots hold real tokens
    query_slots: Int[Array, "t"]  # slot index of each query token (causality is by slot)
    cache_index: Int[Array, ""] | None  # where this call's tokens are written in the cache; None: no cache


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
              ctx: AttentionContext) -> Float[Array, "b t h d"]:
    """Causal grouped-query attention; MHA and MQA are the cases kv == h and kv == 1.

    Queries are grouped per key/value head instead of repeating k and v, so GQA reads each key once.
    """
    b, t, h, d = q.shape
    kv = k.shape[1]
    qg = q.reshape(b, t, kv, h // kv, d)
    scores = jnp.einsum("btkgd,bksd->bkgts", qg, k, preferred_element_type=jnp.float32) / jnp.sqrt(d).astype(
        jnp.float32)
    key_slots = jnp.arange(k.shape[2])
    allowed = (key_slots[None, :] <= ctx.query_slots[:, None])[None] & ctx.key_valid[:, None, :]  # [b, t, s]
    scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    # Output in the dot's natural [b, kv, g, t, d] order, transposed after: asked for [b, t, kv, g, d] directly,
    # XLA:CPU swaps the operands into a dot its fast kernels reject (and whose fallback lacks bf16 -> f32).
    out = jnp.einsum("bkgts,bksd->bkgtd", probs, v, preferred_element_type=jnp.float32)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d).astype(q.dtype)


def attend_with_cache(q, k_new: Float[Array, "b t kv d"], v_new: Float[Array, "b t kv d"], ctx: AttentionContext,
                      cache: KVCache | None, layer):
    """Attend over this call's keys, or write them into the cache at `ctx.cache_index` and attend over it."""
    k_new, v_new = k_new.swapaxes(1, 2), v_new.swapaxes(1, 2)  # [b, kv, t, d], the cache's layout
    if cache is None:
        return attention(q, k_new, v_new, ctx), None
    index = (layer, 0, 0, ctx.cache_index, 0)
    k_all = jax.lax.dynamic_update_slice(cache.k, k_new[None].astype(cache.k.dtype), index)
    v_all = jax.lax.dynamic_update_slice(cache.v, v_new[None].astype(cache.v.dtype), index)
    out = attention(q, k_all[layer], v_all[layer], ctx)
    return out, KVCache(k_all, v_all)


def dense(x, kernel, bias=None, *, contract: str = "...d,df->...f"):
    y = jnp.einsum(contract, x, kernel.astype(x.dtype))
    return y if bias is None else y + bias.astype(y.dtype)
