"""Multi-process (multi-host) runs: start the JAX distributed runtime, give each process its rows of a global
batch, and assemble the per-process rows into one global array on the mesh.

JAX runs one process per host (per GPU node, per TPU VM). Every process executes the same program on the global
mesh; each feeds only the batch rows that live on its own devices. See docs/multihost.md.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from maxmin_jax.sharding import batch_sharding, replicated

log = logging.getLogger(__name__)

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else None


def detected_cluster() -> str | None:
    """The multi-process launcher JAX can configure itself from, if this process runs under one."""
    if all(v in os.environ for v in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
                                     "SLURM_LOCALID")) and int(os.environ["SLURM_NTASKS"]) > 1:
        return "slurm"
    if "OMPI_MCA_orte_hnp_uri" in os.environ and int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return "ompi"
    if len([h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
        return "tpu"
    try:  # Cloud TPU VMs (no public flag; jax itself checks this one before querying the metadata server).
        from jax._src.cloud_tpu_init import running_in_cloud_tpu_vm
    except ImportError:  # pragma: no cover
        running_in_cloud_tpu_vm = False
    return "tpu" if running_in_cloud_tpu_vm else None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, local_device_ids: int | list[int] | None = None,
               initialization_timeout: int = 300) -> bool:
    """Start the distributed runtime if this is a multi-process run; returns whether it is one.

    Arguments left None are read from `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`. Without
    them, under SLURM, Open MPI or on a Cloud TPU VM, JAX detects everything itself (TPU pods: call with no
    arguments on every host). Otherwise, or with one process, this is a no-op. Call before any other JAX work.
    On CPU, cross-process collectives use gloo.
    """
    coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR) or None
    num_processes = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
    process_id = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    if num_processes == 1:
        return False
    explicit = coordinator_address is not None or num_processes is not None or process_id is not None
    cluster = None if explicit else detected_cluster()
    if not explicit and cluster is None:
        return False
    if explicit and None in (coordinator_address, num_processes, process_id):
        raise ValueError(
            "a multi-process run needs coordinator_address, num_processes and process_id (or the environment "
            f"variables {ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}); got "
            f"coordinator_address={coordinator_address!r}, num_processes={num_processes!r}, "
            f"process_id={process_id!r}")
    if jax.config.values.get("jax_cpu_collectives_implementation") in (None, "", "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes need it to talk
    jax.distributed.initialize(coordinator_address, num_processes, process_id, local_device_ids=local_device_ids,
                               initialization_timeout=initialization_timeout)
    log.info("distributed: process %d of %d (%s), %d local / %d global devices", jax.process_index(),
             jax.process_count(), cluster or coordinator_address, jax.local_device_count(), jax.device_count())
    return jax.process_count() > 1


def process_batch_slice(global_batch: int, process_index: int | None = None, process_count: int | None = None,
                        *, mesh: Mesh | None = None) -> slice:
    """Rows `[start, stop)` of a global batch that this process loads.

    With `mesh`, the rows are read off the batch sharding (`maxmin_jax.sharding.batch_sharding`): exactly those
    stored on this process's devices, which is what `host_local_to_global` expects. Without it, the batch is cut
    into `process_count` equal contiguous blocks (the same thing for a mesh built from `jax.devices()` in order).
    """
    if mesh is not None:
        if process_index is not None and process_index != jax.process_index():
            raise ValueError("with mesh, the slice is computed for the calling process only")
        index_map = batch_sharding(mesh, 1).addressable_devices_indices_map((global_batch,))
        starts = sorted({idx[0].indices(global_batch)[:2] for idx in index_map.values()})
        start, stop = starts[0][0], starts[0][1]
        for s, e in starts[1:]:
            if s != stop:
                raise ValueError(f"this process's batch rows are not contiguous on mesh {dict(mesh.shape)}: "
                                 f"{starts}; build the mesh from jax.devices() in order")
            stop = e
        return slice(start, stop)
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} out of range for {process_count} processes")
    if global_batch % process_count:
        raise ValueError(f"global batch {global_batch} is not divisible by the {process_count} processes")
    per = global_batch // process_count
    return slice(process_index * per, (process_index + 1) * per)


def process_rows(tree: Any, global_batch: int | None = None, *, mesh: Mesh | None = None) -> Any:
    """This process's share (`process_batch_slice`) of every array in a pytree of global-batch arrays."""
    leaves = jax.tree.leaves(tree)
    global_batch = global_batch if global_batch is not None else (leaves[0].shape[0] if leaves else 0)
    rows = process_batch_slice(global_batch, mesh=mesh)
    return jax.tree.map(lambda x: x[rows] if np.ndim(x) else x, tree)


def host_local_to_global(batch: Any, mesh: Mesh, *, global_batch: int | None = None) -> Any:
    """Global arrays on `mesh` from each process's local rows: the leading axis split like
    `maxmin_jax.sharding.shard_batch`, scalars replicated (they must agree across processes).

    `global_batch` (the leading size of the global arrays) defaults to local rows x the number of processes
    holding distinct rows, which is what `process_batch_slice` hands out.
    """
    def place(x):
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        if x.ndim == 0:
            return jax.make_array_from_process_local_data(replicated(mesh), x, ())
        sharding = batch_sharding(mesh, x.ndim)
        shape = None if global_batch is None else (global_batch, *x.shape[1:])
        return jax.make_array_from_process_local_data(sharding, x, shape)

    return jax.tree.map(place, batch)


__all__ = ["detected_cluster", "host_local_to_global", "initialize", "process_batch_slice", "process_rows"]
