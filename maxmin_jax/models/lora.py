"""Low-rank adapters (LoRA, Hu et al. 2021) on the stacked block weights of the causal LMs.

For a target weight `W` used as `einsum(spec, x, W)` in a family's `_block`, `add_lora` adds two `nnx.LoRAParam`
variables to `model.layers`:

- `{name}_lora_a` [L, in..., r]: normal init with std 1/sqrt(fan_in), so `x @ A` keeps the scale of `x`;
- `{name}_lora_b` [L, r, out...]: zeros, so a freshly adapted model computes exactly what the base model does.

`in...` are the weight axes the einsum contracts with the input, `out...` those it produces (read from the spec
below, which must match what `_block` passes to `CausalLM.lora_project`). The block adds
`lora_scale * (x @ A) @ B`, `lora_scale = alpha / rank` being recorded on the adapters themselves (variable
metadata), so it travels with them. Adapters are stored in float32 whatever the base dtype (the optimiser updates
float32 values; the block casts them to the compute dtype). Train only the adapters with
`nnx.Optimizer(model, tx, wrt=lora_filter)` and gradients taken `wrt` the same filter; `merge_lora` folds them into
the base weights for export or fast inference (`save_pretrained` exports the merged weights).
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from maxmin_jax.models.transformer import CausalLM
from maxmin_jax.sharding import place_variable

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
             rngs: nnx.Rngs, mesh: jax.sharding.Mesh | None = None, dtype=jnp.float32) -> CausalLM:
    """Add zero-initialised adapters to `targets` (in place) and return the model.

    `alpha` defaults to `rank` (scale 1). Adapters are placed in the sharding their logical axes give (the weight's
    own in/out axes; the rank axis is replicated) on `mesh`, by default the mesh the model was placed on (none for
    an unplaced model). `dtype` is the adapters' storage dtype (float32: see the module docstring).
    """
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    specs = _specs_for(model)
    layers = model.layers
    scale = float(alpha if alpha is not None else rank) / rank
    mesh = mesh if mesh is not None else model.mesh
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
        num_layers = shape[0]
        fan_in = math.prod(dim[c][0] for c in contracted)
        a_shape = (num_layers, *(dim[c][0] for c in contracted), rank)
        b_shape = (num_layers, rank, *(dim[c][0] for c in produced))
        a = jax.random.normal(rngs.params(), a_shape, jnp.float32) / math.sqrt(fan_in)
        adapters = {
            "a": nnx.LoRAParam(a.astype(dtype), logical_axes=(axes[0], *(dim[c][1] for c in contracted), "lora_rank"),
                               lora_scale=scale),
            "b": nnx.LoRAParam(jnp.zeros(b_shape, dtype), logical_axes=(axes[0], "lora_rank",
                                                                       *(dim[c][1] for c in produced)),
                               lora_scale=scale)}
        for suffix, var in adapters.items():
            if mesh is not None:
                var = place_variable(var, var.get_value(), mesh, name=f"layers/{name}_lora_{suffix}")
            setattr(layers, f"{name}_lora_{suffix}", var)
    return model


def lora_targets(model: CausalLM) -> tuple[str, ...]:
    """Names of the weights that currently carry adapters."""
    return tuple(name[: -len("_lora_a")] for name, var in vars(model.layers).items()
                 if isinstance(var, nnx.LoRAParam) and name.endswith("_lora_a"))


def lora_scale(model: CausalLM, name: str) -> float:
    """The `alpha / rank` scale recorded on the adapters of weight `name`."""
    return getattr(model.layers, f"{name}_lora_b").get_metadata()["lora_scale"]


def merged_weights(model: CausalLM) -> dict[str, jax.Array]:
    """`W + lora_scale * A @ B` (computed in float32, returned in W's dtype and sharding) for every adapted weight
    `W`, by name; the model is left as it is."""
    specs = _specs_for(model)
    layers = model.layers
    merged = {}
    for name in lora_targets(model):
        w, contracted, produced = _split(specs[name])
        a = getattr(layers, f"{name}_lora_a").get_value().astype(jnp.float32)
        b = getattr(layers, f"{name}_lora_b").get_value().astype(jnp.float32)
        delta = jnp.einsum(f"l{contracted}r,lr{produced}->l{w}", a, b)
        old = getattr(layers, name).get_value()
        value = (old.astype(jnp.float32) + lora_scale(model, name) * delta).astype(old.dtype)
        if isinstance(old, jax.Array) and hasattr(old, "sharding"):
            value = jax.device_put(value, old.sharding)
        merged[name] = value
    return merged


def merge_lora(model: CausalLM) -> CausalLM:
    """Fold every adapter into its base weight (`merged_weights`) and remove the adapters; in place, returning the
    model. Sharding of the base weights is kept."""
    for name, value in merged_weights(model).items():
        getattr(model.layers, name).set_value(value)
        delattr(model.layers, f"{name}_lora_a")
        delattr(model.layers, f"{name}_lora_b")
    return model


__all__ = ["DEFAULT_TARGETS", "LORA_SPECS", "add_lora", "base_filter", "lora_filter", "lora_scale", "lora_targets",
           "merge_lora", "merged_weights", "resolve_targets"]
