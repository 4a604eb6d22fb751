"""`maxmin-jax train-policy`: PPO from an HF checkpoint on a reward mixture written by `fit-rewards`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from maxmin_jax.checkpoint import CheckpointManager
from maxmin_jax.data.batching import tokenize_prompts
from maxmin_jax.data.prompts import read_prompts
from maxmin_jax.eval import evaluate_policy
from maxmin_jax.models.hf import load_pretrained, save_pretrained
from maxmin_jax.policy.model import PolicyWithValue
from maxmin_jax.policy.objectives import RewardStandardizer, make_objective
from maxmin_jax.policy.ppo import PPOConfig
from maxmin_jax.policy.trainer import PPOTrainer, RolloutConfig
from maxmin_jax.rewards.fit import load_reward_model


def train_policy(*, model: str, rewards: str, prompts: str, objective: str, out: str, iterations: int = 20,
                 batch_size: int = 16, max_new_tokens: int = 32, learning_rate: float = 1e-5,
                 kl_coef: float = 0.05, seed: int = 0, lora_rank: int = 0, checkpoint_every: int = 1) -> dict:
    """Train, checkpointing the full PPO state to `out/checkpoints` every `checkpoint_every` iterations; a run
    started again with the same arguments resumes from its last checkpoint and ends where an uninterrupted run
    would (prompts of iteration i come from a generator seeded by (seed, i), keys from fold_in(key, i))."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    if tokenizer.pad_token is None:  # GPT-2 has none; pads are masked out anyway
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    reward_model = load_reward_model(Path(rewards) / "reward_model")
    history = json.loads((Path(rewards) / "em_history.json").read_text())
    weights = tuple(float(w) for w in history["weights"])
    if objective == "single" and reward_model.num_groups != 1:
        raise ValueError(f"objective 'single' needs a K=1 reward model (fit-rewards --num-groups 1); "
                         f"{rewards} has K={reward_model.num_groups}")
    kwargs = {"utilitarian": {"weights": weights}}.get(objective, {})
    texts = read_prompts(prompts)
    key = jax.random.key(seed)
    lm = load_pretrained(model)
    reference = None
    if lora_rank:
        from maxmin_jax.models.lora import add_lora

        add_lora(lm, rank=lora_rank, rngs=nnx.Rngs(seed))
    else:
        reference = load_pretrained(model)
    rollout = RolloutConfig(max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)
    limit = lm.config.max_position_embeddings - max_new_tokens

    def batch(n, rng):
        return tokenize_prompts(tokenizer, list(rng.choice(texts, n)), max_length=limit)

    # Standardise each head on the starting policy's samples (it equals the reference at step 0).
    std_ids, std_mask = batch(4 * batch_size, np.random.default_rng([seed, 2**31]))
    samples = evaluate_policy(lm, reference or lm, reward_model, std_ids, std_mask, rollout=rollout,
                              key=jax.random.fold_in(key, 1), batch_size=batch_size)
    standardizer = RewardStandardizer.fit(samples["learned_reward"])
    ppo = PPOConfig(learning_rate=learning_rate, init_kl_coef=kl_coef, minibatches=2 if batch_size % 2 == 0 else 1)
    trainer = PPOTrainer(PolicyWithValue(lm), reward_model, make_objective(objective, **kwargs), standardizer,
                         reference=reference, ppo=ppo, rollout=rollout, lora=bool(lora_rank))
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    fingerprint = {"model": lm.config.to_hf(), "rewards": str(Path(rewards).absolute()), "objective": objective,
                   "batch_size": batch_size, "max_new_tokens": max_new_tokens, "lora_rank": lora_rank,
                   "seed": seed, "ppo": dataclasses.asdict(ppo)}
    curve_path = out_dir / "metrics.json"
    with CheckpointManager(out_dir / "checkpoints", fingerprint=fingerprint, max_to_keep=2) as checkpoints:
        state = trainer.init_state()
        restored = checkpoints.restore_latest(state)
        curve = []
        if restored is not None:
            state = restored
            curve = json.loads(curve_path.read_text())["curve"][:int(state.step)] if curve_path.exists() else []
            print(f"resumed from iteration {int(state.step)} in {out_dir / 'checkpoints'}")
        for it in tqdm(range(int(state.step), iterations), desc=f"PPO {objective}"):
            ids, mask = batch(batch_size, np.random.default_rng([seed, it]))
            state, metrics = trainer.step(state, ids, mask, jax.random.fold_in(key, 100 + it))
            curve.append({k: np.asarray(v).tolist() for k, v in jax.device_get(metrics).items()})
            if (it + 1) % checkpoint_every == 0 or it + 1 == iterations:
                checkpoints.save(it + 1, state)
                curve_path.write_text(json.dumps({"objective": objective, "curve": curve}, indent=2))
        checkpoints.wait_until_finished()
    policy_lm = trainer.policy(state).lm
    if lora_rank:
        from maxmin_jax.models.lora import merge_lora

        policy_lm = merge_lora(policy_lm)
    save_pretrained(policy_lm, out_dir / "policy")
    tokenizer.save_pretrained(out_dir / "policy")
    print(f"final: score {curve[-1]['score']:.3f}, KL {curve[-1]['kl']:.3f}; wrote {out_dir / 'policy'}")
    return {"curve": curve}
