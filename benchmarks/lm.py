"""CPU suite: our forward pass and sampling against transformers' PyTorch models with the same weights.

Both sides run interleaved in one process, with PyTorch given every core (XLA's CPU client uses them all), on
random float32 weights and random prompt ids. Before timing, each benchmark checks that the two sides compute the
same thing (logit relative error; greedy token agreement), so a fast wrong path cannot pass for a fast one.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.costs import model_cost, sampling_floor_s
from benchmarks.hf_ref import hf_twin, set_torch_threads
from benchmarks.registry import Context, Figure, Ratio, Result, register
from benchmarks.timing import jax_sync, measure_interleaved, torch_sync
from maxmin_jax.generate import generate
from maxmin_jax.models import GPT2Config, LlamaConfig, build_model

FORWARD_TARGET = 1.3  # ours / transformers, GPT-2 124M forward at batch 8 x 128 (foundation issue)
SAMPLING_TARGET = 1.5  # ours / transformers generate, batch 8, 48 new tokens (foundation issue)


@dataclasses.dataclass(frozen=True)
class Shapes:
    batch: int
    seq: int  # forward sequence length
    prompt: int  # sampling prompt length
    new_tokens: int  # sampled tokens per row (no EOS: all are generated)


FULL = Shapes(batch=8, seq=128, prompt=64, new_tokens=48)
QUICK = Shapes(batch=2, seq=16, prompt=8, new_tokens=4)


def small_llama() -> LlamaConfig:
    """A small GQA Llama: 6 layers, hidden 512, 8 query heads sharing 2 key/value heads."""
    return LlamaConfig(vocab_size=32000, max_position_embeddings=1024, hidden_size=512, num_layers=6, num_heads=8,
                       num_kv_heads=2, intermediate_size=1408)


def _config(family: str, quick: bool):
    if family == "gpt2":
        return GPT2Config.tiny(vocab_size=512, max_position_embeddings=64) if quick else GPT2Config.gpt2()
    return LlamaConfig.tiny(vocab_size=512) if quick else small_llama()


def _describe(cfg) -> dict:
    return {"model_type": cfg.model_type, **dataclasses.asdict(cfg)}


def _pair(family: str, quick: bool):
    """Our model (float32, scanned layers: the defaults) and its transformers twin with the same weights."""
    model = build_model(_config(family, quick), rngs=nnx.Rngs(0), dtype=jnp.float32)
    return model, hf_twin(model)


def _inputs(batch: int, length: int, vocab: int, seed: int):
    """The same random ids, all real tokens, as (JAX ids, JAX mask, torch ids, torch mask)."""
    import torch

    ids = np.asarray(jax.random.randint(jax.random.key(seed), (batch, length), 0, vocab), np.int64)
    return (jnp.asarray(ids, jnp.int32), jnp.ones(ids.shape, jnp.int32), torch.from_numpy(ids),
            torch.ones(ids.shape, dtype=torch.int64))


def _forward(ctx: Context, family: str, target: float | None) -> Result:
    import torch

    threads = set_torch_threads()
    shapes = QUICK if ctx.quick else FULL
    model, hf = _pair(family, ctx.quick)
    cost = model_cost(model)
    j_ids, j_mask, t_ids, t_mask = _inputs(shapes.batch, shapes.seq, model.config.vocab_size, seed=1)
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, ids, mask: nnx.merge(graphdef, state)(ids, mask))
    with torch.no_grad():
        ours = np.asarray(forward(state, j_ids, j_mask))
        ref = hf(input_ids=t_ids, attention_mask=t_mask).logits.numpy()
        rel_err = float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))
        timings = measure_interleaved(
            {"jax": jax_sync(lambda: forward(state, j_ids, j_mask)),
             "hf": torch_sync(lambda: hf(input_ids=t_ids, attention_mask=t_mask).logits)},
            repeats=ctx.repeats, warmup=ctx.warmup)
    tokens = shapes.batch * shapes.seq
    flops = cost.forward_flops(shapes.batch, shapes.seq)

    def ceiling_tps(c):
        return c["matmul_f32"] * 1e9 * tokens / flops

    source = f"matmul_f32 / {flops / tokens / 1e9:.3f} GFLOP per token"
    figures = [Figure(f"{name} tokens/s", tokens / t.median_s, "tokens/s", ceiling_tps, source, t)
               for name, t in (("ours", timings["jax"]), ("transformers", timings["hf"]))]
    figures.append(Figure("ours GFLOP/s", flops / timings["jax"].median_s / 1e9, "GFLOP/s",
                          lambda c: c["matmul_f32"], "matmul_f32"))
    ratio = Ratio.of_rates("ours / transformers tokens/s", timings["jax"], timings["hf"], target=target)
    return Result(
        config={"model": _describe(model.config), "batch": shapes.batch, "seq": shapes.seq, "dtype": "float32",
                "scan_layers": model.scan_layers, "torch_threads": threads,
                "hf_attention": hf.config._attn_implementation},
        figures=figures, ratios=[ratio],
        extra={"logit_rel_err_vs_hf": rel_err, "flops_per_step": flops, "params_total": cost.params_total,
               "params_matmul": cost.params_matmul})


def _sample(ctx: Context, family: str, temperature: float, target: float | None) -> Result:
    import torch

    threads = set_torch_threads()
    s = QUICK if ctx.quick else FULL
    model, hf = _pair(family, ctx.quick)
    cost = model_cost(model)
    j_ids, j_mask, t_ids, t_mask = _inputs(s.batch, s.prompt, model.config.vocab_size, seed=2)
    key = jax.random.key(3)
    greedy = temperature == 0.0
    # transformers: no top-k / top-p filtering (its top_k would otherwise default on), no EOS before the end.
    hf_kwargs = dict(max_new_tokens=s.new_tokens, min_new_tokens=s.new_tokens, pad_token_id=0, do_sample=not greedy)
    if not greedy:
        hf_kwargs.update(temperature=temperature, top_k=0, top_p=1.0)

    def ours():
        return generate(model, j_ids, j_mask, max_new_tokens=s.new_tokens, rng=key, temperature=temperature)

    def theirs():
        return hf.generate(input_ids=t_ids, attention_mask=t_mask, **hf_kwargs)

    torch.manual_seed(0)
    with torch.no_grad():
        out_ours, out_hf = np.asarray(ours()), theirs().numpy()
        if out_ours.shape != out_hf.shape or out_ours.shape != (s.batch, s.prompt + s.new_tokens):
            raise RuntimeError(f"sampled shapes differ: ours {out_ours.shape}, transformers {out_hf.shape}")
        agreement = float((out_ours[:, s.prompt:] == out_hf[:, s.prompt:]).mean())
        timings = measure_interleaved({"jax": jax_sync(ours), "hf": torch_sync(theirs)},
                                      repeats=ctx.repeats, warmup=ctx.warmup)
    new = s.batch * s.new_tokens

    def floor(c):
        return sampling_floor_s(cost, batch=s.batch, prompt=s.prompt, new_tokens=s.new_tokens,
                                flops_per_s=c["matmul_f32"] * 1e9, bytes_per_s=c["read_bandwidth"] * 1e9)

    source = (f"prefill at matmul_f32 + {s.new_tokens - 1} decode steps at max(FLOPs/matmul_f32, "
              f"bytes/read_bandwidth), bytes = {cost.weight_bytes / 1e6:.0f} MB weights + KV cache")
    figures = [Figure(f"{name} new tokens/s", new / t.median_s, "tokens/s", lambda c: new / floor(c)["total_s"],
                      source, t)
               for name, t in (("ours", timings["jax"]), ("transformers", timings["hf"]))]
    ratio = Ratio.of_rates("ours / transformers new tokens/s", timings["jax"], timings["hf"], target=target)
    extra = {"weight_bytes_per_step": cost.weight_bytes,
             "floor_prefill_s": lambda c: floor(c)["prefill_s"], "floor_decode_s": lambda c: floor(c)["decode_s"],
             "decode_only_ceiling_tokens_per_s": lambda c: s.batch / floor(c)["weights_only_step_s"]}
    if greedy:
        extra["greedy_token_agreement_vs_hf"] = agreement
    return Result(
        config={"model": _describe(model.config), "batch": s.batch, "prompt": s.prompt,
                "new_tokens": s.new_tokens, "temperature": temperature, "dtype": "float32",
                "scan_layers": model.scan_layers, "torch_threads": threads, "hf_generate": hf_kwargs},
        figures=figures, ratios=[ratio], extra=extra,
        notes=["time per call includes the prefill; only new tokens are counted"])


@register("forward_gpt2", suites=("cpu",), description="GPT-2 124M forward, batch 8 x 128, vs transformers")
def forward_gpt2(ctx: Context) -> Result:
    return _forward(ctx, "gpt2", FORWARD_TARGET)


@register("forward_llama_small", suites=("cpu",),
          description="Llama 6 layers, hidden 512, GQA 8/2 heads, forward, batch 8 x 128, vs transformers")
def forward_llama_small(ctx: Context) -> Result:
    return _forward(ctx, "llama", None)


@register("sample_gpt2_greedy", suites=("cpu",),
          description="GPT-2 124M greedy sampling, 8 prompts of 64, 48 new tokens, vs transformers generate")
def sample_gpt2_greedy(ctx: Context) -> Result:
    return _sample(ctx, "gpt2", 0.0, SAMPLING_TARGET)


@register("sample_gpt2_temperature", suites=("cpu",),
          description="GPT-2 124M sampling at temperature 0.7, 8 prompts of 64, 48 new tokens, vs transformers")
def sample_gpt2_temperature(ctx: Context) -> Result:
    return _sample(ctx, "gpt2", 0.7, SAMPLING_TARGET)


@register("sample_llama_small_greedy", suites=("cpu",),
          description="small GQA Llama greedy sampling, 8 prompts of 64, 48 new tokens, vs transformers")
def sample_llama_small_greedy(ctx: Context) -> Result:
    return _sample(ctx, "llama", 0.0, None)
