"""Per-group evaluation of a policy: learned and (where the world knows them) true group rewards, KL to the
reference, response length. Sampling and scoring run in one jitted function, compiled once for all policies."""

from __future__ import annotations

from functools import partial
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from maxmin_jax.generate import SamplingConfig, reference_sampling_logits, sample_responses, sampling_logits
from maxmin_jax.models.transformer import CausalLM
from maxmin_jax.policy.ppo import token_logprobs

TrueRewardFn = Callable[[jax.Array, jax.Array], jax.Array]  # (response ids [B,N], mask [B,N]) -> [B, G]


@partial(jax.jit, static_argnames=("graphdefs", "sampling", "true_reward_fn"))
def _evaluate_batch(graphdefs, states, prompts, prompt_mask, key, *, sampling: SamplingConfig, true_reward_fn):
    policy_def, reference_def, reward_def = graphdefs
    policy: CausalLM = nnx.merge(policy_def, states[0])
    reference: CausalLM = nnx.merge(reference_def, states[1])
    t = prompts.shape[1]
    out = sample_responses(policy, prompts, prompt_mask, key, sampling)
    seq = jnp.concatenate([prompts, out.tokens], axis=1)
    seq_mask = jnp.concatenate([prompt_mask, out.mask], axis=1)
    mask = out.mask.astype(jnp.float32)
    # KL to the reference as the PPO penalty measures it (`reference_sampling_logits`); greedy decoding samples
    # from no distribution, so then the KL of the models' own distributions.
    logits, ref_logits = policy(seq, seq_mask)[:, t - 1:-1], reference(seq, seq_mask)[:, t - 1:-1]
    if sampling.temperature > 0:
        logits = sampling_logits(logits, sampling)
        ref_logits = reference_sampling_logits(ref_logits, logits, sampling)
    logprobs, ref_logprobs = token_logprobs(logits, out.tokens), token_logprobs(ref_logits, out.tokens)
    result = {"tokens": out.tokens, "mask": out.mask, "kl": jnp.sum((logprobs - ref_logprobs) * mask, axis=1),
              "length": mask.sum(1),
              "learned_reward": nnx.merge(reward_def, states[2])(seq, seq_mask).astype(jnp.float32)}
    if true_reward_fn is not None:
        result["true_reward"] = true_reward_fn(out.tokens, out.mask)
    return result


def evaluate_policy(policy: CausalLM, reference: CausalLM, reward_model: nnx.Module, prompts: np.ndarray,
                    prompt_mask: np.ndarray, *, sampling: SamplingConfig, key: jax.Array, batch_size: int = 64,
                    true_reward_fn: TrueRewardFn | None = None) -> dict[str, np.ndarray]:
    """Sample one response per prompt and score it. Returns per-sample arrays: learned_reward [N, K],
    true_reward [N, G] (if known), kl [N] (sampled estimate of KL(policy || reference)), length [N], tokens."""
    graphdefs, states = zip(*(nnx.split(m) for m in (policy, reference, reward_model)))
    n = len(prompts)
    if n % batch_size:
        raise ValueError(f"{n} evaluation prompts are not a multiple of the batch size {batch_size}")
    parts = [
        _evaluate_batch(graphdefs, states, prompts[i:i + batch_size], prompt_mask[i:i + batch_size],
                        jax.random.fold_in(key, i), sampling=sampling, true_reward_fn=true_reward_fn)
        for i in range(0, n, batch_size)]
    return {k: np.concatenate([np.asarray(p[k]) for p in parts]) for k in parts[0]}


def summarize(samples: dict[str, np.ndarray], *, group_names: list[str], reference: dict | None = None) -> dict:
    """Means per group. With `reference` (the reference policy's samples), rewards are standardised by the
    reference's mean and std per group, so the reference scores 0 and 1 is one reference standard deviation."""
    def per_group(values: np.ndarray, ref: np.ndarray | None, names: list[str]):
        mean = values.mean(0)
        if ref is not None:
            mean = (mean - ref.mean(0)) / np.maximum(ref.std(0), 1e-6)
        return {g: float(m) for g, m in zip(names, mean, strict=True)}

    summary = {"kl": float(samples["kl"].mean()), "response_length": float(samples["length"].mean())}
    if "true_reward" in samples:
        ref = reference["true_reward"] if reference else None
        summary["group_reward"] = per_group(samples["true_reward"], ref, group_names)
        summary["group_reward_raw"] = per_group(samples["true_reward"], None, group_names)
        summary["worst_group_reward"] = min(summary["group_reward"].values())
    learned_ref = reference["learned_reward"] if reference else None
    heads = [f"head{k}" for k in range(samples["learned_reward"].shape[1])]
    summary["learned_reward"] = per_group(samples["learned_reward"], learned_ref, heads)
    return summary
