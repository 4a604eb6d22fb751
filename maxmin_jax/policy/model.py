"""Policy with a scalar value head on the shared trunk (as TRL's AutoModelForCausalLMWithValueHead)."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from maxmin_jax.models.transformer import CausalLM
from maxmin_jax.trainable import HeadParam


class PolicyWithValue(nnx.Module):
    """`lm` is any of our causal LMs; the value head reads its final hidden states. Zero-initialised, so the
    first value estimates are 0 and the first advantages are the raw returns."""

    def __init__(self, lm: CausalLM):
        self.lm = lm
        self.value_head = HeadParam(jnp.zeros((lm.config.hidden_size,), jnp.float32), logical_axes=("embed",))
        self.value_bias = HeadParam(jnp.zeros((), jnp.float32), logical_axes=())

    def __call__(self, input_ids: Int[Array, "b t"], attention_mask: Int[Array, "b t"] | None = None, *,
                 use_lora: bool = True) -> tuple[Float[Array, "b t v"], Float[Array, "b t"]]:
        hidden = self.lm.hidden_states(input_ids, attention_mask, use_lora=use_lora)
        return self.lm.logits(hidden), self.values(hidden)

    def values(self, hidden: Float[Array, "b t d"]) -> Float[Array, "b t"]:
        """The value head on final hidden states (e.g. only the response positions'), in float32."""
        return jnp.einsum("btd,d->bt", hidden.astype(jnp.float32), self.value_head[...]) + self.value_bias[...]
