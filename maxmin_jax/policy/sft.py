"""Supervised fine-tuning of a causal LM on texts: the SFT starting point (and reference) of RLHF."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from maxmin_jax.data.batching import minibatches
from maxmin_jax.models.transformer import CausalLM
from maxmin_jax.policy.ppo import masked_mean, token_logprobs


@dataclasses.dataclass(frozen=True, kw_only=True)
class SFTConfig:
    steps: int = 300
    """Optimiser steps."""
    batch_size: int = 32
    """Sequences per step."""
    learning_rate: float = 3e-3
    """Peak Adam learning rate (cosine decay to 10%)."""
    seed: int = 0
    """Shuffling seed."""


def lm_loss(model: CausalLM, ids, mask):
    """Mean next-token negative log-likelihood over real tokens (left padding ignored)."""
    logprobs = token_logprobs(model(ids[:, :-1], mask[:, :-1]), ids[:, 1:])
    return -masked_mean(logprobs, (mask[:, :-1] * mask[:, 1:]).astype(jnp.float32))


def train_sft(model: CausalLM, ids: np.ndarray, mask: np.ndarray, config: SFTConfig = SFTConfig(), *,
              progress: bool = True) -> tuple[CausalLM, list[float]]:
    """Fit `model` (in place) to the left-padded token sequences; returns it and the loss curve."""
    tx = optax.adam(optax.cosine_decay_schedule(config.learning_rate, config.steps, alpha=0.1))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def step(params, opt_state, ids, mask):
        loss, grads = jax.value_and_grad(lambda p: lm_loss(nnx.merge(graphdef, p, rest), ids, mask))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state = tx.init(params)
    rng = np.random.default_rng(config.seed)
    batches = _endless(len(ids), config.batch_size, rng)
    losses = []
    for _ in tqdm(range(config.steps), desc="SFT", disable=not progress, leave=False):
        idx = next(batches)
        params, opt_state, loss = step(params, opt_state, ids[idx], mask[idx])
        losses.append(loss)
    nnx.update(model, params)
    return model, [float(x) for x in jax.device_get(losses)]


def _endless(n: int, batch_size: int, rng: np.random.Generator):
    while True:
        yield from minibatches(n, batch_size, rng)


def texts_to_batch(tokenizer, texts: Sequence[str], *, multiple: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Tokenise texts with EOS appended, left padded to a bucketed length."""
    from maxmin_jax.data.batching import tokenize_prompts

    eos = tokenizer.eos_token
    return tokenize_prompts(tokenizer, [f"{t} {eos}" for t in texts], multiple=multiple)
