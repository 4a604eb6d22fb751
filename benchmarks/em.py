"""CPU suite, EM's own costs on a zoo world (the outside report's sun/sea/short world, a one-layer GPT-2 over the
zoo's word tokenizer): E-step and M-step throughput in pairs/s, XLA compilations per fit, and the wall time of
a default `fit_em` from a cold start and again with everything compiled.
"""

from __future__ import annotations

import time

import jax
import numpy as np
from flax import nnx

from benchmarks.registry import Context, Figure, Result, register
from benchmarks.timing import jax_sync, measure
from maxmin_jax.data.batching import minibatches, tokenize_pairs
from maxmin_jax.data.zoo import sunsea_world
from maxmin_jax.models import GPT2Config
from maxmin_jax.rewards.em import EMConfig, fit_em
from maxmin_jax.rewards.scoring import clustering_metrics
from maxmin_jax.rewards.estep import PairChunks, chunk_log_likelihoods
from maxmin_jax.rewards.model import RewardModel
from maxmin_jax.rewards.mstep import MStepConfig, copy_tree, m_step, make_optimizer, minibatch


class CompileCounter:
    """Counts XLA backend compilations while active (jax.monitoring events)."""

    count = 0
    _installed = False

    @classmethod
    def install(cls):
        if not cls._installed:
            def listener(name, _duration, **_):
                if name.endswith("backend_compile_duration"):
                    cls.count += 1

            jax.monitoring.register_event_duration_secs_listener(listener)
            cls._installed = True
        return cls


def _world(quick: bool):
    world = sunsea_world(0, num_users=12, pairs_per_user=8) if quick else sunsea_world(0)
    tok = world.tokenizer()
    batch = tokenize_pairs(tok, world.preference_rows(), max_length=64)
    config = GPT2Config(vocab_size=len(tok), max_position_embeddings=64, hidden_size=32, num_layers=1, num_heads=4)
    return world, batch, config


@register("em_steps", suites=("cpu",), description="EM on a zoo world: E-step and M-step pairs/s (tiny GPT-2)")
def em_steps(ctx: Context) -> Result:
    world, batch, config = _world(ctx.quick)
    k = world.num_groups
    model = RewardModel.from_config(config, k, nnx.Rngs(0))
    split = nnx.split(model, nnx.Param, ...)
    chunk_size, batch_size, steps = 64, 32, (2 if ctx.quick else 20)
    chunks = PairChunks.from_batch(batch, chunk_size)
    e_timing = measure(jax_sync(lambda: chunk_log_likelihoods(split, chunks, k)),
                       repeats=ctx.repeats_at_least(5), warmup=ctx.warmup)

    graphdef, params, rest = split
    cfg = MStepConfig()
    state = {"params": copy_tree(params), "opt": make_optimizer(cfg).init(params)}
    gamma = np.full((batch.num_users, k), 1.0 / k, np.float32)
    rng = np.random.default_rng(0)
    order = [idx for _ in range(steps) for idx in minibatches(batch.num_pairs, batch_size, rng)][:steps]
    inputs = [minibatch(batch, gamma, idx) for idx in order]

    def m_steps():
        for pairs, weights in inputs:
            state["params"], state["opt"], metrics = m_step(graphdef, cfg, state["params"], rest, state["opt"],
                                                            pairs, weights)
        return state["params"], metrics

    m_timing = measure(jax_sync(m_steps), repeats=ctx.repeats_at_least(5), warmup=ctx.warmup)
    return Result(
        config={"world": world.describe(), "pairs": batch.num_pairs, "seq_len": int(batch.chosen_ids.shape[1]),
                "model": {"hidden_size": config.hidden_size, "num_layers": config.num_layers,
                          "vocab": config.vocab_size}, "K": k, "chunk_size": chunk_size, "batch_size": batch_size,
                "m_steps_timed": steps},
        figures=[Figure("E-step", batch.num_pairs / e_timing.median_s, "pairs/s", timing=e_timing),
                 Figure("M-step", steps * batch_size / m_timing.median_s, "pairs/s", timing=m_timing)],
        notes=["E-step: every pair scored by every head and summed by user (forward only); M-step: optimiser steps "
               "on the weighted BT loss (forward and backward), minibatches gathered on the host"])


@register("em_fit_zoo_world", suites=("cpu",),
          description="default fit_em on the sun/sea/short zoo world: wall time cold and compiled, compilations")
def em_fit_zoo_world(ctx: Context) -> Result:
    world, batch, config = _world(ctx.quick)
    counter = CompileCounter.install()
    em = EMConfig(num_groups=world.num_groups, progress=False, **({"rounds": 1, "init_restarts": 2}
                                                                 if ctx.quick else {}))
    runs = []
    for seed in (0, 1):  # the second fit has the same shapes: everything is compiled already
        before, start = counter.count, time.perf_counter()
        result = fit_em(RewardModel.from_config(config, world.num_groups, nnx.Rngs(seed)), batch,
                        EMConfig(**{**em.__dict__, "seed": seed}))
        runs.append((time.perf_counter() - start, counter.count - before, result))
    (cold_s, cold_compiles, first), (warm_s, warm_compiles, second) = runs
    return Result(
        config={"world": world.describe(), "users": batch.num_users, "pairs": batch.num_pairs,
                "em": {"init": em.init, "rounds": em.rounds, "epochs_per_round": em.epochs_per_round}},
        figures=[Figure("fit_em wall time, cold (compiling)", cold_s, "s"),
                 Figure("fit_em wall time, compiled", warm_s, "s")],
        extra={"compilations_cold": cold_compiles, "compilations_compiled": warm_compiles,
               "rounds": [len(first.history), len(second.history)],
               "ari": [clustering_metrics(r.assignments, batch.groups)["ari"] for r in (first, second)]})
