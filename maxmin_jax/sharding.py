"""Device mesh, the one table mapping logical axis names to mesh axes, and placement of parameters and batches.

Parameters carry logical axis names (`logical_axes` metadata, set where they are created). This module is the only
place those names meet mesh axes, so changing a parallelism strategy is an edit to `LOGICAL_RULES`.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from maxmin_jax.errors import InputError

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axes. Batch is split over data and FSDP; parameters are FSDP-sharded on the embedding
# axis and tensor-parallel on heads, MLP and vocabulary.
LOGICAL_RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "embed": ("fsdp",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
    "vocab": ("tensor",),
    "layers": (),
    "groups": (),
}
# Axes replicated instead of refused when their size does not divide: GPT-2's 50257-token vocabulary and MQA's
# single key/value head are common and small, and replicating them is what serving stacks do.
REPLICATE_IF_INDIVISIBLE = frozenset({"vocab", "kv_heads"})


class ShardingError(InputError, ValueError):
    """A tensor dimension cannot be split evenly over the mesh axes its logical axis maps to."""


def make_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1, *, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with axes (data, fsdp, tensor). The product must equal the number of devices used."""
    devices = list(jax.devices() if devices is None else devices)
    shape = (data, fsdp, tensor)
    if math.prod(shape) != len(devices):
        raise ShardingError(f"mesh data={data} x fsdp={fsdp} x tensor={tensor} = {math.prod(shape)} devices, "
                            f"but {len(devices)} are available")
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh, *, name: str = "tensor") -> P:
    """PartitionSpec for a tensor with these logical axes, checking divisibility up front."""
    spec = []
    for axis, size in zip(axes, shape):
        mesh_axes = tuple(a for a in LOGICAL_RULES.get(axis, ()) if mesh.shape[a] > 1) if axis else ()
        ways = math.prod(mesh.shape[a] for a in mesh_axes)
        if ways > 1 and size % ways:
            if axis in REPLICATE_IF_INDIVISIBLE:
                mesh_axes = ()
            else:
                raise ShardingError(f"{name}: logical axis {axis!r} has size {size}, not divisible by mesh "
                                    f"axes {mesh_axes} of total size {ways} (mesh {dict(mesh.shape)})")
        spec.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return P(*spec)


def variable_sharding(var: nnx.Variable, mesh: Mesh, *, name: str = "param") -> NamedSharding:
    shape = var.get_value().shape
    axes = var.get_metadata().get("logical_axes") or (None,) * len(shape)
    return NamedSharding(mesh, logical_to_spec(axes, shape, mesh, name=name))


def state_shardings(state: nnx.State, mesh: Mesh) -> Any:
    """A pytree of NamedShardings matching `state` (Variables' logical axes mapped through LOGICAL_RULES)."""
    return nnx.from_flat_state([(path, var.replace(variable_sharding(var, mesh, name="/".join(map(str, path)))))
                                for path, var in nnx.to_flat_state(state)])


def shard_module(module: nnx.Module, mesh: Mesh) -> nnx.Module:
    """Place every variable of a module in its sharding (in place) and return it; its causal LMs then keep their
    activations split over the batch (`set_activation_mesh`)."""
    graphdef, state = nnx.split(module)
    flat = nnx.to_flat_state(state)
    placed = []
    for path, var in flat:
        sharding = variable_sharding(var, mesh, name="/".join(map(str, path)))
        placed.append((path, var.replace(jax.device_put(var[...], sharding))))
    nnx.update(module, nnx.from_flat_state(placed))
    return set_activation_mesh(module, mesh)


def set_activation_mesh(module: nnx.Module, mesh: Mesh | None) -> nnx.Module:
    """Tell every causal LM inside `module` (in place) which mesh its activations live on. Without it XLA infers
    activation shardings from the FSDP-split weights and may split hidden states along the embedding instead of
    the batch, so each device holds activations of the whole batch (see docs/memory_plan.md)."""
    from maxmin_jax.models.transformer import CausalLM

    for _, sub in nnx.iter_modules(module):
        if isinstance(sub, CausalLM):
            sub.activation_mesh = mesh
    return module


def constrain(x: jax.Array, mesh: Mesh | None, axes: Sequence[str | None]) -> jax.Array:
    """Inside jit: pin an activation to the sharding of its logical axes. A no-op without a mesh, and where a
    dimension does not divide (e.g. a batch of 3 on 8 devices), which is then left to XLA."""
    if mesh is None:
        return x
    try:
        spec = logical_to_spec(axes, x.shape, mesh, name="activation")
    except ShardingError:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def replicate_on_mesh_of(tree: Any, reference: Any) -> Any:
    """Put every array of `tree` that is not yet on a mesh replicated onto the mesh of `reference`'s sharded
    arrays (unchanged when there are none). Jitted steps return their small state (step counters, optimiser
    counts) replicated over the weights' mesh; starting it there keeps the second call from compiling again."""
    meshes = [x.sharding.mesh for x in jax.tree.leaves(reference)
              if isinstance(getattr(x, "sharding", None), NamedSharding)]
    if not meshes:
        return tree
    target = replicated(meshes[0])
    return jax.tree.map(lambda x: x if isinstance(getattr(x, "sharding", None), NamedSharding)
                        else jax.device_put(x, target), tree)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading (batch) axis split over data and FSDP; the rest replicated."""
    batch_axes = tuple(a for a in LOGICAL_RULES["batch"] if mesh.shape[a] > 1)
    lead = None if not batch_axes else batch_axes[0] if len(batch_axes) == 1 else batch_axes
    return NamedSharding(mesh, P(lead, *([None] * (ndim - 1))))


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Put every array of a batch pytree on the mesh, split along its leading axis (checked for divisibility)."""
    ways = math.prod(mesh.shape[a] for a in LOGICAL_RULES["batch"])

    def place(x):
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        if x.ndim and x.shape[0] % ways:
            raise ShardingError(f"batch size {x.shape[0]} is not divisible by data x fsdp = {ways} "
                                f"(mesh {dict(mesh.shape)})")
        return jax.device_put(x, batch_sharding(mesh, x.ndim) if x.ndim else NamedSharding(mesh, P()))
    return jax.tree.map(place, batch)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
