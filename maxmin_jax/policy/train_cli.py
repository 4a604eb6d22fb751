"""`maxmin-jax train-policy`: PPO from an HF checkpoint on a reward mixture written by `fit-rewards`."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from maxmin_jax.data.batching import tokenize_prompts
from maxmin_jax.data.schema import DataError
from maxmin_jax.eval import evaluate_policy
from maxmin_jax.models.hf import load_pretrained, save_pretrained
from maxmin_jax.policy.model import PolicyWithValue
from maxmin_jax.policy.objectives import RewardStandardizer, make_objective
from maxmin_jax.policy.ppo import PPOConfig
from maxmin_jax.policy.trainer import PPOTrainer, RolloutConfig
from maxmin_jax.rewards.fit import load_reward_model


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per line (.txt), or rows with a 'prompt' field (.jsonl). Empty prompts are errors."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: prompts file not found")
    lines = path.read_text().splitlines()
    if path.suffix == ".jsonl":
        prompts = []
        for n, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            row = json.loads(line)
            if not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
                raise DataError(f"{path}: row {n}: field 'prompt': expected a non-empty string, got "
                                f"{row.get('prompt')!r}")
            prompts.append(row["prompt"])
    else:
        prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise DataError(f"{path}: no prompts")
    return prompts


def train_policy(*, model: str, rewards: str, prompts: str, objective: str, out: str, iterations: int = 20,
                 batch_size: int = 16, max_new_tokens: int = 32, learning_rate: float = 1e-5,
                 kl_coef: float = 0.05, seed: int = 0, lora_rank: int = 0) -> dict:
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
    rng = np.random.default_rng(seed)
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
    batch = lambda n: tokenize_prompts(tokenizer, list(rng.choice(texts, n)), max_length=limit)  # noqa: E731

    # Standardise each head on the starting policy's samples (it equals the reference at step 0).
    std_ids, std_mask = batch(4 * batch_size)
    samples = evaluate_policy(lm, reference or lm, reward_model, std_ids, std_mask, rollout=rollout,
                              key=jax.random.fold_in(key, 1), batch_size=batch_size)
    standardizer = RewardStandardizer.fit(samples["learned_reward"])
    ppo = PPOConfig(learning_rate=learning_rate, init_kl_coef=kl_coef, minibatches=2 if batch_size % 2 == 0 else 1)
    trainer = PPOTrainer(PolicyWithValue(lm), reward_model, make_objective(objective, **kwargs), standardizer,
                         reference=reference, ppo=ppo, rollout=rollout, lora=bool(lora_rank))
    state = trainer.init_state()
    curve = []
    for it in tqdm(range(iterations), desc=f"PPO {objective}"):
        ids, mask = batch(batch_size)
        state, metrics = trainer.step(state, ids, mask, jax.random.fold_in(key, 100 + it))
        curve.append(jax.device_get(metrics))
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    policy_lm = trainer.policy(state).lm
    if lora_rank:
        from maxmin_jax.models.lora import merge_lora

        policy_lm = merge_lora(policy_lm)
    save_pretrained(policy_lm, out_dir / "policy")
    tokenizer.save_pretrained(out_dir / "policy")
    curve_json = [{k: np.asarray(v).tolist() for k, v in m.items()} for m in curve]
    (out_dir / "metrics.json").write_text(json.dumps({"objective": objective, "curve": curve_json}, indent=2))
    print(f"final: score {curve_json[-1]['score']:.3f}, KL {curve_json[-1]['kl']:.3f}; wrote {out_dir / 'policy'}")
    return {"curve": curve_json}
