"""Per-device memory of the paper's two setups, planned ahead of time without allocating a single weight.

Everything is abstract: models are built with `nnx.eval_shape`, shardings come from the one logical-axis table
(`maxmin_jax.sharding`) on a target mesh of devices, and each step is compiled for that mesh with
`jax.jit(step, out_shardings=..., donate_argnums=...).lower(*abstract_args).compile()`, the input shardings riding
on the abstract arguments (`jax.ShapeDtypeStruct(..., sharding=...)`); XLA's `memory_analysis()` of the
partitioned program then gives the bytes one device needs. Three steps are planned:

- `train`: one PPO minibatch update of the policy (forward + backward of policy and value head on prompt +
  response tokens, clipped policy and value losses, global-norm clip + Adam), state donated, as in
  `maxmin_jax.policy.trainer`;
- `rollout`: the whole sampling program of a PPO iteration, `maxmin_jax.generate.sample_continuations` (prefill
  of the prompts into a KV cache created inside the program, then the `lax.while_loop` decode of the response);
- `decode`: one token of sampling for the whole batch with the preallocated KV cache (cache donated), the body of
  that loop on its own (slicing the block weights per layer itself, which the rollout does once per call);
- `reward`: one Bradley-Terry update of the K-head reward model on chosen/rejected pairs, as in the EM M-step.

Next to the compiled figures, `state` counts exactly (from shapes and shardings) the bytes per device of every
resident tensor: policy, Adam moments, reference model (absent under LoRA, where the reference is the base weights
with adapters off) and reward model. With `method="estimate"` nothing is compiled: train/decode/reward are then
arguments + outputs read from the shardings plus a stated formula for temporaries (see `_temp_estimate`).

Compiling on fake CPU devices plans the *partitioning* exactly (who holds which shard, what is gathered); the
temporaries are the CPU compiler's, whose fusion and buffer reuse differ from GPU/TPU, so treat `temp` as an
estimate of the accelerator's. Run `python -m maxmin_jax.memory_plan` (it asks XLA for 8 fake CPU devices).
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # before jax initialises its backend: fake CPU devices for the target mesh
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import dataclasses
import math
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from maxmin_jax.models import GPT2Config, LlamaConfig, ModelConfig, build_model
from maxmin_jax.generate import sample_continuations, sampling_config
from maxmin_jax.models.layers import KVCache
from maxmin_jax.models.lora import add_lora
from maxmin_jax.models.transformer import KV_CACHE_AXES, kv_cache_shape
from maxmin_jax.policy.model import PolicyWithValue
from maxmin_jax.policy.ppo import PPOConfig, policy_loss, token_logprobs, value_loss
from maxmin_jax.rewards.bt import bt_loss
from maxmin_jax.rewards.model import RewardModel, score_pairs
from maxmin_jax.sharding import (LOGICAL_RULES, batch_sharding, logical_to_spec, make_mesh, replicated, use_mesh,
                                state_shardings)
from maxmin_jax.trainable import trainable_filter


@dataclasses.dataclass(frozen=True, kw_only=True)
class PlanSetup:
    """One training configuration to plan for."""

    model: ModelConfig
    """Architecture of policy, reference and reward backbones."""
    dtype: Any = jnp.float32
    """Parameter and activation dtype of the backbones (reward heads and the value head stay float32)."""
    mesh_shape: tuple[int, int, int] = (1, 1, 1)
    """Default (data, fsdp, tensor) mesh the setup expects."""
    batch: int = 8
    """Sequences per train / decode step over the whole mesh (pairs for the reward step)."""
    prompt_length: int = 16
    """Prompt tokens (left padded)."""
    response_length: int = 16
    """Sampled response tokens."""
    policy_lora: tuple[int, float] | None = None
    """(rank, alpha) of the policy's LoRA adapters; None trains every weight."""
    reward_lora: tuple[int, float] | None = None
    """(rank, alpha) of the reward model's LoRA adapters; None trains every weight."""
    lora_targets: tuple[str, ...] | None = None
    """Adapted weights; None is the family default of `maxmin_jax.models.lora` (Llama: q, v; GPT-2: qkv)."""
    num_groups: int = 2
    """K reward heads (user groups)."""
    remat: str = "none"
    """Rematerialisation policy of the backbone blocks in the train and reward steps (none / full / dots)."""
    note: str = ""

    @property
    def seq_length(self) -> int:
        return self.prompt_length + self.response_length


SETUPS: dict[str, PlanSetup] = {
    # Tulu2-7B in bfloat16 with LoRA (policy r=16, reward r=8, alpha=32), FSDP over 8 devices, 2 sequences per
    # device of 256 prompt + 128 response tokens.
    "tulu2-7b": PlanSetup(model=LlamaConfig.tulu2_7b(), dtype=jnp.bfloat16, mesh_shape=(1, 8, 1), batch=16,
                          prompt_length=256, response_length=128, policy_lora=(16, 32.0), reward_lora=(8, 32.0),
                          note="LoRA policy r=16/alpha=32, reward r=8/alpha=32, bf16"),
    # GPT-2 (124M) on IMDB in float32, full fine-tuning, data=2 x fsdp=4, 8 sequences per device of 64 + 48.
    "gpt2": PlanSetup(model=GPT2Config.gpt2(), dtype=jnp.float32, mesh_shape=(2, 4, 1), batch=64, prompt_length=64,
                      response_length=48, note="full fine-tuning, fp32"),
    # For tests: compiles in seconds.
    "gpt2-tiny": PlanSetup(model=GPT2Config.tiny(), dtype=jnp.float32, mesh_shape=(1, 8, 1), batch=8, prompt_length=8,
                           response_length=8, note="test config"),
    "llama-tiny-lora": PlanSetup(model=LlamaConfig.tiny(), dtype=jnp.float32, mesh_shape=(1, 8, 1), batch=8,
                                 prompt_length=8, response_length=8, policy_lora=(4, 8.0), reward_lora=(2, 8.0),
                                 note="test config"),
}
STEPS = ("train", "rollout", "decode", "reward")
_TRAIN_TX = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-5))  # the trainer's optimiser shape


# Abstract modules -------------------------------------------------------------------------------------------------
def _backbone(setup: PlanSetup, lora: tuple[int, float] | None, rngs: nnx.Rngs):
    lm = build_model(setup.model, rngs=rngs, dtype=setup.dtype, remat=setup.remat)
    if lora is not None:
        add_lora(lm, rank=lora[0], alpha=lora[1], targets=setup.lora_targets, rngs=rngs)
    return lm


def abstract_policy(setup: PlanSetup, mesh=None) -> PolicyWithValue:
    policy = nnx.eval_shape(lambda: PolicyWithValue(_backbone(setup, setup.policy_lora, nnx.Rngs(0))))
    return use_mesh(policy, mesh)


def abstract_reward(setup: PlanSetup, mesh=None) -> RewardModel:
    reward = nnx.eval_shape(lambda: RewardModel(_backbone(setup, setup.reward_lora, nnx.Rngs(1)),
                                                setup.num_groups, rngs=nnx.Rngs(2)))
    return use_mesh(reward, mesh)


def _policy_trainable(setup: PlanSetup):
    return trainable_filter(lora=setup.policy_lora is not None)


def _reward_trainable(setup: PlanSetup):
    return trainable_filter(lora=setup.reward_lora is not None)


# Shardings and byte counts ----------------------------------------------------------------------------------------
def _placed(tree, shardings):
    """ShapeDtypeStructs carrying their shardings (jit reads in_shardings from them)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def _abstract_state(state: nnx.State, mesh) -> nnx.State:
    return _placed(state, state_shardings(state, mesh))


def _like_params(tree, params, mesh):
    """Shardings for an optimiser state: subtrees shaped like the parameters take the parameters' shardings."""
    structure = jax.tree.structure(params)
    param_shardings = jax.tree.map(lambda a: a.sharding, params)
    return jax.tree.map(lambda x: param_shardings if jax.tree.structure(x) == structure else replicated(mesh),
                        tree, is_leaf=lambda x: jax.tree.structure(x) == structure)


def _split_for_training(module: nnx.Module, trainable_filter, mesh):
    """(graphdef, trainable, rest, Adam state), every leaf an abstract array carrying its sharding on `mesh`."""
    graphdef, trainable, rest = nnx.split(module, trainable_filter, ...)
    trainable, rest = _abstract_state(trainable, mesh), _abstract_state(rest, mesh)
    opt_state = jax.eval_shape(_TRAIN_TX.init, trainable)
    return graphdef, trainable, rest, _placed(opt_state, _like_params(opt_state, trainable, mesh))


def _shardings(tree):
    return jax.tree.map(lambda a: a.sharding, tree)


def device_bytes(tree) -> int:
    """Bytes one device holds of a pytree of sharded ShapeDtypeStructs (the largest shard where uneven)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if getattr(leaf, "sharding", None) is not None else leaf.shape
        key = jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)
        total += math.prod(shape) * (8 if key else jnp.dtype(leaf.dtype).itemsize)  # a threefry key: 2 x uint32
    return total


def _count(tree) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def _batch_spec(mesh, *rest) -> NamedSharding:
    return NamedSharding(mesh, P(batch_sharding(mesh, 1).spec[0], *rest))


def _sds(shape, dtype, sharding) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


# The planned steps -----------------------------------------------------------------------------------------------
class Planned(NamedTuple):
    """A step to compile: the function, its abstract (sharded) arguments, donated positions and out shardings."""

    fn: Callable
    args: tuple
    donate: tuple[int, ...]
    out_shardings: Any


def _train_step(setup: PlanSetup, mesh, pin: bool = True) -> Planned:
    policy = abstract_policy(setup, mesh if pin else None)
    graphdef, trainable, rest, opt_state = _split_for_training(policy, _policy_trainable(setup), mesh)
    b, t, n = setup.batch, setup.prompt_length, setup.response_length
    rows = _batch_spec(mesh, None)
    seq = _sds((b, t + n), jnp.int32, rows)
    resp_i, resp_f = _sds((b, n), jnp.int32, rows), _sds((b, n), jnp.float32, rows)
    cfg = PPOConfig()

    def step(trainable, opt_state, rest, seq, seq_mask, tokens, old_logprobs, old_values, advantages, returns, mask):
        def loss_fn(tr):
            logits, values = nnx.merge(graphdef, tr, rest)(seq, seq_mask)
            logprobs = token_logprobs(logits[:, t - 1:-1], tokens)
            pg, _ = policy_loss(logprobs, old_logprobs, advantages, mask, cfg.clip_eps)
            vf, _ = value_loss(values[:, t - 1:-1], old_values, returns, mask, cfg.clip_value)
            return pg + cfg.vf_coef * vf

        loss, grads = jax.value_and_grad(loss_fn)(trainable)
        updates, opt_state = _TRAIN_TX.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    args = (trainable, opt_state, rest, seq, seq, resp_i, resp_f, resp_f, resp_f, resp_f, resp_f)
    return Planned(step, args, (0, 1), (_shardings(trainable), _shardings(opt_state), replicated(mesh)))


def _decode_step(setup: PlanSetup, mesh, pin: bool = True) -> Planned:
    lm = use_mesh(nnx.eval_shape(lambda: _backbone(setup, setup.policy_lora, nnx.Rngs(0))), mesh if pin else None)
    graphdef, state = nnx.split(lm)
    state = _abstract_state(state, mesh)
    b, s = setup.batch, setup.seq_length
    shape = kv_cache_shape(setup.model, b, s)
    cache_sharding = NamedSharding(mesh, logical_to_spec(KV_CACHE_AXES, shape, mesh, name="kv_cache"))
    kv = _sds(shape, setup.dtype, cache_sharding)

    def step(state, cache, token, position, cache_index, key_valid):
        model = nnx.merge(graphdef, state)
        hidden, cache = model.forward(token[:, None], positions=position[:, None], cache=cache,
                                      cache_index=cache_index, key_valid=key_valid,
                                      layer_params=model.unstack_layers())
        return jnp.argmax(model.logits(hidden)[:, 0], axis=-1).astype(jnp.int32), cache

    rows = _batch_spec(mesh)
    args = (state, KVCache(kv, kv), _sds((b,), jnp.int32, rows), _sds((b,), jnp.int32, rows),
            _sds((), jnp.int32, replicated(mesh)), _sds((b, s), jnp.bool_, _batch_spec(mesh, None)))
    return Planned(step, args, (1,), (rows, KVCache(cache_sharding, cache_sharding)))


def _rollout_step(setup: PlanSetup, mesh, pin: bool = True) -> Planned:
    lm = use_mesh(nnx.eval_shape(lambda: _backbone(setup, setup.policy_lora, nnx.Rngs(0))), mesh if pin else None)
    graphdef, state = nnx.split(lm)
    rows = _batch_spec(mesh, None)
    prompts = _sds((setup.batch, setup.prompt_length), jnp.int32, rows)
    cfg = sampling_config(1.0, None, None)

    def step(state, prompts, prompt_mask, key):
        return sample_continuations(nnx.merge(graphdef, state), prompts, prompt_mask, key,
                                    max_new_tokens=setup.response_length, cfg=cfg)

    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=replicated(mesh))
    return Planned(step, (_abstract_state(state, mesh), prompts, prompts, key), (), None)


def _reward_step(setup: PlanSetup, mesh, pin: bool = True) -> Planned:
    reward = abstract_reward(setup, mesh if pin else None)
    graphdef, trainable, rest, opt_state = _split_for_training(reward, _reward_trainable(setup), mesh)
    pairs = _sds((setup.batch, setup.seq_length), jnp.int32, _batch_spec(mesh, None))
    weights = _sds((setup.batch, setup.num_groups), jnp.float32, _batch_spec(mesh, None))

    def step(trainable, opt_state, rest, chosen, chosen_mask, rejected, rejected_mask, weights):
        def loss_fn(tr):
            rc, rr = score_pairs(nnx.merge(graphdef, tr, rest), chosen, chosen_mask, rejected, rejected_mask)
            return bt_loss(rc, rr, weights)

        loss, grads = jax.value_and_grad(loss_fn)(trainable)
        updates, opt_state = _TRAIN_TX.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    return Planned(step, (trainable, opt_state, rest, pairs, pairs, pairs, pairs, weights), (0, 1),
                   (_shardings(trainable), _shardings(opt_state), replicated(mesh)))


_STEP_BUILDERS = {"train": _train_step, "rollout": _rollout_step, "decode": _decode_step, "reward": _reward_step}


def compile_memory(planned: Planned) -> dict:
    """Compile for the mesh and read XLA's per-device memory analysis (bytes)."""
    t0 = time.perf_counter()
    jitted = jax.jit(planned.fn, donate_argnums=planned.donate, out_shardings=planned.out_shardings)
    compiled = jitted.lower(*planned.args).compile()
    stats = compiled.memory_analysis()
    out = {"argument": stats.argument_size_in_bytes, "output": stats.output_size_in_bytes,
           "alias": stats.alias_size_in_bytes, "temp": stats.temp_size_in_bytes}
    # Donated outputs reuse their argument's buffer, so they are counted once.
    out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    out["method"] = "compiled"
    out["compile_seconds"] = round(time.perf_counter() - t0, 1)
    return out


def _temp_estimate(setup: PlanSetup, mesh, step: str, planned: Planned) -> int:
    """Rough bytes per device a step needs besides its arguments, for `method="estimate"` (nothing compiled).

    - activations kept for the backward (train/reward, no remat): per layer and token ~ 10 D + 4 F values in the
      compute dtype, plus float32 attention scores and probabilities (2 H T per token); train adds float32 logits
      and their log-softmax (2 V per token). Tensor parallelism splits D-, F-, H- and V-sized values.
    - gradients of the trainable parameters, as large as the (sharded) trainable parameters;
    - under FSDP, one layer's weights gathered whole, twice (the current and the next layer), and for decode
      and rollout the gathered LM head plus one token's float32 logits per row;
    - rollout: the KV cache it creates, the per-layer copy of the block weights in the compute dtype that the
      decode loop reads (`CausalLM.unstack_layers`), and one layer's prefill activations (no backward: layers run
      one after the other) with its float32 attention scores.
    A cross-check of the compiled figures, not a substitute.
    """
    c = setup.model
    ways = math.prod(mesh.shape[a] for a in LOGICAL_RULES["batch"])
    tensor, fsdp = mesh.shape["tensor"], mesh.shape["fsdp"]
    rows = math.ceil(setup.batch / ways) * (2 if step == "reward" else 1)
    itemsize = jnp.dtype(setup.dtype).itemsize
    weights = planned.args[:1] if step in ("decode", "rollout") else (planned.args[0], planned.args[2])
    layer_params = sum(math.prod(v.shape[1:]) for v in jax.tree.leaves(weights)
                       if v.ndim > 1 and v.shape[0] == c.num_layers) if fsdp > 1 else 0
    gathered = 2 * layer_params * itemsize // tensor
    width = (10 * c.hidden_size + 4 * c.mlp_size) * itemsize  # activation bytes per token and layer
    t = setup.seq_length
    if step in ("decode", "rollout"):
        head = c.vocab_size * c.hidden_size * itemsize // tensor if fsdp > 1 else 0
        out = gathered + head + rows * c.vocab_size * 4
        if step == "rollout":
            kv_split = tensor if c.num_kv_heads % tensor == 0 else 1
            out += 2 * c.num_layers * rows * t * c.num_kv_heads * c.dim_per_head * itemsize // kv_split
            out += sum(math.prod(v.sharding.shard_shape(v.shape)) * itemsize for v in jax.tree.leaves(weights)
                       if v.ndim > 2 and v.shape[0] == c.num_layers)
            out += rows * setup.prompt_length * (width + 2 * c.num_heads * t * 4) // tensor
        return out
    per_token = width + 2 * c.num_heads * t * 4
    activations = c.num_layers * rows * t * per_token // tensor
    logits = 2 * rows * t * c.vocab_size * 4 // tensor if step == "train" else 0
    return activations + logits + gathered + device_bytes(planned.args[0])


def _rows_out(planned: Planned, mesh):
    outs = jax.eval_shape(planned.fn, *planned.args)
    return jax.tree.map(lambda o: _sds(o.shape, o.dtype, _batch_spec(mesh, *([None] * (o.ndim - 1)))), outs)


def estimate_memory(planned: Planned, setup: PlanSetup, mesh, step: str) -> dict:
    """Arguments from the shardings, plus `_temp_estimate` as temporaries; nothing compiled."""
    # Outputs are the updated donated state (aliased onto its arguments) plus a scalar or a token per row; the
    # rollout's are its tokens, log-probs and mask.
    donated = device_bytes([planned.args[i] for i in planned.donate])
    outputs = donated if step != "rollout" else device_bytes(_rows_out(planned, mesh))
    out = {"argument": device_bytes(planned.args), "output": outputs, "alias": donated,
           "temp": _temp_estimate(setup, mesh, step, planned)}
    out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    out["method"] = "estimate"
    return out


# The plan -----------------------------------------------------------------------------------------------------------
def state_plan(setup: PlanSetup, mesh) -> dict:
    """Exact parameter counts and bytes per device of everything resident during PPO, from shapes and shardings."""
    _, trainable, rest, opt_state = _split_for_training(abstract_policy(setup), _policy_trainable(setup), mesh)
    _, reward_state = nnx.split(abstract_reward(setup))
    reward_state = _abstract_state(reward_state, mesh)
    policy_bytes = device_bytes(trainable) + device_bytes(rest)
    return {
        "policy_params": _count(trainable) + _count(rest),
        "trainable_params": _count(trainable),
        "reward_params": _count(reward_state),
        "policy_bytes": policy_bytes,
        "trainable_bytes": device_bytes(trainable),
        "optimizer_bytes": device_bytes(opt_state),
        # Full fine-tuning keeps a frozen copy of the initial policy; under LoRA the reference is the base weights.
        "reference_bytes": 0 if setup.policy_lora else device_bytes(rest) + device_bytes(trainable),
        "reward_bytes": device_bytes(reward_state),
    }


def memory_plan(config_name: str, mesh_shape: tuple[int, int, int] | None = None, *, steps=STEPS,
                method: str = "compile", pin_activations: bool = True, devices=None, **overrides) -> dict:
    """Plan per-device memory of `SETUPS[config_name]` (fields overridable by keyword) on a (data, fsdp, tensor)
    mesh of the first prod(mesh_shape) devices. `method`: "compile" (XLA memory analysis of each compiled step)
    or "estimate" (shardings + `_temp_estimate`, nothing compiled). Returns a JSON-able dict: `state`
    (exact resident bytes per device) and one entry per step with argument / output / alias / temp / total
    bytes per device. `pin_activations=False` plans the models without giving them the mesh (`use_mesh`; XLA then
    infers activation shardings from the weights alone), to show what pinning saves."""
    if config_name not in SETUPS:
        raise KeyError(f"unknown setup {config_name!r}; known: {sorted(SETUPS)}")
    if method not in ("compile", "estimate"):
        raise ValueError(f"method must be 'compile' or 'estimate', got {method!r}")
    setup = dataclasses.replace(SETUPS[config_name], **overrides)
    mesh_shape = tuple(mesh_shape or setup.mesh_shape)
    n = math.prod(mesh_shape)
    devices = list(devices or jax.devices())
    if len(devices) < n:
        raise ValueError(f"mesh {mesh_shape} needs {n} devices but only {len(devices)} exist; run with "
                         f"XLA_FLAGS=--xla_force_host_platform_device_count={n} (fake CPU devices)")
    mesh = make_mesh(*mesh_shape, devices=devices[:n])
    plan = {"config": config_name, "mesh": dict(mesh.shape), "devices": n, "dtype": jnp.dtype(setup.dtype).name,
            "batch": setup.batch, "prompt_length": setup.prompt_length, "response_length": setup.response_length,
            "policy_lora": setup.policy_lora, "reward_lora": setup.reward_lora, "remat": setup.remat,
            "note": setup.note, "platform": devices[0].platform, "pin_activations": pin_activations,
            "state": state_plan(setup, mesh)}
    for step in steps:
        planned = _STEP_BUILDERS[step](setup, mesh, pin_activations)
        plan[step] = compile_memory(planned) if method == "compile" else estimate_memory(planned, setup, mesh, step)
        if step == "decode":
            plan[step]["kv_cache"] = device_bytes(planned.args[1])
    if "train" in plan and "rollout" in plan:
        plan["ppo_iteration_estimate"] = ppo_iteration_estimate(plan)
    return plan


def ppo_iteration_estimate(plan: dict) -> int:
    """Peak bytes per device of one jitted PPO iteration (`PPOTrainer.step`), which holds everything resident at
    once: policy, Adam moments, reference and reward model, plus the larger of the update's and the rollout's
    temporaries. An estimate assembled from the planned pieces, not one compile."""
    s = plan["state"]
    resident = s["policy_bytes"] + s["optimizer_bytes"] + s["reference_bytes"] + s["reward_bytes"]
    rollout = plan["rollout"]["temp"] + plan["rollout"]["output"]
    return resident + max(plan["train"]["temp"], rollout)


# Table --------------------------------------------------------------------------------------------------------------
def _mib(x: float) -> str:
    return f"{x / 2**20:,.1f}"


def format_plan(plan: dict) -> str:
    s = plan["state"]
    lines = [f"## {plan['config']}: mesh {plan['mesh']} ({plan['devices']} {plan['platform']} devices), "
             f"{plan['dtype']}, batch {plan['batch']} x ({plan['prompt_length']} + {plan['response_length']}) "
             f"tokens, {plan['note']}, remat {plan['remat']}"
             + ("" if plan["pin_activations"] else ", activations NOT pinned"),
             (f"params: policy {s['policy_params']:,} (trainable {s['trainable_params']:,}), reward "
              f"{s['reward_params']:,}"),
             "",
             "| resident, per device | MiB |", "|---|---:|"]
    for key in ("policy_bytes", "trainable_bytes", "optimizer_bytes", "reference_bytes", "reward_bytes"):
        lines.append(f"| {key.removesuffix('_bytes')} | {_mib(s[key])} |")
    lines += ["", "| step | method | arguments | outputs | aliased | temporaries | total (MiB per device) |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for step in STEPS:
        if step in plan:
            r = plan[step]
            method = r["method"] + (f" ({r['compile_seconds']} s)" if "compile_seconds" in r else "")
            lines.append(f"| {step} | {method} | " + " | ".join(_mib(r[k]) for k in
                                                                  ("argument", "output", "alias", "temp", "total"))
                         + " |")
    if "ppo_iteration_estimate" in plan:
        lines += ["", (f"PPO iteration (resident state + max(update temporaries, rollout temporaries + outputs)): "
                       f"{_mib(plan['ppo_iteration_estimate'])} MiB per device")]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("configs", nargs="*", default=["tulu2-7b", "gpt2"], help=f"of {sorted(SETUPS)}")
    parser.add_argument("--mesh", type=lambda s: tuple(int(x) for x in s.split(",")), default=None,
                        help="data,fsdp,tensor (default: the setup's own)")
    parser.add_argument("--method", choices=("compile", "estimate"), default="compile")
    parser.add_argument("--no-pin", action="store_true", help="plan without pinning activations to the batch split")
    parser.add_argument("--remat", choices=("none", "full", "dots"), default=None,
                        help="rematerialisation of the blocks (default: the setup's own)")
    parser.add_argument("--steps", default=",".join(STEPS))
    parser.add_argument("--json", help="also write the plans here")
    args = parser.parse_args(argv)
    plans = []
    for name in args.configs:
        overrides = {} if args.remat is None else {"remat": args.remat}
        plan = memory_plan(name, args.mesh, steps=tuple(args.steps.split(",")), method=args.method,
                           pin_activations=not args.no_pin, **overrides)
        plans.append(plan)
        print(format_plan(plan), "\n", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(plans, f, indent=2, default=str)


if __name__ == "__main__":
    main(sys.argv[1:])
