"""The logical-axis rules: the one table mapping the axis names parameters and activations carry to mesh axes, the
`constrain` helper model code pins activations with, and the protocol of modules that take a mesh.

Imports no model, so the models import it and `maxmin_jax.sharding` (placement of modules and batches) builds on
it without a cycle. Changing a parallelism strategy is an edit to `LOGICAL_RULES`.
"""

from __future__ import annotations

import math
from typing import Protocol, Sequence, runtime_checkable

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from maxmin_jax.errors import InputError

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axes. Batch is split over data and FSDP; parameters are FSDP-sharded on the embedding
# axis and tensor-parallel on heads, MLP and vocabulary. Every name a tensor carries must be here: an unknown name
# is refused rather than silently replicated.
LOGICAL_RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "embed": ("fsdp",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
    "vocab": ("tensor",),
    "layers": (),
    "groups": (),
    "lora_rank": (),  # a LoRA rank of 8-64 is too small to be worth splitting
}
# Axes replicated instead of refused when their size does not divide: GPT-2's 50257-token vocabulary and MQA's
# single key/value head are common and small, and replicating them is what serving stacks do.
REPLICATE_IF_INDIVISIBLE = frozenset({"vocab", "kv_heads"})


class ShardingError(InputError):
    """A tensor cannot be laid out on the mesh: an indivisible dimension or an unknown logical axis name."""


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh, *, name: str = "tensor") -> P:
    """PartitionSpec for a tensor with these logical axes, checking names and divisibility up front."""
    if len(axes) != len(shape):
        raise ShardingError(f"{name}: {len(axes)} logical axes {tuple(axes)} for a tensor of shape {tuple(shape)}")
    spec = []
    for axis, size in zip(axes, shape):
        if axis is not None and axis not in LOGICAL_RULES:
            raise ShardingError(f"{name}: unknown logical axis {axis!r}; known: {sorted(LOGICAL_RULES)} "
                                "(add it to maxmin_jax.partitioning.LOGICAL_RULES)")
        mesh_axes = tuple(a for a in LOGICAL_RULES[axis] if mesh.shape[a] > 1) if axis else ()
        ways = math.prod(mesh.shape[a] for a in mesh_axes)
        if ways > 1 and size % ways:
            if axis in REPLICATE_IF_INDIVISIBLE:
                mesh_axes = ()
            else:
                raise ShardingError(f"{name}: logical axis {axis!r} has size {size}, not divisible by mesh "
                                    f"axes {mesh_axes} of total size {ways} (mesh {dict(mesh.shape)})")
        spec.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return P(*spec)


def constrain(x: jax.Array, mesh: Mesh | None, axes: Sequence[str | None]) -> jax.Array:
    """Inside jit: pin an activation to the sharding of its logical axes. A no-op without a mesh, and where a
    dimension does not divide (e.g. a batch of 3 on 8 devices), which is then left to XLA."""
    if mesh is None:
        return x
    try:
        spec = logical_to_spec(axes, x.shape, mesh, name="activation")
    except ShardingError as error:
        if "unknown logical axis" in str(error):
            raise
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


@runtime_checkable
class TakesMesh(Protocol):
    """A module whose computation depends on the mesh its weights live on (the causal LMs pin their activations
    to its batch split). It receives the mesh at construction or, once placed, from `maxmin_jax.sharding`."""

    mesh: Mesh | None

    def use_mesh(self, mesh: Mesh | None) -> "TakesMesh":
        ...
