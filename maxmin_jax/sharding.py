"""Device mesh and placement of parameters and batches on it.

Parameters carry logical axis names (`logical_axes` metadata, set where they are created); the one table mapping
them to mesh axes is `maxmin_jax.partitioning.LOGICAL_RULES` (re-exported here). Placing a module also hands the
mesh to the modules inside it that take one (`partitioning.TakesMesh`: the causal LMs, which pin their activations
to it).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from maxmin_jax.partitioning import LOGICAL_RULES, MESH_AXES, ShardingError, TakesMesh, logical_to_spec


def make_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1, *, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with axes (data, fsdp, tensor). The product must equal the number of devices used."""
    devices = list(jax.devices() if devices is None else devices)
    shape = (data, fsdp, tensor)
    if math.prod(shape) != len(devices):
        raise ShardingError(f"mesh data={data} x fsdp={fsdp} x tensor={tensor} = {math.prod(shape)} devices, "
                            f"but {len(devices)} are available")
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def variable_sharding(var: nnx.Variable, mesh: Mesh, *, name: str = "param") -> NamedSharding:
    shape = var.get_value().shape
    axes = var.get_metadata().get("logical_axes") or (None,) * len(shape)
    return NamedSharding(mesh, logical_to_spec(axes, shape, mesh, name=name))


def state_shardings(state: nnx.State, mesh: Mesh) -> Any:
    """A pytree of NamedShardings matching `state` (Variables' logical axes mapped through LOGICAL_RULES)."""
    return nnx.from_flat_state([(path, var.replace(variable_sharding(var, mesh, name="/".join(map(str, path)))))
                                for path, var in nnx.to_flat_state(state)])


def place_variable(var: nnx.Variable, value: Any, mesh: Mesh, *, name: str) -> nnx.Variable:
    """`var` holding `value` placed in its sharding on `mesh` (a new Variable)."""
    return var.replace(jax.device_put(value, variable_sharding(var, mesh, name=name)))


def shard_module(module: nnx.Module, mesh: Mesh) -> nnx.Module:
    """Place every variable of a module in its sharding (in place), give the mesh to the modules inside it that take
    one (`use_mesh`), and return it."""
    _, state = nnx.split(module)
    placed = [(path, place_variable(var, var.get_value(), mesh, name="/".join(map(str, path))))
              for path, var in nnx.to_flat_state(state)]
    nnx.update(module, nnx.from_flat_state(placed))
    return use_mesh(module, mesh)


def use_mesh(module: nnx.Module, mesh: Mesh | None) -> nnx.Module:
    """Give `mesh` to every module inside `module` that takes one (in place), without moving any variable: for a
    module whose weights were placed by other means, or an abstract one (`nnx.eval_shape`) planned for a mesh.
    None takes it away (activations are then left to XLA)."""
    for _, sub in nnx.iter_modules(module):
        if isinstance(sub, TakesMesh):
            sub.use_mesh(mesh)
    return module


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


def canonical_shardings(tree: Any) -> Any:
    """Every array of `tree` with its NamedSharding spelled as a jitted program spells its outputs' (trailing
    unsplit dimensions dropped: `P(None, None)` becomes `P()`, `P("fsdp", None)` becomes `P("fsdp")`). Equivalent
    shardings spelled differently are different jit cache keys, so a state built eagerly and donated to a jitted
    step would otherwise compile the step a second time when its output comes back. Moves no data."""

    def canonical(x):
        sharding = getattr(x, "sharding", None)
        if not isinstance(sharding, NamedSharding):
            return x
        spec = list(sharding.spec)
        while spec and spec[-1] is None:
            spec.pop()
        if len(spec) == len(sharding.spec):
            return x
        return jax.device_put(x, NamedSharding(sharding.mesh, P(*spec), memory_kind=sharding.memory_kind))

    return jax.tree.map(canonical, tree)


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


__all__ = ["LOGICAL_RULES", "MESH_AXES", "ShardingError", "batch_sharding", "canonical_shardings", "logical_to_spec",
           "make_mesh", "place_variable", "replicate_on_mesh_of", "replicated", "shard_batch", "shard_module",
           "state_shardings", "use_mesh", "variable_sharding"]
