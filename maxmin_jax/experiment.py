"""The end-to-end experiment on a synthetic world with known group rewards (DESIGN.md section 5):

SFT of a small GPT-2 on the world's reviews -> EM mixture of K reward models (and the pooled single reward) ->
PPO from the same SFT start for each objective -> per-group evaluation with the true rewards -> report.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from maxmin_jax.data.batching import tokenize_pairs, tokenize_prompts
from maxmin_jax.data.synthetic import ReviewWorld
from maxmin_jax.eval import evaluate_policy, summarize
from maxmin_jax.models import GPT2Config, build_model
from maxmin_jax.policy.model import PolicyWithValue
from maxmin_jax.policy.objectives import RewardStandardizer, make_objective
from maxmin_jax.policy.ppo import PPOConfig
from maxmin_jax.policy.sft import SFTConfig, texts_to_batch, train_sft
from maxmin_jax.policy.trainer import PPOTrainer, RolloutConfig
from maxmin_jax.rewards.em import (EMConfig, MStepConfig, split_heldout, clustering_metrics, evaluate_pairs, fit_em,
                                   fit_single_reward)
from maxmin_jax.rewards.model import RewardModel


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelSize:
    """The small GPT-2 trained from scratch on the world's reviews."""

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    max_position_embeddings: int = 64


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExperimentConfig:
    """Every setting of the review-world experiment; `configs/demo.yaml` holds the defaults."""

    world: ReviewWorld = ReviewWorld()
    """The synthetic world (group ratio, users, pairs per user, label noise)."""
    model: ModelSize = ModelSize()
    sft_examples: int = 4096
    """Reviews sampled for SFT."""
    sft: SFTConfig = SFTConfig()
    em: EMConfig = EMConfig(num_groups=2, rounds=4, steps_per_round=80, batch_size=64,
                            m_step=MStepConfig(learning_rate=1e-3))
    """EM over users for the K-group mixture."""
    single_reward_steps: int = 240
    """Optimiser steps of the pooled single reward model (the standard-RLHF baseline)."""
    objectives: tuple[str, ...] = ("single", "utilitarian", "maxmin")
    """Policies to train, each from the same SFT start."""
    softmin_temperature: float = 0.5
    dro_step_size: float = 0.5
    ppo: PPOConfig = PPOConfig(learning_rate=1e-3, init_kl_coef=0.02, minibatches=2, epochs=2)
    rollout: RolloutConfig = RolloutConfig(max_new_tokens=32)
    iterations: int = 40
    """PPO iterations per objective."""
    prompt_batch: int = 64
    """Prompts per PPO iteration."""
    standardizer_prompts: int = 512
    """Reference samples used to standardise each reward head."""
    eval_prompts: int = 512
    """Prompts used to evaluate every policy."""
    seed: int = 0


def _clone(module):
    return nnx.clone(module)


def _group_of_cluster(assignments: np.ndarray, user_groups: list[str], num_clusters: int) -> list[str]:
    """Name each EM cluster after the true group most of its users belong to (reporting only)."""
    names = []
    for k in range(num_clusters):
        members = [g for a, g in zip(assignments, user_groups) if a == k]
        names.append(max(set(members), key=members.count) if members else f"cluster{k}")
    return names


def run_experiment(cfg: ExperimentConfig, out_dir: str | Path | None = None, *, progress: bool = True) -> dict:
    t0 = time.perf_counter()
    world = cfg.world
    tokenizer = world.tokenizer()
    rng = np.random.default_rng(cfg.seed)
    key = jax.random.key(cfg.seed)
    log = (lambda msg: tqdm.write(msg)) if progress else (lambda msg: None)

    # 1. SFT: a small GPT-2 learns to write the world's reviews.
    model_cfg = GPT2Config(vocab_size=len(tokenizer), max_position_embeddings=cfg.model.max_position_embeddings,
                           hidden_size=cfg.model.hidden_size, num_layers=cfg.model.num_layers,
                           num_heads=cfg.model.num_heads)
    sft_ids, sft_mask = texts_to_batch(tokenizer, world.sample_reviews(cfg.sft_examples, rng))
    sft_model, sft_losses = train_sft(build_model(model_cfg, rngs=nnx.Rngs(cfg.seed)), sft_ids, sft_mask, cfg.sft,
                                      progress=progress)
    log(f"SFT done: loss {sft_losses[0]:.3f} -> {sft_losses[-1]:.3f}")

    # 2. Rewards: EM mixture of K heads on the SFT backbone, and the pooled single reward.
    rows = world.preference_rows(rng)
    pairs = tokenize_pairs(tokenizer, rows)
    train_pairs, held_pairs = split_heldout(pairs, 0.2, rng)
    mixture = RewardModel.from_backbone(_clone(sft_model), cfg.em.num_groups, nnx.Rngs(cfg.seed + 1))
    em = fit_em(mixture, train_pairs, dataclasses.replace(cfg.em, progress=progress))
    user_groups = list(train_pairs.groups)
    em_metrics = clustering_metrics(em.assignments, user_groups)
    cluster_names = _group_of_cluster(em.assignments, user_groups, cfg.em.num_groups)
    single = RewardModel.from_backbone(_clone(sft_model), 1, nnx.Rngs(cfg.seed + 2))
    single_fit = fit_single_reward(single, train_pairs, steps=cfg.single_reward_steps, batch_size=cfg.em.batch_size,
                                   m_step_config=cfg.em.m_step, seed=cfg.seed, progress=progress)
    heldout = {"mixture": evaluate_pairs(em, held_pairs), "single": evaluate_pairs(single_fit, held_pairs)}
    log(f"EM done: ARI {em_metrics['ari']:.3f}, weights {np.round(em.weights, 3).tolist()}, clusters {cluster_names}")

    # 3. Standardise every head against the reference (= SFT) policy's samples.
    rollout = dataclasses.replace(cfg.rollout, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id)
    prompts_for = lambda n: tokenize_prompts(tokenizer, world.prompts(n, rng))  # noqa: E731
    std_prompts, std_mask = prompts_for(cfg.standardizer_prompts)
    standardizers = {}
    for name, reward_model in (("mixture", mixture), ("single", single)):
        samples = evaluate_policy(sft_model, sft_model, reward_model, std_prompts, std_mask, rollout=rollout,
                                  key=jax.random.fold_in(key, 1))
        standardizers[name] = RewardStandardizer.fit(samples["learned_reward"])

    # 4. PPO per objective from the same SFT start.
    eval_prompts, eval_mask = prompts_for(cfg.eval_prompts)
    group_names = list(world.group_names)
    evaluate = lambda m: evaluate_policy(m, sft_model, mixture, eval_prompts, eval_mask, rollout=rollout,  # noqa
                                         key=jax.random.fold_in(key, 2), true_reward_fn=world.true_rewards_ids)
    reference_samples = evaluate(sft_model)
    policies: dict[str, Any] = {"reference": summarize(reference_samples, group_names=group_names,
                                                       reference=reference_samples)}
    curves: dict[str, list[dict]] = {}
    for objective_name in cfg.objectives:
        kwargs = {"utilitarian": {"weights": tuple(float(w) for w in em.weights)},
                  "softmin": {"temperature": cfg.softmin_temperature},
                  "dro": {"step_size": cfg.dro_step_size}}.get(objective_name, {})
        reward_model, standardizer = (single, standardizers["single"]) if objective_name == "single" else (
            mixture, standardizers["mixture"])
        trainer = PPOTrainer(PolicyWithValue(_clone(sft_model)), reward_model, make_objective(objective_name, **kwargs),
                             standardizer, reference=sft_model, ppo=cfg.ppo, rollout=rollout)
        state = trainer.init_state()
        curve = []
        for it in tqdm(range(cfg.iterations), desc=f"PPO {objective_name}", disable=not progress, leave=False):
            prompts, mask = prompts_for(cfg.prompt_batch)
            state, metrics = trainer.step(state, prompts, mask, jax.random.fold_in(key, 1000 + it))
            curve.append(metrics)
        curves[objective_name] = [_to_python(m) for m in jax.device_get(curve)]
        samples = evaluate(trainer.policy(state).lm)
        policies[objective_name] = summarize(samples, group_names=group_names, reference=reference_samples)
        policies[objective_name]["examples"] = tokenizer.batch_decode(samples["tokens"][:3], skip_special_tokens=True)
        log(f"{objective_name}: true group reward {policies[objective_name]['group_reward']}, "
            f"KL {policies[objective_name]['kl']:.2f}")

    report = {
        "groups": group_names,
        "group_sizes": dict(zip(group_names, world.group_sizes)),
        "em": {**em_metrics, "weights": em.weights.tolist(), "cluster_groups": cluster_names,
               "history": em.history, "heldout": heldout},
        "policies": policies,
        "curves": curves,
        "sft_loss": [sft_losses[0], sft_losses[-1]],
        "config": _to_python(dataclasses.asdict(cfg)),
        "seconds": time.perf_counter() - t0,
        "devices": [str(d) for d in jax.devices()],
    }
    if out_dir is not None:
        from maxmin_jax.report import write_report

        write_report(report, out_dir)
    return report


def _to_python(tree):
    def leaf(x):
        if isinstance(x, (np.ndarray, jax.Array)):
            x = np.asarray(x)
            return x.item() if x.ndim == 0 else x.tolist()
        if isinstance(x, (np.floating, np.integer)):
            return x.item()
        return x
    return jax.tree.map(leaf, tree)
