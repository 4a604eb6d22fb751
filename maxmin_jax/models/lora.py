"""Low-rank adapters (LoRA, Hu et al. 2021) on the stacked block weights of the causal LMs.

For a target weight `W` used as `einsum(spec, x, W)` in a family's `_block`, `add_lora` adds two `nnx.LoRAParam`
variables to `model.layers`:

- `{name}_lora_a` [L, in..., r]: normal init with std 1/sqrt(fan_in), so `x @ A` keeps the scale of `x`;
- `{name}_lora_b` [L, r, out...]: zeros, so a freshly adapted model computes exactly what the base model does.

`in...` are the weight axes the einsum contracts with the input, `out...` those it produces (read from the spec
below, which must match what `_block` passes to `CausalLM.lora_project`). The block adds
`lora_scale * (x @ A) @ B` with `model.lora_scale = alpha / rank`. Train only the adapters with
`nnx.Optimizer(model, tx, wrt=lora_filter)` and gradients taken `wrt` the same filter; `merge_lora` folds them into
the base weights for export or fast inference.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from maxmin_jax.models.transformer import CausalLM

lora_filter = nnx.LoRAParam
"""Filter selecting the adapters (for `nnx.Optimizer(..., wrt=lora_filter)`, `nnx.DiffState`, `nnx.state`)."""
base_filter = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))
"""Filter selecting the base parameters only (`nnx.LoRAParam` is a subclass of `nnx.Param`)."""

# The einsum each adaptable weight takes part in, as written in the family's `_block` (input first, weight second).
LORA_SPECS: dict[str, dict[str, str]] = {
    "gpt2": {"qkv": "btd,dchk->btchk", "attn_out": "bthk,hkd->btd", "fc": "btd,df->btf", "proj": "btf,fd->btd"},
    "llama": {"q": "btd,dhk->bthk", "k": "btd,dhk->bthk", "v": "btd,dhk->bthk", "o": "bthk,hkd->btd",
              "gate": "btd,df->btf", "up": "btd,df->btf", "down": "btf,fd->btd"},
}
# Attention query/value projections, as in the LoRA paper; GPT-2 fuses q, k and v into one weight.
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {"gpt2": ("qkv",), "llama": ("q", "v")}


def _split(spec: str) -> tuple[str, str, str]:
    """(weight subscripts, contracted subscripts, produced subscripts) of `x, W -> y`."""
    lhs, _ = spec.split("->")
    x, w = lhs.split(",")
    return w, "".join(c for c in w if c in x), "".join(c for c in w if c not in x)


def _specs_for(model: CausalLM) -> dict[str, str]:
    model_type = model.config.model_type
    if model_type not in LORA_SPECS:
        raise ValueError(f"no LoRA targets known for model_type {model_type!r}; known: {sorted(LORA_SPECS)}")
    return LORA_SPECS[model_type]


def resolve_targets(model: CausalLM, targets: Sequence[str] | str | None) -> tuple[str, ...]:
    """The family default for None, every adaptable weight for "all", else the names given (checked)."""
    specs = _specs_for(model)
    if targets is None:
        return DEFAULT_TARGETS[model.config.model_type]
    if targets == "all":
        return tuple(specs)
    if isinstance(targets, str):
        targets = (targets,)
    unknown = [t for t in targets if t not in specs]
    if unknown:
        raise ValueError(f"unknown LoRA targets {unknown} for {model.config.model_type}; adaptable weights: "
                         f"{list(specs)}")
    return tuple(targets)


def add_lora(model: CausalLM, *, rank: int, alpha: float | None = None, targets: Sequence[str] | str | None = None,
             rngs: nnx.Rngs, mesh: jax.sharding.Mesh | None = None) -> CausalLM:
    """Add zero-initialised adapters to `targets` (in place) and return the model.

    `alpha` defaults to `rank` (scale 1). With `mesh`, adapters are placed in the sharding their logical axes give
    (the weight's own in/out axes; the rank axis is replicated), matching a model placed with `shard_module`.
    """
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    specs = _specs_for(model)
    layers = model.layers
    for name in resolve_targets(model, targets):
        if hasattr(layers, f"{name}_lora_a"):
            raise ValueError(f"{name!r} already has LoRA adapters; merge_lora or remove them first")
        base = getattr(layers, name)
        w, contracted, produced = _split(specs[name])
        shape, axes = base.get_value().shape, base.get_metadata().get("logical_axes")
        if len(shape) != len(w) + 1:
            raise ValueError(f"{name}: weight shape {shape} does not match einsum subscripts {w!r} (+ layer axis)")
        axes = axes or (None,) * len(shape)
        dim = {c: (shape[1 + i], axes[1 + i]) for i, c in enumerate(w)}
        num_layers, dtype = shape[0], base.get_value().dtype
        fan_in = math.prod(dim[c][0] for c in contracted)
        a_shape = (num_layers, *(dim[c][0] for c in contracted), rank)
        b_shape = (num_layers, rank, *(dim[c][0] for c in produced))
        a = jax.random.normal(rngs.params(), a_shape, jnp.float32) / math.sqrt(fan_in)
        a_var = nnx.LoRAParam(a.astype(dtype),
                              logical_axes=(axes[0], *(dim[c][1] for c in contracted), "lora_rank"))
        b_var = nnx.LoRAParam(jnp.zeros(b_shape, dtype),
                              logical_axes=(axes[0], "lora_rank", *(dim[c][1] for c in produced)))
        if mesh is not None:
            from maxmin_jax.sharding import variable_sharding

            for suffix, var in (("a", a_var), ("b", b_var)):
                var.set_value(jax.device_put(var.get_value(),
                                             variable_sharding(var, mesh, name=f"layers/{name}_lora_{suffix}")))
        setattr(layers, f"{name}_lora_a", a_var)
        setattr(layers, f"{name}_lora_b", b_var)
    model.lora_scale = float(alpha if alpha is not None else rank) / rank
    return model


def lora_targets(model: CausalLM) -> tuple[str, ...]:
    """Names of the weights that currently carry adapters."""
    return tuple(name[: -len("_lora_a")] for name, var in vars(model.layers).items()
                 if isinstance(var, nnx.LoRAParam) and name.endswith("_lora_a"))


def merge_lora(model: CausalLM) -> CausalLM:
    """Fold every adapter into its base weight (`W += scale * A @ B`, in float32), remove the adapters and reset
    `lora_scale`; in place, returning the model. Sharding of the base weights is kept."""
    specs = _specs_for(model)
    layers = model.layers
    for name in lora_targets(model):
        w, contracted, produced = _split(specs[name])
        base = getattr(layers, name)
        a = getattr(layers, f"{name}_lora_a").get_value().astype(jnp.float32)
        b = getattr(layers, f"{name}_lora_b").get_value().astype(jnp.float32)
        delta = jnp.einsum(f"l{contracted}r,lr{produced}->l{w}", a, b)
        old = base.get_value()
        merged = (old.astype(jnp.float32) + model.lora_scale * delta).astype(old.dtype)
        if isinstance(old, jax.Array) and hasattr(old, "sharding"):
            merged = jax.device_put(merged, old.sharding)
        base.set_value(merged)
        delattr(layers, f"{name}_lora_a")
        delattr(layers, f"{name}_lora_b")
    model.lora_scale = 0.0
    return model


__all__ = ["DEFAULT_TARGETS", "LORA_SPECS", "add_lora", "base_filter", "lora_filter", "lora_targets", "merge_lora",
           "resolve_targets"]
