"""CPU suite, the RL hot paths: the E-step (K heads on one backbone vs one head vs K backbones), an EM round, and
one PPO iteration with rollout and update timed apart.

Random float32 weights and random token ids: the cost of these steps does not depend on what the weights are.
"""

from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks.registry import Context, Figure, Ratio, Result, register
from benchmarks.timing import jax_sync, measure, measure_interleaved
from maxmin_jax.data.batching import PairBatch
from maxmin_jax.generate import SamplingConfig, generate
from maxmin_jax.models import GPT2Config, build_model
from maxmin_jax.policy.advantages import make_estimator
from maxmin_jax.policy.critic_free import CriticFreeConfig, CriticFreeTrainer
from maxmin_jax.policy.model import PolicyWithValue
from maxmin_jax.policy.objectives import RewardStandardizer, make_objective
from maxmin_jax.policy.ppo import PPOConfig
from maxmin_jax.policy.trainer import PPOTrainer
from maxmin_jax.rewards.estep import log_likelihood_matrix
from maxmin_jax.rewards.model import RewardModel, SeparateRewardModels

ESTEP_TARGET = 1.2  # K-head E-step time / one-head time must stay at or below this (EM issue)


def _small_gpt2(quick: bool) -> GPT2Config:
    """GPT-2 shapes small enough to score thousands of pairs on a 2-core CPU in seconds."""
    if quick:
        return GPT2Config.tiny(vocab_size=256, max_position_embeddings=64)
    return GPT2Config(vocab_size=8192, max_position_embeddings=128, hidden_size=256, num_layers=4, num_heads=4)


def _pairs(num_users: int, pairs_per_user: int, length: int, vocab: int, seed: int = 0) -> PairBatch:
    rng = np.random.default_rng(seed)
    n = num_users * pairs_per_user
    ids = lambda: rng.integers(3, vocab, (n, length)).astype(np.int32)  # noqa: E731
    mask = np.ones((n, length), np.int32)
    return PairBatch(ids(), mask, ids(), mask.copy(), np.repeat(np.arange(num_users, dtype=np.int32),
                                                                  pairs_per_user),
                     tuple(f"u{i}" for i in range(num_users)))


@register("reward_estep", suites=("cpu",), description="E-step over N users: K heads on one backbone vs 1 head "
                                                       "vs K backbones")
def reward_estep(ctx: Context) -> Result:
    cfg = _small_gpt2(ctx.quick)
    users, per_user, length, k = (8, 4, 16, 2) if ctx.quick else (64, 16, 64, 4)
    batch = _pairs(users, per_user, length, cfg.vocab_size)
    backbone = lambda: build_model(cfg, rngs=nnx.Rngs(0))  # noqa: E731
    models = {"1 head": RewardModel(backbone(), 1, rngs=nnx.Rngs(1)),
              f"{k} heads": RewardModel(backbone(), k, rngs=nnx.Rngs(1)),
              f"{k} backbones": SeparateRewardModels([backbone() for _ in range(k)], rngs=nnx.Rngs(1))}
    fns = {name: jax_sync(lambda m=m: log_likelihood_matrix(m, batch)) for name, m in models.items()}
    t = measure_interleaved(fns, repeats=ctx.repeats_at_least(5), warmup=ctx.warmup)
    pairs_per_s = {name: batch.num_pairs / timing.median_s for name, timing in t.items()}
    heads_ratio = t[f"{k} heads"].median_s / t["1 head"].median_s
    return Result(
        config={"model": {"hidden_size": cfg.hidden_size, "num_layers": cfg.num_layers, "vocab": cfg.vocab_size},
                "users": users, "pairs_per_user": per_user, "seq_len": length, "K": k},
        figures=[Figure(f"E-step {name}", v, "pairs/s", timing=t[name]) for name, v in pairs_per_s.items()],
        ratios=[Ratio.of_rates(f"1 head vs {k} heads (time ratio K-heads/1-head = {heads_ratio:.3f}, "
                               f"target <= {ESTEP_TARGET})", t["1 head"], t[f"{k} heads"]),
                Ratio.of_rates(f"1 head vs {k} backbones", t["1 head"], t[f"{k} backbones"])],
        extra={"k_heads_over_one_head_time": heads_ratio,
               "k_backbones_over_one_head_time": t[f"{k} backbones"].median_s / t["1 head"].median_s,
               "meets_estep_target": bool(heads_ratio <= ESTEP_TARGET)})


@register("ppo_iteration", suites=("cpu",), description="one PPO iteration on GPT-2 124M shapes: rollout and "
                                                        "update tokens/s apart")
def ppo_iteration(ctx: Context) -> Result:
    cfg = GPT2Config.tiny(vocab_size=256, max_position_embeddings=64) if ctx.quick else GPT2Config.gpt2()
    batch, prompt, new = (4, 8, 4) if ctx.quick else (8, 64, 48)
    return iteration_benchmark(ctx, cfg, batch=batch, prompt=prompt, new=new, dtype=jnp.float32,
                               make_trainer=ppo_trainer)


def ppo_trainer(cfg, *, dtype, new: int, ppo: PPOConfig = PPOConfig(epochs=2, minibatches=2)):
    """The PPO trainer of the iteration benchmarks: maxmin over K = 2 reward heads, a frozen reference. The policy
    trains every weight, stored in float32 and computed in `dtype` (the mixed-precision policy); reference and
    reward model are frozen, stored and computed in `dtype`."""
    sampling = SamplingConfig(max_new_tokens=new, eos_token_id=None, pad_token_id=0)  # no EOS: every token generated
    lm = build_model(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=jnp.float32)
    reward = RewardModel(build_model(cfg, rngs=nnx.Rngs(1), dtype=dtype), 2, rngs=nnx.Rngs(2))
    trainer = PPOTrainer(PolicyWithValue(lm), reward, make_objective("maxmin"), RewardStandardizer.identity(2),
                         reference=build_model(cfg, rngs=nnx.Rngs(0), dtype=dtype), ppo=ppo, sampling=sampling)
    return trainer, {"trainer": "PPO (policy + value head, maxmin over 2 reward heads)", "epochs": ppo.epochs,
                     "minibatches": ppo.minibatches}


def grpo_trainer(cfg, *, dtype, new: int, group_size: int = 8, config: CriticFreeConfig = CriticFreeConfig()):
    """The critic-free trainer of the iteration benchmarks, built like `ppo_trainer` (maxmin over K = 2 reward heads,
    a frozen reference, every policy weight trained in float32 with `dtype` compute) but with GRPO's advantages over
    `group_size` samples of each prompt and no value head; by default GRPO's one on-policy pass."""
    sampling = SamplingConfig(max_new_tokens=new, eos_token_id=None, pad_token_id=0)  # no EOS: every token generated
    lm = build_model(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=jnp.float32)
    reward = RewardModel(build_model(cfg, rngs=nnx.Rngs(1), dtype=dtype), 2, rngs=nnx.Rngs(2))
    trainer = CriticFreeTrainer(lm, reward, make_objective("maxmin", lagged=True), RewardStandardizer.identity(2),
                                estimator=make_estimator("grpo", group_size=group_size),
                                reference=build_model(cfg, rngs=nnx.Rngs(0), dtype=dtype), config=config,
                                sampling=sampling)
    return trainer, {"trainer": f"GRPO (no value head, maxmin over 2 reward heads, G={group_size})",
                     "epochs": config.epochs, "minibatches": config.minibatches, "samples_per_prompt": group_size}


def iteration_benchmark(ctx: Context, cfg, *, batch: int, prompt: int, new: int, dtype, make_trainer) -> Result:
    """Time one jitted policy-optimisation iteration (rollout + scoring + update) and, apart, its rollout alone.

    `make_trainer(cfg, dtype=, new=) -> (trainer, config)`: any trainer with `init_state()`, `step(state, prompts,
    mask, key) -> (state, metrics)` and `policy(state)` (a causal LM, or a policy holding one as `.lm`), so PPO and
    the critic-free trainers time the same way. `batch` counts responses: a trainer that samples each prompt G
    times (`config["samples_per_prompt"]`) gets batch / G prompts."""
    trainer, trainer_config = make_trainer(cfg, dtype=dtype, new=new)
    group = trainer_config.get("samples_per_prompt", 1)
    if batch % group:
        raise ValueError(f"batch {batch} is not a multiple of the {group} samples per prompt")
    ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (batch // group, prompt)), jnp.int32)
    mask = jnp.ones_like(ids)
    holder = {"state": trainer.init_state(), "i": 0}

    def iteration():
        holder["i"] += 1
        holder["state"], metrics = trainer.step(holder["state"], ids, mask, jax.random.key(holder["i"]))
        return metrics

    # The rollout alone: the same sampler, shapes and settings the iteration runs first (every prompt repeated G
    # times, as the critic-free iteration does).
    rows, row_mask = jnp.repeat(ids, group, axis=0), jnp.repeat(mask, group, axis=0)
    lm = lambda: getattr(trainer.policy(holder["state"]), "lm", trainer.policy(holder["state"]))  # noqa: E731
    sample = lambda: generate(lm(), rows, row_mask, max_new_tokens=new,  # noqa: E731
                              rng=jax.random.key(0), return_logprobs=True)
    repeats = ctx.repeats_at_least(3)
    t_roll = measure(jax_sync(sample), repeats=repeats, warmup=ctx.warmup)
    t_iter = measure(jax_sync(iteration), repeats=repeats, warmup=ctx.warmup)
    update_s = max(t_iter.median_s - t_roll.median_s, 1e-9)
    # Tokens the update processes: every epoch runs forward + backward over all B x (prompt + new) positions,
    # after one scoring pass of policy, reference and reward model.
    epochs = trainer_config.get("epochs", 1)
    update_tokens = batch * (prompt + new) * epochs
    return Result(
        config={"model": {"model_type": cfg.model_type, "hidden_size": cfg.hidden_size,
                          "num_layers": cfg.num_layers, "vocab_size": cfg.vocab_size},
                "dtype": jnp.dtype(dtype).name, "batch": batch, "prompt": prompt, "new_tokens": new,
                **trainer_config},
        figures=[Figure("iteration tokens/s (prompt + response)", batch * (prompt + new) / t_iter.median_s, "tok/s",
                        timing=t_iter),
                 Figure("rollout new tokens/s", batch * new / t_roll.median_s, "tok/s", timing=t_roll),
                 Figure("update tokens/s (iteration - rollout)", update_tokens / update_s, "tok/s"),
                 Figure("iteration", t_iter.median_s, "s", timing=t_iter)],
        notes=["update time = median iteration time - median rollout time (the iteration runs the same rollout "
               "inside one jitted program); it includes scoring by policy, reference and the reward model"],
        extra={"rollout_s": t_roll.median_s, "update_s": update_s, "iteration_s": t_iter.median_s})
