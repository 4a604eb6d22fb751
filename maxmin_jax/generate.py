"""Sampling with a preallocated KV cache: one jitted prefill, then a `lax.while_loop` decode on the device.

Prompts are left padded to a length bucket, so a new prompt length reuses a compiled program; the loop stops as
soon as every row has produced EOS. The block weights are sliced into per-layer arrays once per call, before the
prefill, and every step runs the layers unrolled over them: scanning the stacked weights inside the loop would copy
each layer's slices on every step, which measured 1.7x slower on a GPU and ~25% slower on CPU (docs/decisions.md,
"One decode path"). The price is one copy of the block weights (in the compute dtype) while sampling runs.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from maxmin_jax.data.batching import bucket_length
from maxmin_jax.models.layers import positions_from_mask
from maxmin_jax.models.transformer import CausalLM


class SamplingConfig(NamedTuple):
    """Static sampling settings (each distinct value compiles once)."""

    greedy: bool
    top_k: int | None
    use_top_p: bool


def sampling_config(temperature: float, top_k: int | None, top_p: float | None) -> SamplingConfig:
    return SamplingConfig(greedy=temperature == 0, top_k=top_k, use_top_p=top_p is not None)


def eos_array(eos_token_id: int | Sequence[int] | None) -> jax.Array:
    """EOS ids as an array; -1 (never sampled) when there is none."""
    if eos_token_id is None:
        return jnp.asarray([-1], jnp.int32)
    return jnp.asarray([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), jnp.int32)


def filter_logits(logits: Float[Array, "b v"], top_k: int | None, top_p: Float[Array, ""] | None):
    """Mask logits outside the top-k set and outside the smallest nucleus of mass top_p (always keeps the best)."""
    neg = jnp.finfo(logits.dtype).min
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if top_p is not None:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        # The smallest logit still inside the nucleus: everything below it is dropped.
        cutoff = jnp.min(jnp.where(mass_before < top_p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, neg, logits)
    return logits


def _sample(logits, key, temperature, top_p, cfg: SamplingConfig):
    """Next token and its log-probability under the (temperature-scaled, unfiltered) model distribution."""
    if cfg.greedy:
        token = jnp.argmax(logits, axis=-1)
        scaled = logits
    else:
        scaled = logits / temperature
        filtered = filter_logits(scaled, cfg.top_k, top_p if cfg.use_top_p else None)
        token = jax.random.categorical(key, filtered, axis=-1)
    logprob = jnp.take_along_axis(jax.nn.log_softmax(scaled, axis=-1), token[:, None], axis=-1)[:, 0]
    return token.astype(jnp.int32), logprob


class Rollout(NamedTuple):
    """Sampled continuations: tokens [B, N] (pad after EOS), their log-probs, and the response mask (1 up to and
    including the first EOS)."""

    tokens: jax.Array
    logprobs: jax.Array
    mask: jax.Array


def sample_continuations(model: CausalLM, input_ids, attention_mask, rng, *, max_new_tokens: int,
                         cfg: SamplingConfig, temperature=1.0, top_p=1.0, eos_ids=None, pad_token_id=0) -> Rollout:
    """Traceable core of `generate` (call it inside jit): prefill the cache, then decode in a `lax.while_loop`."""
    b, t = input_ids.shape
    eos_ids = jnp.asarray([-1] if eos_ids is None else eos_ids, jnp.int32)
    cache = model.init_cache(b, t + max_new_tokens)
    layers = model.unstack_layers()  # sliced once per call, outside the loop (see the module docstring)
    key_valid = jnp.concatenate([attention_mask.astype(bool), jnp.ones((b, max_new_tokens), bool)], axis=1)
    hidden, cache = model.forward(input_ids, attention_mask, positions=positions_from_mask(attention_mask),
                                  cache=cache, cache_index=0, layer_params=layers)
    next_position = attention_mask.sum(-1).astype(jnp.int32)

    def emit(step, logits, tokens, logprobs, alive, done):
        token, logprob = _sample(logits, jax.random.fold_in(rng, step), temperature, top_p, cfg)
        token = jnp.where(done, pad_token_id, token)
        logprob = jnp.where(done, 0.0, logprob)
        alive = alive.at[:, step].set(~done)
        done = done | jnp.isin(token, eos_ids)
        return tokens.at[:, step].set(token), logprobs.at[:, step].set(logprob), alive, done, token

    tokens = jnp.full((b, max_new_tokens), pad_token_id, jnp.int32)
    logprobs = jnp.zeros((b, max_new_tokens), jnp.float32)
    alive = jnp.zeros((b, max_new_tokens), bool)
    first = emit(0, model.logits(hidden[:, -1:])[:, 0], tokens, logprobs, alive, jnp.zeros((b,), bool))

    def cond(carry):
        step, _, _, _, _, done, _ = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        step, cache, tokens, logprobs, alive, done, token = carry
        # The token sampled at step-1 sits in cache slot t+step-1; its logits give the token of this step.
        hidden, cache = model.forward(token[:, None], positions=(next_position + step - 1)[:, None], cache=cache,
                                      cache_index=t + step - 1, key_valid=key_valid, layer_params=layers)
        tokens, logprobs, alive, done, token = emit(step, model.logits(hidden)[:, 0], tokens, logprobs, alive, done)
        return step + 1, cache, tokens, logprobs, alive, done, token

    carry = (jnp.asarray(1, jnp.int32), cache, *first)
    _, _, tokens, logprobs, alive, _, _ = jax.lax.while_loop(cond, body, carry)
    return Rollout(tokens, logprobs, alive.astype(jnp.int32))


@partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "cfg"))
def _generate_jit(graphdef, state, input_ids, attention_mask, rng, temperature, top_p, eos_ids, pad_token_id,
                  *, max_new_tokens: int, cfg: SamplingConfig):
    rollout = sample_continuations(nnx.merge(graphdef, state), input_ids, attention_mask, rng,
                                   max_new_tokens=max_new_tokens, cfg=cfg, temperature=temperature, top_p=top_p,
                                   eos_ids=eos_ids, pad_token_id=pad_token_id)
    return rollout.tokens, rollout.logprobs


def generate(model: CausalLM, input_ids: Int[Array, "b t"], attention_mask: Int[Array, "b t"] | None = None, *,
             max_new_tokens: int, rng: jax.Array, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, eos_token_id: int | Sequence[int] | None = None, pad_token_id: int = 0,
             return_logprobs: bool = False, bucket_multiple: int = 16):
    """Sample `max_new_tokens` after left-padded prompts. Returns ids [B, T + max_new_tokens] (prompt, then new
    tokens, `pad_token_id` after EOS), and with `return_logprobs` also the log-probabilities [B, max_new_tokens] of
    the chosen tokens under the temperature-scaled model distribution (0 after EOS). temperature=0 is greedy."""
    input_ids = jnp.asarray(input_ids, jnp.int32)
    b, t = input_ids.shape
    attention_mask = jnp.ones_like(input_ids) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    limit = model.config.max_position_embeddings
    if t + max_new_tokens > limit:
        raise ValueError(f"prompt length {t} + max_new_tokens {max_new_tokens} exceeds the model's "
                         f"max_position_embeddings {limit}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and not 1 <= top_k <= model.config.vocab_size:
        raise ValueError(f"top_k must be in [1, vocab_size], got {top_k}")
    padded = bucket_length(t, multiple=bucket_multiple, minimum=bucket_multiple)
    pad = padded - t
    ids = jnp.pad(input_ids, ((0, 0), (pad, 0)), constant_values=pad_token_id)
    mask = jnp.pad(attention_mask, ((0, 0), (pad, 0)))
    cfg = sampling_config(temperature, top_k, top_p)
    graphdef, state = nnx.split(model)
    tokens, logprobs = _generate_jit(
        graphdef, state, ids, mask, rng, jnp.float32(temperature or 1.0), jnp.float32(top_p or 1.0),
        eos_array(eos_token_id), jnp.int32(pad_token_id), max_new_tokens=max_new_tokens, cfg=cfg)
    sequences = jnp.concatenate([input_ids, tokens], axis=1)
    return (sequences, logprobs) if return_logprobs else sequences
