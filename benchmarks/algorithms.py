"""CPU suite, the policy algorithms beside PPO: a critic-free (GRPO) iteration against a PPO iteration on the same
batch of sequences (time and compiled memory), and the offline DPO step (pairs/s).

Random float32 weights and random token ids: the cost of these steps does not depend on what the weights are.
Each iteration program is compiled once with `.lower(...).compile()`, its memory read from XLA's analysis of that
executable, and the same executable is then timed.
"""

from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks.costs import model_cost
from benchmarks.registry import Context, Figure, Ratio, Result, register
from benchmarks.timing import jax_sync, measure, measure_interleaved
from maxmin_jax.data.batching import PairBatch
from maxmin_jax.generate import SamplingConfig
from maxmin_jax.models import GPT2Config, build_model
from maxmin_jax.policy.advantages import make_estimator
from maxmin_jax.policy.critic_free import CriticFreeConfig, CriticFreeTrainer
from maxmin_jax.policy.model import PolicyWithValue
from maxmin_jax.policy.objectives import RewardStandardizer, make_objective
from maxmin_jax.policy.offline import PreferenceTrainer, pair_group_weights, preference_pairs, with_reference_logprobs
from maxmin_jax.policy.ppo import PPOConfig
from maxmin_jax.policy.trainer import PPOTrainer
from maxmin_jax.rewards.model import RewardModel

MIB = 2**20


def _config(quick: bool) -> GPT2Config:
    return GPT2Config.tiny(vocab_size=256, max_position_embeddings=64) if quick else GPT2Config.gpt2()


def _memory(compiled) -> dict[str, float]:
    """Per-device MiB of a compiled program (donated outputs reuse their arguments' buffers, counted once)."""
    m = compiled.memory_analysis()
    out = {"argument": m.argument_size_in_bytes, "output": m.output_size_in_bytes, "alias": m.alias_size_in_bytes,
           "temp": m.temp_size_in_bytes}
    out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    return {k: v / MIB for k, v in out.items()}


class _Compiled:
    """A trainer's iteration compiled once for fixed shapes, called with a fresh key each time (state donated)."""

    def __init__(self, trainer, prompts, mask):
        self.state, self.frozen, self.prompts, self.mask = trainer.init_state(), trainer.frozen, prompts, mask
        self.compiled = trainer.lower(self.state, prompts, mask, jax.random.key(0)).compile()
        self.calls = 0

    def __call__(self):
        self.calls += 1
        self.state, metrics = self.compiled(self.state, self.frozen, self.prompts, self.mask,
                                            jax.random.key(self.calls))
        return metrics


@register("critic_free_iteration", suites=("cpu",),
          description="GRPO iteration vs PPO iteration on GPT-2 124M shapes, same sequences: time and compiled "
                      "memory")
def critic_free_iteration(ctx: Context) -> Result:
    cfg = _config(ctx.quick)
    sequences, group, prompt, new = (4, 2, 8, 4) if ctx.quick else (8, 4, 64, 48)
    epochs, minibatches = 2, 2
    sampling = SamplingConfig(max_new_tokens=new, eos_token_id=None, pad_token_id=0)  # no EOS: every token generated
    lm = build_model(cfg, rngs=nnx.Rngs(0))  # both trainers copy it into their state
    reference = build_model(cfg, rngs=nnx.Rngs(0))
    reward = RewardModel(build_model(cfg, rngs=nnx.Rngs(1)), 2, rngs=nnx.Rngs(2))
    objective, standardizer = make_objective("maxmin"), RewardStandardizer.identity(2)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (sequences, prompt)), jnp.int32)
    grouped = ids[: sequences // group]  # GRPO samples each of these `group` times: the same number of sequences

    ppo = PPOTrainer(PolicyWithValue(lm), reward, objective, standardizer, reference=reference,
                     ppo=PPOConfig(epochs=epochs, minibatches=minibatches), sampling=sampling)
    grpo = make_estimator("grpo", group_size=group)
    same_passes = CriticFreeTrainer(lm, reward, objective, standardizer, estimator=grpo, reference=reference,
                                    config=CriticFreeConfig(epochs=epochs, minibatches=minibatches), sampling=sampling)
    runs = {"PPO": _Compiled(ppo, ids, jnp.ones_like(ids)),
            "GRPO": _Compiled(same_passes, grouped, jnp.ones_like(grouped))}
    if not ctx.quick:  # the same program with another configuration: no code path of its own to exercise
        one_pass = CriticFreeTrainer(lm, reward, objective, standardizer, estimator=grpo, reference=reference,
                                     config=CriticFreeConfig(), sampling=sampling)
        runs["GRPO one pass"] = _Compiled(one_pass, grouped, jnp.ones_like(grouped))
    memory = {name: _memory(run.compiled) for name, run in runs.items()}
    t = measure_interleaved({name: jax_sync(run) for name, run in runs.items()}, repeats=ctx.repeats_at_least(3),
                            warmup=ctx.warmup)
    value_head = cfg.hidden_size + 1
    return Result(
        config={"model": "gpt2-124M" if not ctx.quick else "tiny", "sequences": sequences,
                "grpo": f"{sequences // group} prompts x G={group}", "prompt": prompt, "new_tokens": new,
                "epochs_x_minibatches": {"PPO": [epochs, minibatches], "GRPO": [epochs, minibatches],
                                         **({} if ctx.quick else {"GRPO one pass": [1, 1]})}, "K": 2},
        figures=[*[Figure(f"{name} iteration", t[name].median_s, "s", timing=t[name]) for name in runs],
                 *[Figure(f"{name} compiled memory (total)", memory[name]["total"], "MiB") for name in runs]],
        ratios=[Ratio.of_rates(f"{name} vs PPO iteration" + (" (same epochs x minibatches)" if name == "GRPO" else ""),
                               t[name], t["PPO"]) for name in runs if name != "PPO"],
        notes=["same number of sequences and tokens: PPO samples B prompts once, GRPO B/G prompts G times",
               "memory: XLA's analysis of the whole compiled iteration on one device (arguments = policy, Adam "
               "moments, reference, reward model, inputs; temp = everything else it holds at its peak)",
               f"PPO's value head shares the policy's trunk: {value_head} parameters; dropping it saves their "
               "Adam moments and the value pass, not a second network",
               "the critic-free passes apply the LM head to the response positions only, PPOTrainer's to every "
               "position (prompt included): part of the difference in time and temp memory",
               "GRPO one pass (its default, epochs = minibatches = 1) skips the pass recording the sampling "
               "policy's log-probs and runs one update pass instead of epochs x minibatches, over the whole batch "
               "at once (so its update holds twice the activations of a half-batch minibatch)"],
        extra={"memory_mib": memory,
               "grpo_minus_ppo_total_mib": memory["GRPO"]["total"] - memory["PPO"]["total"],
               "grpo_minus_ppo_temp_mib": memory["GRPO"]["temp"] - memory["PPO"]["temp"]})


def _random_pairs(n: int, length: int, prompt: int, vocab: int) -> PairBatch:
    """Left-padded pairs sharing a prompt of `prompt` tokens, full length (no padding), responses that differ."""
    rng = np.random.default_rng(0)
    chosen = rng.integers(3, vocab, (n, length)).astype(np.int32)
    rejected = chosen.copy()
    shift = rng.integers(1, vocab - 3, (n, length - prompt))  # never a multiple of vocab - 3: every token differs
    rejected[:, prompt:] = (chosen[:, prompt:] - 3 + shift) % (vocab - 3) + 3
    mask = np.ones((n, length), np.int32)
    return PairBatch(chosen, mask, rejected, mask.copy(), np.arange(n, dtype=np.int32),
                     tuple(f"u{i}" for i in range(n)))


@register("dpo_step", suites=("cpu",), description="offline DPO step (maxmin over K=2 groups) on GPT-2 124M "
                                                   "shapes: pairs/s, and the one-off reference pass")
def dpo_step(ctx: Context) -> Result:
    cfg = _config(ctx.quick)
    n, length, prompt = (4, 16, 8) if ctx.quick else (8, 128, 64)
    batch = _random_pairs(n, length, prompt, cfg.vocab_size)
    pairs = preference_pairs(batch, pair_group_weights(batch.user_index, assignments=np.arange(n) % 2))
    policy = build_model(cfg, rngs=nnx.Rngs(0))
    reference = build_model(cfg, rngs=nnx.Rngs(0))
    reference_pass = jax_sync(lambda: with_reference_logprobs(reference, pairs, batch_size=n).ref_chosen)
    t_ref = measure(reference_pass, repeats=ctx.repeats_at_least(3), warmup=ctx.warmup)
    pairs = with_reference_logprobs(reference, pairs, batch_size=n)
    trainer = PreferenceTrainer(policy, make_objective("maxmin"), pairs.group_shares())
    holder = {"state": trainer.init_state()}
    device_pairs = jax.tree.map(jnp.asarray, pairs)
    compiled = trainer.lower(holder["state"], device_pairs).compile()

    def step():
        holder["state"], metrics = compiled(holder["state"], trainer.frozen, device_pairs)
        return metrics

    t = measure(jax_sync(step), repeats=ctx.repeats_at_least(5), warmup=ctx.warmup)
    # Forward + backward (3 x forward) over chosen and rejected (2n sequences): the trunk and attention over every
    # position, the LM head over the response window only (plus the position predicting its first token).
    cost, window = model_cost(policy), pairs.response_window
    forward = (2.0 * (cost.params_matmul - cost.params_head) * 2 * n * length
               + 2.0 * cost.params_head * 2 * n * (window + 1) + cost.attention_flops(2 * n, length, length))
    flops = 3.0 * forward
    return Result(
        config={"model": "gpt2-124M" if not ctx.quick else "tiny", "pairs": n, "seq_len": length,
                "prompt": prompt, "response_window": window, "loss": trainer.config.loss, "objective": "maxmin",
                "K": 2},
        figures=[Figure("DPO step pairs/s", n / t.median_s, "pairs/s", timing=t),
                 Figure("DPO step GFLOP/s", flops / t.median_s / 1e9, "GFLOP/s",
                        ceiling=lambda c: c["matmul_f32"], ceiling_source="matmul_f32"),
                 Figure("reference pass pairs/s (once per data set)", n / t_ref.median_s, "pairs/s", timing=t_ref)],
        notes=["a step is one forward and backward of the policy over chosen and rejected (2 x pairs sequences); "
               "the reference log-probs are cached beforehand, so no reference model is resident while training",
               "GFLOP/s counts 3 x the forward's matmul and attention FLOPs (benchmarks/METHOD.md), the LM head "
               "over the response window only, as the step computes it"],
        extra={"memory_mib": _memory(compiled), "step_s": t.median_s})
