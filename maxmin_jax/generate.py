"""Sampling with a preallocated KV cache: one jitted prefill, then a `lax.while_loop` decode on the device.

Prompts are left padded to a length bucket, so a new prompt length reuses a compiled program; the loop stops as
soon as every row has produced EOS. The block weights are sliced into per-layer arrays once per call, before the
prefill, and every step runs the layers unrolled over them: scanning the stacked weights inside the loop would copy
each layer's slices on every step, which measured 1.7x slower on a GPU and ~25% slower on CPU (docs/decisions.md,
"One decode path"). The price is one copy of the block weights (in the compute dtype) while sampling runs.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from maxmin_jax import validate
from maxmin_jax.data.batching import bucket_length
from maxmin_jax.models.layers import positions_from_mask
from maxmin_jax.models.transformer import CausalLM


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    """How responses are sampled, the one description used by `generate`, PPO rollouts and evaluation.

    Frozen and hashable, so a jitted step can take it as a static argument. Log-probabilities of sampled tokens are
    those of this distribution (`sampling_logits`), which is also what PPO's ratios and KL penalty are computed under.
    """

    max_new_tokens: int = 32
    """Response length budget in tokens, EOS included."""
    temperature: float = 1.0
    """Logits are divided by it before sampling; 0 is greedy decoding."""
    top_k: int | None = None
    """Sample only among the k most likely tokens (None: no restriction)."""
    top_p: float | None = None
    """Nucleus sampling: only the most likely tokens whose probabilities sum to top_p, in (0, 1] (None: all)."""
    eos_token_id: int | tuple[int, ...] | None = None
    """Token id(s) that end a response (None: responses run to max_new_tokens)."""
    pad_token_id: int = 0
    """Written after EOS."""

    def __post_init__(self):
        validate.positive_int(self, "max_new_tokens")
        validate.non_negative(self, "temperature")
        validate.positive_int(self, "top_k", optional=True)
        validate.probability(self, "top_p", optional=True)
        validate.non_negative_int(self, "pad_token_id")
        if isinstance(self.eos_token_id, list):  # keep the config hashable
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))


class StaticSampling(NamedTuple):
    """The parts of sampling that shape the compiled program (each distinct value compiles once).
    """

    greedy: bool
    top_k: int | None
    use_top_p: bool


def sampling_config(temperature: float, top_k: int | None, top_p: float | None) -> StaticSampling:
    return StaticSampling(greedy=temperature == 0, top_k=top_k, use_top_p=top_p is not None)


def eos_array(eos_token_id: int | Sequence[int] | None) -> jax.Array:
    """EOS ids as an array; -1 (never sampled) when there is none."""
    if eos_token_id is None:
        return jnp.asarray([-1], jnp.int32)
    return jnp.asarray([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), jnp.int32)


def filter_logits(logits: Float[Array, "b v"], top_k: int | None, top_p: Float[Array, ""] | float | None):
    """Mask logits outside the top-k set and outside the smallest nucleus of mass top_p (always keeps the best).

    The same sets as transformers' `TopKLogitsWarper` then `TopPLogitsWarper`: the nucleus keeps each token whose
    more likely tokens hold less than top_p of the (top-k renormalised) mass. Masked logits are the dtype's
    minimum, so their probability is exactly 0 and nothing is NaN."""
    neg = jnp.finfo(logits.dtype).min
    if top_k is not None:
        kth = jax.lax.stop_gradient(jax.lax.top_k(logits, top_k)[0][..., -1:])
        logits = jnp.where(logits < kth, neg, logits)
    if top_p is not None:
        ascending = jax.lax.stop_gradient(jnp.sort(logits, axis=-1))
        # A token goes when it and every less likely token hold at most 1 - top_p of the mass (top_p = 1 keeps
        # all); the most likely token always stays. Summed from the small end, as transformers does.
        drop = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1) <= 1 - top_p
        drop = drop.at[..., -1].set(False)
        cutoff = jnp.min(jnp.where(drop, jnp.inf, ascending), axis=-1, keepdims=True)  # the smallest kept logit
        logits = jnp.where(logits < cutoff, neg, logits)
    return logits


def sampling_logits(logits: Float[Array, "... v"], sampling: SamplingConfig) -> Float[Array, "... v"]:
    """Logits of the distribution `sampling` draws from (temperature, then top-k and top-p); their log-softmax
    gives the log-probability of a sampled token. Greedy decoding has no distribution: refused."""
    if sampling.temperature == 0:
        raise ValueError("greedy decoding (temperature 0) samples from no distribution; use temperature > 0")
    return filter_logits(logits.astype(jnp.float32) / sampling.temperature, sampling.top_k, sampling.top_p)


def reference_sampling_logits(reference_logits: Float[Array, "... v"], policy_sampling_logits: Float[Array, "... v"],
                              sampling: SamplingConfig) -> Float[Array, "... v"]:
    """The reference model's logits at the sampling temperature, restricted to the tokens the policy can sample
    (its top-k / top-p set, read from `policy_sampling_logits`). KL(policy's sampling distribution || this) is 0
    when the two models agree, and finite always: a token the policy samples is never outside the support."""
    scaled = reference_logits.astype(jnp.float32) / sampling.temperature
    if sampling.top_k is None and sampling.top_p is None:
        return scaled
    neg = jnp.finfo(jnp.float32).min
    return jnp.where(policy_sampling_logits > neg, scaled, neg)


def _sample(logits, key, temperature, top_p, cfg: StaticSampling):
    """Next token and its log-probability: under the sampled distribution (temperature-scaled, then top-k/top-p
    restricted and renormalised), or under the model's distribution for greedy decoding."""
    if cfg.greedy:
        token = jnp.argmax(logits, axis=-1)
        scaled = logits
    else:
        scaled = filter_logits(logits / temperature, cfg.top_k, top_p if cfg.use_top_p else None)
        token = jax.random.categorical(key, scaled, axis=-1)
    logprob = jnp.take_along_axis(jax.nn.log_softmax(scaled, axis=-1), token[:, None], axis=-1)[:, 0]
    return token.astype(jnp.int32), logprob


class Rollout(NamedTuple):
    """Sampled continuations: tokens [B, N] (pad after EOS), their log-probs, and the response mask (1 up to and
    including the first EOS)."""

    tokens: jax.Array
    logprobs: jax.Array
    mask: jax.Array


def sample_continuations(model: CausalLM, input_ids, attention_mask, rng, *, max_new_tokens: int,
                         cfg: StaticSampling, temperature=1.0, top_p=1.0, eos_ids=None, pad_token_id=0) -> Rollout:
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


def sample_responses(model: CausalLM, prompts, prompt_mask, key, sampling: SamplingConfig) -> Rollout:
    """Traceable (call it inside jit): one response per left-padded prompt, as `sampling` says."""
    return sample_continuations(
        model, prompts, prompt_mask, key, max_new_tokens=sampling.max_new_tokens,
        cfg=sampling_config(sampling.temperature, sampling.top_k, sampling.top_p),
        temperature=sampling.temperature or 1.0, top_p=sampling.top_p or 1.0,
        eos_ids=eos_array(sampling.eos_token_id), pad_token_id=sampling.pad_token_id)


@partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "cfg"))
def _generate_jit(graphdef, state, input_ids, attention_mask, rng, temperature, top_p, eos_ids, pad_token_id,
                  *, max_new_tokens: int, cfg: StaticSampling):
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
    the chosen tokens under the distribution sampled from (0 after EOS; see `SamplingConfig`). temperature=0 is
    greedy (log-probabilities then under the model's distribution)."""
    input_ids = jnp.asarray(input_ids, jnp.int32)
    b, t = input_ids.shape
    attention_mask = jnp.ones_like(input_ids) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
    limit = model.config.max_position_embeddings
    if t + max_new_tokens > limit:
        raise ValueError(f"prompt length {t} + max_new_tokens {max_new_tokens} exceeds the model's "
                         f"max_position_embeddings {limit}")
    validate.require(top_k is None or top_k <= model.config.vocab_size, sampling, "top_k",
                     f"expected an integer in [1, vocab_size={model.config.vocab_size}], got {top_k}")
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
