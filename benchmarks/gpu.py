"""GPU suite: MFU of training steps, the memory-bandwidth utilisation of decoding, and the policy-optimisation
iteration, with random weights under the mixed-precision policy (bf16 compute; trained weights stored in float32).

- `train_gpt2_medium`: full-weight AdamW step of GPT-2 medium (355M), float32 parameters and optimiser state,
  bf16 compute; MFU = model FLOPs per step (METHOD.md) / step time / the bf16 matmul peak measured in the same run.
- `train_llama7b_lora`: LoRA step (rank 16 on q and v, AdamW on the float32 adapters only) of the Llama-2-7B
  shape, bf16 base weights. If the model and its activations do not fit, the layer count is halved until they do,
  and the result says so.
- `decode_llama7b`: sampling at batch 64 with the 7B shape; decode step time = (generate - prefill) / (new - 1);
  utilisation = (weights + KV cache bytes a step must read) / step time / measured copy bandwidth.
- `ppo_iteration_gpt2_medium`: one jitted PPO iteration (rollout, scoring, two epochs of updates) on GPT-2
  medium, batch 64 x (64 prompt + 64 new); tokens/s of the iteration, its rollout and its update.
- `grpo_iteration_gpt2_medium`: the critic-free (GRPO) iteration at the same batch of 64 responses (8 prompts x
  G = 8 samples), through the same `benchmarks.rl.iteration_benchmark`: no value head, one on-policy pass.

Each result records the attention kernel the step's self-attention ran (`cudnn` or `xla`). `--quick` runs the same
code on tiny configs (on CPU too), to exercise it; its figures mean nothing.
"""

from __future__ import annotations

import dataclasses
import gc
from functools import partial

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from benchmarks.costs import model_cost
from benchmarks.registry import Context, Figure, Result, register
from benchmarks.rl import grpo_trainer, iteration_benchmark, ppo_trainer
from benchmarks.timing import jax_sync, measure, measure_interleaved
from maxmin_jax.generate import generate
from maxmin_jax.models import GPT2Config, LlamaConfig, build_model
from maxmin_jax.models.attention import resolve_implementation
from maxmin_jax.models.layers import positions_from_mask
from maxmin_jax.policy.ppo import token_logprobs

DTYPE = jnp.bfloat16
# Full-size shapes. GPT-2 medium runs at 8 x 1024 (32k tokens a step: with flash attention its activations are a
# few GiB) and also at 4 x 1024, the shape of the first GPU figure; the 7B LoRA step at 4 x 512 needs about 45 GiB.
GPT2_MEDIUM_TRAIN = dict(batch=8, seq=1024)
GPT2_MEDIUM_TRAIN_ALSO = dict(batch=4, seq=1024)
LLAMA7B_LORA_TRAIN = dict(batch=4, seq=512, lora_rank=16)
LLAMA7B_DECODE = dict(batch=64, prompt=128, new_tokens=64)
GPT2_MEDIUM_PPO = dict(batch=64, prompt=64, new=64)
GPT2_MEDIUM_GRPO_GROUP = 8  # samples per prompt: 8 prompts x 8 = the PPO iteration's 64 responses


def _is_oom(error: Exception) -> bool:
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def _ids(batch: int, length: int, vocab: int, seed: int) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), (batch, length), 0, vocab, jnp.int32)


def _config_dict(cfg) -> dict:
    return {"model_type": cfg.model_type, **dataclasses.asdict(cfg)}


def attention_kernel(cfg, batch: int, seq: int, *, padded: bool) -> str:
    """The kernel the models' self-attention picks for these shapes in bf16 ("cudnn" or "xla"; on a GPU this is
    the cached answer of the compile probe the step itself ran). `padded`: the step passes an attention mask."""
    q = jax.ShapeDtypeStruct((batch, seq, cfg.num_heads, cfg.dim_per_head), DTYPE)
    k = jax.ShapeDtypeStruct((batch, seq, cfg.num_kv_heads, cfg.dim_per_head), DTYPE)
    return resolve_implementation("auto", q, k, padded=padded)


# Training steps ----------------------------------------------------------------------------------------------------
def make_train_step(model, trainable, tx):
    """A jitted step `(params, opt_state, frozen, ids) -> (params, opt_state, loss)`, donating params and
    optimiser state: next-token cross-entropy on `ids[:, :-1] -> ids[:, 1:]`, gradients w.r.t. the `trainable`
    filter only (`nnx.Param`: every weight; `nnx.LoRAParam`: the adapters)."""
    graphdef, params, frozen = nnx.split(model, trainable, ...)

    def loss_fn(params, frozen, ids):
        return -token_logprobs(nnx.merge(graphdef, params, frozen)(ids[:, :-1]), ids[:, 1:]).mean()

    @partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, frozen, ids):
        loss, grads = jax.value_and_grad(loss_fn)(params, frozen, ids)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step, params, frozen


def _train_once(ctx: Context, cfg, *, batch: int, seq: int, lora_rank: int | None) -> Result:
    # Mixed precision: what trains is stored in float32 (every weight here; under LoRA only the adapters, which
    # add_lora creates in float32), the frozen base in bf16.
    model = build_model(cfg, rngs=nnx.Rngs(0), dtype=DTYPE, param_dtype=DTYPE if lora_rank else jnp.float32)
    notes = []
    trainable = nnx.Param
    if lora_rank is not None:
        try:
            from maxmin_jax.models.lora import add_lora
        except ImportError:
            notes.append("maxmin_jax.models.lora is not available: ran a full-weight step instead of LoRA")
            lora_rank = None
        else:
            add_lora(model, rank=lora_rank, alpha=2 * lora_rank, rngs=nnx.Rngs(1))
            trainable = nnx.LoRAParam
    cost = model_cost(model)
    tx = optax.adamw(1e-5)
    step, params, frozen = make_train_step(model, trainable, tx)
    del model
    opt_state = tx.init(params)
    ids = _ids(batch, seq + 1, cfg.vocab_size, seed=4)
    state = {"params": params, "opt": opt_state}
    del params, opt_state

    def call():
        state["params"], state["opt"], loss = step(state["params"], state["opt"], frozen, ids)
        return state["params"], state["opt"], loss

    timing = measure(jax_sync(call), repeats=ctx.repeats_at_least(10), warmup=ctx.warmup)
    loss = float(call()[2])
    lora = lora_rank is not None
    flops = cost.train_flops(batch, seq, lora=lora)
    achieved = flops / timing.median_s / 1e12
    figures = [Figure("model TFLOP/s (MFU = % of ceiling)", achieved, "TFLOP/s", lambda c: c["matmul_bf16"],
                      "matmul_bf16", timing),
               Figure("tokens/s", batch * seq / timing.median_s, "tokens/s")]
    return Result(
        config={"model": _config_dict(cfg), "batch": batch, "seq": seq, "dtype": "bfloat16",
                "param_dtype": "bfloat16 base, float32 adapters" if lora else "float32",
                "step": f"LoRA rank {lora_rank} (q, v), AdamW on adapters" if lora else "full-weight AdamW",
                "remat": "none", "scan_layers": True, "attention": attention_kernel(cfg, batch, seq, padded=False)},
        figures=figures, notes=notes,
        extra={"mfu": lambda c: achieved / c["matmul_bf16"], "model_flops_per_step": flops,
               "params_total": cost.params_total, "params_matmul": cost.params_matmul,
               "lora_params": cost.lora_params, "final_loss": loss,
               "flop_method": "LoRA: 4N + 3 attention + 6 adapter params per token" if lora
               else "full: 6N + 3 attention per token (attention full square)"})


def _train(ctx: Context, cfg, *, batch: int, seq: int, lora_rank: int | None) -> Result:
    """`_train_once`, halving the layer count while the step does not fit in memory (noted in the result)."""
    layers = cfg.num_layers
    while True:
        try:
            result = _train_once(ctx, dataclasses.replace(cfg, num_layers=layers), batch=batch, seq=seq,
                                 lora_rank=lora_rank)
        except Exception as error:  # noqa: BLE001 - only out-of-memory is retried
            if not _is_oom(error) or layers <= 1:
                raise
            gc.collect()
            layers //= 2
            continue
        if layers != cfg.num_layers:
            result.notes.append(f"layer count reduced from {cfg.num_layers} to {layers}: the full model, its "
                                "optimiser state and activations did not fit in device memory")
        return result


@register("train_gpt2_medium", suites=("gpu",), description="GPT-2 medium full-weight train step, bf16: MFU")
def train_gpt2_medium(ctx: Context) -> Result:
    if ctx.quick:  # the second shape runs the same code: quick runs skip it
        return _train(ctx, GPT2Config.tiny(vocab_size=512), batch=2, seq=16, lora_rank=None)
    cfg, also = GPT2Config.gpt2_medium(), GPT2_MEDIUM_TRAIN_ALSO
    result = _train(ctx, cfg, lora_rank=None, **GPT2_MEDIUM_TRAIN)
    gc.collect()
    other = _train(ctx, cfg, lora_rank=None, **also)
    # The second shape's figures and MFU ride along, named by their shape.
    tag = f"{also['batch']} x {also['seq']}"
    result.figures += [dataclasses.replace(f, name=f"{f.name}, {tag}") for f in other.figures]
    result.extra[f"mfu_{also['batch']}x{also['seq']}"] = other.extra["mfu"]
    result.notes += [f"{tag}: {n}" for n in other.notes]
    return result


@register("train_llama7b_lora", suites=("gpu",), description="Llama-2-7B shape LoRA train step, bf16: MFU")
def train_llama7b_lora(ctx: Context) -> Result:
    if ctx.quick:
        return _train(ctx, LlamaConfig.tiny(vocab_size=512), batch=2, seq=16, lora_rank=4)
    return _train(ctx, LlamaConfig.llama2_7b(), **LLAMA7B_LORA_TRAIN)


# Decode bandwidth --------------------------------------------------------------------------------------------------
def _decode(ctx: Context, cfg, *, batch: int, prompt: int, new_tokens: int) -> Result:
    model = build_model(cfg, rngs=nnx.Rngs(0), dtype=DTYPE)
    cost = model_cost(model)
    ids = _ids(batch, prompt, cfg.vocab_size, seed=5)
    mask = jnp.ones_like(ids)
    key = jax.random.key(6)
    graphdef, state = nnx.split(model)

    @jax.jit
    def prefill(state, ids, mask):
        # What `generate` does before its decode loop: slice the block weights per layer, fill a cache of
        # prompt + new slots, logits of the last token.
        m = nnx.merge(graphdef, state)
        cache = m.init_cache(batch, prompt + new_tokens)
        hidden, cache = m.forward(ids, mask, positions=positions_from_mask(mask), cache=cache, cache_index=0,
                                  layer_params=m.unstack_layers())
        return m.logits(hidden[:, -1:]), cache

    if prompt % 16:
        raise ValueError("prompt must be a multiple of generate's bucket (16) so prefill matches generate's")
    timings = measure_interleaved(
        {"generate": jax_sync(lambda: generate(model, ids, mask, max_new_tokens=new_tokens, rng=key,
                                               temperature=1.0)),
         "prefill": jax_sync(lambda: prefill(state, ids, mask))},
        repeats=ctx.repeats_at_least(10), warmup=ctx.warmup)
    gen, pre = timings["generate"], timings["prefill"]
    step_s = (gen.median_s - pre.median_s) / (new_tokens - 1)
    notes = []
    if step_s <= 0:
        message = (f"generate ({gen.median_s:.4g} s) not slower than its prefill ({pre.median_s:.4g} s): timing "
                   "noise dominates")
        if not ctx.quick:
            raise RuntimeError(message + "; raise --repeats")
        step_s = gen.median_s / new_tokens  # quick runs exercise the code; their figures mean nothing
        notes.append(message + "; step time taken as generate / new tokens")
    mean_cached = prompt + new_tokens / 2  # keys a step must read, averaged over the decode steps
    required = cost.weight_bytes + cost.kv_bytes(batch, mean_cached)
    implemented = cost.weight_bytes + cost.kv_bytes(batch, prompt + new_tokens)  # ours reads every cache slot
    figures = [Figure("decode GB/s (required bytes / step time)", required / step_s / 1e9, "GB/s",
                      lambda c: c["copy_bandwidth"], "copy_bandwidth", gen),
               Figure("new tokens/s (whole generate call)", batch * new_tokens / gen.median_s, "tokens/s"),
               Figure("prefill ms", pre.median_s * 1e3, "ms", timing=pre),
               Figure("decode step ms", step_s * 1e3, "ms")]
    return Result(
        config={"model": _config_dict(cfg), "batch": batch, "prompt": prompt, "new_tokens": new_tokens,
                "dtype": "bfloat16", "sampling": "temperature 1.0, no top-k/top-p, no EOS",
                "prefill_attention": attention_kernel(cfg, batch, prompt, padded=True)},
        figures=figures, notes=notes,
        extra={"bandwidth_utilisation": lambda c: required / step_s / 1e9 / c["copy_bandwidth"],
               "bytes_per_step_required": required, "bytes_per_step_implemented": implemented,
               "weight_bytes": cost.weight_bytes, "kv_bytes_mean": cost.kv_bytes(batch, mean_cached),
               "implemented_utilisation": lambda c: implemented / step_s / 1e9 / c["copy_bandwidth"],
               "generate_s": gen.median_s, "prefill_s": pre.median_s})


@register("decode_llama7b", suites=("gpu",), description="Llama-2-7B shape decode at batch 64, bf16: bandwidth")
def decode_llama7b(ctx: Context) -> Result:
    if ctx.quick:
        return _decode(ctx, LlamaConfig.tiny(vocab_size=512), batch=4, prompt=16, new_tokens=4)
    return _decode(ctx, LlamaConfig.llama2_7b(), **LLAMA7B_DECODE)


# Policy-optimisation iteration ---------------------------------------------------------------------------------
@register("ppo_iteration_gpt2_medium", suites=("gpu",),
          description="one PPO iteration on GPT-2 medium, bf16: iteration, rollout and update tokens/s")
def ppo_iteration_gpt2_medium(ctx: Context) -> Result:
    cfg, shape = (GPT2Config.tiny(vocab_size=512), dict(batch=4, prompt=16, new=4)) if ctx.quick else (
        GPT2Config.gpt2_medium(), GPT2_MEDIUM_PPO)
    result = iteration_benchmark(ctx, cfg, dtype=DTYPE, make_trainer=ppo_trainer, **shape)
    result.config["attention"] = attention_kernel(cfg, shape["batch"], shape["prompt"] + shape["new"], padded=True)
    return result


@register("grpo_iteration_gpt2_medium", suites=("gpu",),
          description="one critic-free (GRPO) iteration on GPT-2 medium, bf16, at the PPO iteration's batch")
def grpo_iteration_gpt2_medium(ctx: Context) -> Result:
    cfg, shape, group = (GPT2Config.tiny(vocab_size=512), dict(batch=4, prompt=16, new=4), 2) if ctx.quick else (
        GPT2Config.gpt2_medium(), GPT2_MEDIUM_PPO, GPT2_MEDIUM_GRPO_GROUP)
    result = iteration_benchmark(ctx, cfg, dtype=DTYPE, make_trainer=partial(grpo_trainer, group_size=group),
                                 **shape)
    result.config["attention"] = attention_kernel(cfg, shape["batch"], shape["prompt"] + shape["new"], padded=True)
    return result
