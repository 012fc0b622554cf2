"""Device mesh, shardings, and host-local batch -> global `jax.Array`.

Data parallelism is expressed as `jax.jit` over a one-axis `Mesh` ('data'): parameters are
replicated, batches are sharded along their leading axis, and XLA inserts the gradient
all-reduce. The mesh keeps a named axis so an 'fsdp' axis can be added later.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def create_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh over `devices` (default: every device of every process), axis 'data'."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over the 'data' axis; other axes whole."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def check_divisible_batch(global_batch_size: int, mesh: Mesh, what: str = "batch size") -> None:
    """Raise a one-line ValueError unless the global batch splits evenly over the devices."""
    num_devices = mesh.devices.size
    if global_batch_size <= 0 or global_batch_size % num_devices:
        raise ValueError(
            f"{what} {global_batch_size} does not divide over {num_devices} devices; "
            f"use a positive multiple of {num_devices}"
        )


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assemble each process's rows into global arrays sharded along the batch axis.

    local_batch: this process's rows, each (B / num_processes, ...), in process-index order of the
    global batch.
    """
    sharding = batch_sharding(mesh)
    return {
        key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
        for key, value in local_batch.items()
    }


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Place every leaf of `tree` on all devices of `mesh` (fully replicated)."""
    return jax.device_put(tree, replicated_sharding(mesh))
