"""Device mesh, shardings, host-local batch <-> global `jax.Array`, and distributed start-up.

Data parallelism is expressed as `jax.jit` over a `Mesh`: parameters are replicated, batches
are sharded along their leading axis, and XLA inserts the gradient all-reduce. The same code
runs on one CPU, several local devices (GPUs, or fake CPU devices via
`XLA_FLAGS=--xla_force_host_platform_device_count=8`) and many processes (a TPU pod, a SLURM
job), once `initialize_distributed` has joined the processes.

The mesh has a 'data' axis and, when `fsdp_size > 1`, an 'fsdp' axis (fully sharded data
parallelism). The batch is split over both (every device sees different rows). With an 'fsdp'
axis, the train state (parameters, optimizer moments, EMA) is sharded along it by a rule on
array shapes (`fsdp_partition_spec`): each device of an fsdp group holds 1/fsdp of every large
array; the train step gathers the parameters whole where the model uses them
(`gather_params_fn`) and XLA reduces the gradients back to the shards. Without one, everything
is replicated (plain data parallelism).

Multi-process layout: process `p` holds global batch rows `[p * b, (p + 1) * b)` with
`b = B / num_processes` (what `data.pipeline.train_iterator` yields), so the mesh orders devices
by process index and `global_batch` checks that the rows land where the data says they belong.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"


def create_mesh(devices: Sequence[jax.Device] | None = None, *, fsdp_size: int = 1) -> Mesh:
    """A mesh over `devices` (default: every device of every process).

    Axes: ('data',) of size N, or ('data', 'fsdp') of shape (N / fsdp_size, fsdp_size) when
    `fsdp_size > 1`. Devices are ordered by process index (stable within a process), so each
    process's devices hold one contiguous block of the batch.
    """
    devices = list(jax.devices() if devices is None else devices)
    devices.sort(key=lambda d: d.process_index)  # stable: keeps the backend's order per host
    if fsdp_size < 1 or len(devices) % fsdp_size:
        raise ValueError(f"fsdp_size {fsdp_size} must be a positive divisor of {len(devices)}")
    if fsdp_size == 1:
        return Mesh(np.asarray(devices), (DATA_AXIS,))
    grid = np.asarray(devices).reshape(len(devices) // fsdp_size, fsdp_size)
    return Mesh(grid, (DATA_AXIS, FSDP_AXIS))


# Arrays with fewer elements than this stay replicated under FSDP (biases, norm scales, small
# kernels): sharding them saves little memory and costs one collective each.
FSDP_MIN_SIZE = 2**14


def fsdp_size(mesh: Mesh) -> int:
    """The size of the mesh's 'fsdp' axis (1 without one)."""
    return int(dict(mesh.shape).get(FSDP_AXIS, 1))


def fsdp_partition_spec(
    shape: Sequence[int], fsdp: int, min_size: int = FSDP_MIN_SIZE
) -> PartitionSpec:
    """How an array of `shape` is split over an 'fsdp' axis of size `fsdp`.

    Its largest dimension divisible by `fsdp` (the last of equals: a kernel's output features)
    is split; arrays with fewer than `min_size` elements, with no divisible dimension, or
    `fsdp == 1` are replicated (`PartitionSpec()`).
    E.g. fsdp=4: (3, 3, 128, 256) -> P(None, None, None, 'fsdp'); (256,) -> P() (small).
    """
    if fsdp <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return PartitionSpec()
    candidates = [i for i, n in enumerate(shape) if n % fsdp == 0 and n >= fsdp]
    if not candidates:
        return PartitionSpec()
    axis = max(candidates, key=lambda i: (shape[i], i))
    return PartitionSpec(*([None] * axis), FSDP_AXIS)


def state_shardings(tree: Any, mesh: Mesh, min_size: int = FSDP_MIN_SIZE) -> Any:
    """NamedShardings for every leaf of `tree` (arrays or ShapeDtypeStructs, e.g. a TrainState
    or its `jax.eval_shape`): `fsdp_partition_spec` of the leaf's shape on `mesh`, so
    parameters, their Adam moments and their EMA are split alike; all replicated on a mesh
    without an 'fsdp' axis."""
    size = fsdp_size(mesh)
    return jax.tree.map(
        lambda x: NamedSharding(mesh, fsdp_partition_spec(x.shape, size, min_size)), tree
    )


def gather_params_fn(mesh: Mesh) -> Callable[[Any], Any] | None:
    """For `train_state.make_train_step(gather_params=...)`: on a mesh with an 'fsdp' axis,
    constrain the parameters to be whole on every device where the model uses them, so XLA
    all-gathers each split parameter (and reduces its gradient back to the split) instead of
    resharding activations; None without one (the replicated program, unchanged)."""
    if fsdp_size(mesh) == 1:
        return None
    replicated = replicated_sharding(mesh)
    return lambda params: jax.lax.with_sharding_constraint(params, replicated)


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes the batch (leading) dimension is split over, outermost first."""
    return tuple(a for a in (DATA_AXIS, FSDP_AXIS) if a in mesh.axis_names)


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (parameters, optimizer state, RNG keys)."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over the batch axes ('data' [, 'fsdp']); other axes whole."""
    return NamedSharding(mesh, PartitionSpec(batch_axes(mesh)))


def check_divisible_batch(global_batch_size: int, mesh: Mesh, what: str = "batch size") -> None:
    """Raise a one-line ValueError unless the global batch splits evenly over the devices."""
    num_devices = mesh.devices.size
    if global_batch_size <= 0 or global_batch_size % num_devices:
        raise ValueError(
            f"{what} {global_batch_size} does not divide over {num_devices} devices; "
            f"use a positive multiple of {num_devices}"
        )


def _check_process_rows(mesh: Mesh, global_batch_size: int) -> None:
    """Raise unless this process's devices hold rows [p * b, (p + 1) * b) of the batch."""
    b = global_batch_size // jax.process_count()
    indices = batch_sharding(mesh).addressable_devices_indices_map((global_batch_size,))
    rows: set[int] = set()
    for index in indices.values():
        rows.update(range(global_batch_size)[index[0]] if index else range(global_batch_size))
    held = sorted(rows)
    start = jax.process_index() * b
    if held != list(range(start, start + b)):
        raise ValueError(
            f"process {jax.process_index()} holds batch rows {held[:1]}..{held[-1:]} of the mesh "
            f"but reads rows {start}..{start + b - 1}; build the mesh with create_mesh()"
        )


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assemble each process's rows into global arrays sharded along the batch axis.

    local_batch: this process's rows, each (B / num_processes, ...), rows
      [p * B / num_processes, (p + 1) * B / num_processes) of the global batch for process p.
    Returns: the same keys, each a global (B, ...) array with `batch_sharding(mesh)`.
    """
    sharding = batch_sharding(mesh)
    out = {}
    for key, value in local_batch.items():
        value = np.asarray(value)
        global_shape = (value.shape[0] * jax.process_count(), *value.shape[1:])
        if jax.process_count() > 1:
            _check_process_rows(mesh, global_shape[0])
        out[key] = jax.make_array_from_process_local_data(sharding, value, global_shape)
    return out


def host_to_global(value: Any, sharding: jax.sharding.Sharding) -> jax.Array:
    """A global array from a numpy value that every process holds whole (host-replicated).

    value: the full global array (same on every process), e.g. sample ids (B,) or a PRNG key.
    Each process places only the slices its own devices hold, so this works whether or not
    `sharding` spans other processes' devices (where `jax.device_put` of a local array cannot).
    """
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def to_host(x: jax.Array) -> np.ndarray:
    """The whole value of a (possibly multi-process) global array as numpy, on every process.

    Collective when `x` spans several processes: every process must call it.
    """
    if x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(jax.device_get(x))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def any_process(flag: bool) -> bool:
    """True on every process if `flag` is True on any process (e.g. "SIGTERM received").

    Collective when there are several processes: all must call it at the same point, so that
    they all take the same branch (one process stopping alone would deadlock the others).
    """
    if jax.process_count() == 1:
        return bool(flag)
    return bool(np.asarray(multihost_utils.process_allgather(np.asarray(flag))).any())


def _env_int(name: str) -> int:
    try:
        return int(os.environ.get(name, "1"))
    except ValueError:
        return 1


def environment_requests_distributed() -> bool:
    """True when the environment describes a multi-process run JAX can join with no arguments.

    - SLURM: `srun` with more than one task (SLURM_JOB_ID, SLURM_NTASKS > 1, SLURM_PROCID, ...).
    - Open MPI: `mpirun -np N` with N > 1 (OMPI_MCA_orte_hnp_uri, OMPI_COMM_WORLD_SIZE > 1).
    - Cloud TPU: a multi-host slice on GKE (TPU_WORKER_HOSTNAMES / TPU_PROCESS_ADDRESSES with
      more than one host) or multislice (MEGASCALE_COORDINATOR_ADDRESS).
    - JAX_COORDINATOR_ADDRESS set (JAX's own variable; the launcher must be one JAX detects).
    A single-task job (e.g. an interactive `srun -n1`) does not count.
    """
    env = os.environ
    slurm = all(
        k in env for k in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID")
    )
    if slurm and _env_int("SLURM_NTASKS") > 1:
        return True
    if "OMPI_MCA_orte_hnp_uri" in env and _env_int("OMPI_COMM_WORLD_SIZE") > 1:
        return True
    for hosts in ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES"):
        if "," in env.get(hosts, ""):
            return True
    return "MEGASCALE_COORDINATOR_ADDRESS" in env or "JAX_COORDINATOR_ADDRESS" in env


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    coordinator_bind_address: str | None = None,
) -> bool:
    """Join a multi-process JAX run when asked to, before any other JAX call.

    - Any argument given: `jax.distributed.initialize(coordinator_address, num_processes,
      process_id)`; JAX fills the missing ones from a SLURM / Open MPI / TPU environment, or
      raises ValueError naming what is missing. E.g. on each of two hosts:
      `initialize_distributed('10.0.0.1:1234', 2, 0)` and `(..., 2, 1)`.
    - No argument: initialize with JAX's cluster auto-detection when
      `environment_requests_distributed()` (SLURM with several tasks, mpirun, multi-host TPU),
      else do nothing: a plain single-process run (one CPU, one or several local GPUs).
    On a Cloud TPU VM pod slice launched with `gcloud ... ssh --worker=all`, pass
    `num_processes` (the number of hosts) to force the call; JAX reads the coordinator and
    process id from the TPU metadata server.

    The coordinator (process 0) listens on `coordinator_bind_address`, else on
    $JAX_COORDINATOR_BIND_ADDRESS, else, when `coordinator_address` is given, on that address
    only (JAX alone would listen on every interface, `[::]:PORT`): pass e.g. '0.0.0.0:PORT'
    when the coordinator address is not one of process 0's own (a NAT or load-balancer
    address). With auto-detection JAX's default stands.

    Returns True if this process is (now) part of a distributed run, False if single-process.
    Calling it again after a successful initialization is a no-op that returns True.

    Raises:
      RuntimeError: JAX computations already ran in this process (initialize must come first).
      ValueError: arguments JAX cannot complete from the environment.
    """
    if jax.distributed.is_initialized():
        return True
    explicit = (coordinator_address, num_processes, process_id) != (None, None, None)
    if not explicit and not environment_requests_distributed():
        return False
    if coordinator_bind_address is None and coordinator_address is not None:
        coordinator_bind_address = os.environ.get("JAX_COORDINATOR_BIND_ADDRESS") or (
            coordinator_address
        )
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        coordinator_bind_address=coordinator_bind_address,
    )
    return True
