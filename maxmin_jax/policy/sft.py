"""Supervised fine-tuning of a causal LM on texts: the SFT starting point (and reference) of RLHF."""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from maxmin_jax import validate
from maxmin_jax.data.batching import minibatches
from maxmin_jax.models.transformer import CausalLM
from maxmin_jax.policy.ppo import masked_mean, token_logprobs


@dataclasses.dataclass(frozen=True, kw_only=True)
class SFTConfig:
    """Supervised fine-tuning: Adam with a cosine-decayed learning rate over shuffled minibatches."""

    steps: int = 300
    """Optimiser steps."""
    batch_size: int = 32
    """Sequences per step."""
    learning_rate: float = 3e-3
    """Peak Adam learning rate (cosine decay to 10%)."""
    seed: int = 0
    """Shuffling seed."""

    def __post_init__(self):
        validate.positive_int(self, "steps", "batch_size")
        validate.non_negative_int(self, "seed")
        validate.check_optimizer(self)


def lm_loss(model: CausalLM, ids, mask):
    """Mean next-token negative log-likelihood over real tokens (left padding ignored)."""
    logprobs = token_logprobs(model(ids[:, :-1], mask[:, :-1]), ids[:, 1:])
    return -masked_mean(logprobs, (mask[:, :-1] * mask[:, 1:]).astype(jnp.float32))


def _optimizer(config: SFTConfig) -> optax.GradientTransformation:
    return optax.adam(optax.cosine_decay_schedule(config.learning_rate, config.steps, alpha=0.1))


@partial(jax.jit, static_argnums=(0, 1), donate_argnums=(2, 3))
def _step(graphdef, config: SFTConfig, params, opt_state, rest, ids, mask):
    loss, grads = jax.value_and_grad(lambda p: lm_loss(nnx.merge(graphdef, p, rest), ids, mask))(params)
    updates, opt_state = _optimizer(config).update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def train_sft(model: CausalLM, ids: np.ndarray, mask: np.ndarray, config: SFTConfig = SFTConfig(), *,
              trainable: nnx.filterlib.Filter = nnx.Param, progress: bool = True) -> tuple[CausalLM, list[float]]:
    """Fit `model` (in place) to the left-padded token sequences; returns it and the loss curve. `trainable`
    selects what trains (`maxmin_jax.trainable`)."""
    graphdef, params, rest = nnx.split(model, trainable, ...)
    if not jax.tree.leaves(params):
        raise ValueError(f"the trainable filter {trainable!r} selects no variable of the model")
    params = jax.tree.map(jnp.copy, params)  # the step donates them; the model's own arrays stay valid meanwhile
    opt_state = _optimizer(config).init(params)
    rng = np.random.default_rng(config.seed)
    batches = _endless(len(ids), config.batch_size, rng)
    losses = []
    for _ in tqdm(range(config.steps), desc="SFT", disable=not progress, leave=False):
        idx = next(batches)
        params, opt_state, loss = _step(graphdef, config, params, opt_state, rest, ids[idx], mask[idx])
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
