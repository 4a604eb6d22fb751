"""The decoder trunk shared by GPT-2 and Llama: embed, run stacked blocks (scanned or unrolled), final norm, head.

Subclasses provide `_embed`, `_block` (a pure function of one layer's arrays), `_final_norm` and `logits`.
"""

from __future__ import annotations

from functools import partial
from typing import Literal, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh
from jaxtyping import Array, Float, Int

from maxmin_jax.models.attention import IMPLEMENTATIONS, AttentionImpl
from maxmin_jax.models.layers import AttentionContext, KVCache, Stack, positions_from_mask
from maxmin_jax.partitioning import constrain

HIDDEN_AXES = ("batch", None, None)  # [B, T, D] between blocks: split over the batch, whole along the embedding
KV_CACHE_AXES = ("layers", "batch", "kv_heads", None, None)  # logical axes of `kv_cache_shape`

RematPolicy = Literal["none", "full", "dots"]
_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    # Keep matmul outputs, recompute the cheap elementwise work: the usual memory/compute trade.
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class CausalLM(nnx.Module):
    """Base of the causal LMs. `layers` holds every block weight stacked on a leading layer axis.

    Precision: parameters are stored in `param_dtype` (default: `dtype`) and cast to the compute `dtype` where they
    are used; norms, RoPE, softmax and the logits are computed in float32 whatever `dtype` is (docs/decisions.md,
    "Mixed precision"). `attention_impl` picks the fused self-attention kernel (`maxmin_jax.models.attention`).
    `mesh`: the mesh the weights live on (given by `load_pretrained(mesh=)`, or by `shard_module` through
    `use_mesh`); training and scoring passes keep their hidden states split over its batch axes, and the splash
    kernel runs under `shard_map` on it. Calling the model runs a compiled program (one per input shape), also
    outside `jax.jit`."""

    layers: Stack

    def __init__(self, config, *, dtype=jnp.float32, param_dtype=None, scan_layers: bool = True,
                 remat: RematPolicy = "none", attention_impl: AttentionImpl = "auto", mesh: Mesh | None = None):
        if remat not in ("none", *_REMAT_POLICIES):
            raise ValueError(f"remat must be one of none/full/dots, got {remat!r}")
        if attention_impl not in IMPLEMENTATIONS:
            raise ValueError(f"attention_impl must be one of {IMPLEMENTATIONS}, got {attention_impl!r}")
        self.config = config
        self.dtype = jnp.dtype(dtype)
        self.param_dtype = jnp.dtype(param_dtype or dtype)
        self.scan_layers = scan_layers
        self.remat = remat
        self.attention_impl = attention_impl
        self.mesh = mesh

    # Family-specific pieces -------------------------------------------------------------------------------
    def _embed(self, input_ids, positions):
        raise NotImplementedError

    def _block(self, p, x, ctx: AttentionContext, cache: KVCache | None, layer):
        raise NotImplementedError

    def _final_norm(self, x):
        raise NotImplementedError

    def logits(self, hidden: Float[Array, "b t d"]) -> Float[Array, "b t v"]:
        raise NotImplementedError

    # Shared trunk ---------------------------------------------------------------------------------------------
    def use_mesh(self, mesh: Mesh | None) -> CausalLM:
        """Set the mesh the weights live on (in place; `shard_module` calls this after placing them)."""
        self.mesh = mesh
        return self

    def __call__(self, input_ids: Int[Array, "b t"], attention_mask: Int[Array, "b t"] | None = None,
                 *, use_lora: bool = True) -> Float[Array, "b t v"]:
        """Float32 logits [B, T, V]. `attention_mask` marks real tokens (left padding; None: all real)."""
        graphdef, state = nnx.split(self)
        return _compiled_logits(graphdef, state, input_ids, attention_mask, use_lora=use_lora)

    def hidden_states(self, input_ids, attention_mask=None, *, use_lora: bool = True) -> Float[Array, "b t d"]:
        """Final-norm hidden states: what the LM head, value heads and reward heads read."""
        hidden, _ = self.forward(input_ids, attention_mask, use_lora=use_lora)
        return hidden

    def forward(self, input_ids, attention_mask=None, *, positions=None, cache: KVCache | None = None,
                cache_index=None, key_valid=None, use_lora: bool = True,
                layer_params: Sequence[dict[str, jax.Array]] | None = None):
        """Run the trunk; returns (final-norm hidden states, cache).

        Without `key_valid`, the tokens attend to each other (causally, `attention_mask` marking real ones) and,
        given a `cache`, their keys and values are also written into it at `cache_index` (a prefill). With
        `key_valid` [B, S] (decoding), they are written at `cache_index` and attend to every cache slot it marks.
        `layer_params` (from `unstack_layers`) runs the blocks unrolled over those per-layer arrays instead of
        scanning the stacked weights (`use_lora` is then chosen by `unstack_layers`)."""
        b, t = input_ids.shape
        if positions is None:
            positions = (jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)) if attention_mask is None
                         else positions_from_mask(attention_mask))
        if cache is not None and cache_index is None:
            raise ValueError("a KV cache needs the cache_index its tokens are written at")
        if key_valid is not None and cache is None:
            raise ValueError("key_valid (attention over cache slots) needs a cache")
        valid = None if attention_mask is None else jnp.asarray(attention_mask).astype(bool)
        ctx = AttentionContext(positions, valid, key_valid, cache_index if cache is not None else None)
        block = self._block
        if self.remat != "none":
            block = jax.checkpoint(block, policy=_REMAT_POLICIES[self.remat])
        # On a sharded model, training and scoring passes keep hidden states split over the batch; sampling (with a
        # cache) is left to XLA, which keeps the weights in place and moves the one-token activations instead.
        pin = self.mesh if cache is None else None
        x = constrain(self._embed(input_ids, positions), pin, HIDDEN_AXES)
        if layer_params is None and self.scan_layers:
            def step(carry, xs):
                x, cache = carry
                p, layer = xs
                x, cache = block(p, x, ctx, cache, layer)
                return (constrain(x, pin, HIDDEN_AXES), cache), None

            layers = jnp.arange(self.config.num_layers)
            (x, cache), _ = jax.lax.scan(step, (x, cache), (self._stacked(use_lora), layers))
        else:
            for layer, p in enumerate(layer_params or self.unstack_layers(use_lora=use_lora)):
                x, cache = block(p, x, ctx, cache, layer)
                x = constrain(x, pin, HIDDEN_AXES)
        return self._final_norm(x), cache

    def _stacked(self, use_lora: bool) -> dict[str, jax.Array]:
        params = self.layers.arrays()
        return params if use_lora else {k: v for k, v in params.items() if "_lora_" not in k}

    def unstack_layers(self, *, use_lora: bool = True) -> list[dict[str, jax.Array]]:
        """One dict of arrays per block, sliced from the stacked weights: arrays with more than one axis per layer
        (the matrices, GPT-2's qkv bias) already in the compute dtype, as the blocks would cast them; per-layer
        vectors (norm scales, biases) as stored. Under jit: one copy of the block weights, which the decode loop
        reads on every step (docs/decisions.md, "One decode path")."""
        params = self._stacked(use_lora)
        cast = {k: v.ndim > 2 for k, v in params.items()}
        return [{k: v[layer].astype(self.dtype) if cast[k] else v[layer] for k, v in params.items()}
                for layer in range(self.config.num_layers)]

    def init_cache(self, batch: int, slots: int, dtype=None) -> KVCache:
        shape = kv_cache_shape(self.config, batch, slots)
        dtype = dtype or self.dtype
        return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

    def lora_project(self, p, name: str, x, spec: str):
        """`einsum(spec, x, p[name])`, plus the low-rank update when LoRA adapters for `name` are present (scaled
        by the `lora_scale` recorded on them by `maxmin_jax.models.lora.add_lora`)."""
        y = jnp.einsum(spec, x, p[name].astype(x.dtype))
        if f"{name}_lora_a" in p:
            lhs, w = spec.split("->")[0].split(",")
            out = spec.split("->")[1]
            contracted = "".join(c for c in w if c in lhs)
            produced = "".join(c for c in w if c not in lhs)
            batch = "".join(c for c in lhs if c not in w)
            scale = getattr(self.layers, f"{name}_lora_b").get_metadata()["lora_scale"]
            down = jnp.einsum(f"{lhs},{contracted}r->{batch}r", x, p[f"{name}_lora_a"].astype(x.dtype))
            y = y + scale * jnp.einsum(f"{batch}r,r{produced}->{out}", down, p[f"{name}_lora_b"].astype(x.dtype))
        return y


@partial(jax.jit, static_argnames=("graphdef", "use_lora"))
def _compiled_logits(graphdef, state, input_ids, attention_mask, *, use_lora: bool):
    model = nnx.merge(graphdef, state)
    return model.logits(model.hidden_states(input_ids, attention_mask, use_lora=use_lora))


def kv_cache_shape(config, batch: int, slots: int) -> tuple[int, ...]:
    """Shape of each of `init_cache`'s key and value arrays (the `KVCache` layout)."""
    return config.num_layers, batch, config.num_kv_heads, slots, config.dim_per_head
