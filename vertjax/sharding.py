"""Devices: the data-parallel mesh, array shardings and multi-host start-up.

Training and evaluation run on a `jax.sharding.Mesh` with one axis, 'data',
over all devices of all processes. Batches are split along it (dimension 0);
parameters and optimiser state follow a per-array rule:

  replicated  every device holds every array (plain data parallelism)
  fsdp        arrays of at least `min_size` elements are split along their
              largest dimension that the data axis divides (ZeRO-3 / FSDP
              style); XLA gathers them where the step needs them whole

A multi-host run (a TPU slice, several GPU machines) is one process per host
joined by `jax.distributed.initialize()`, which must run before anything else
touches JAX. On Cloud TPU it finds the other hosts itself; elsewhere (and in
tests on one CPU machine) the coordinator address, the process count and
this process's id are given explicitly.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
from absl import logging

DATA_AXIS: str = "data"
PARAM_RULES: tuple[str, ...] = ("replicated", "fsdp")


def initialize_distributed(mesh_config: ml_collections.ConfigDict) -> bool:
    """Joins this process to a multi-process run when `mesh_config.distributed`.

    Args:
      mesh_config: `config.mesh`. With `distributed` False nothing happens.
        With `coordinator_address` empty, JAX detects the cluster itself
        (Cloud TPU, SLURM, ...); otherwise `coordinator_address` ('host:port'
        of process 0), `num_processes` and `process_id` are passed on.

    Returns:
      True when `jax.distributed.initialize` ran (or had already run).

    Raises:
      ValueError: an explicit coordinator without a process count and id, or
        with `distributed` False (each process would train alone, all in the
        same workdir).
    """
    if not mesh_config.distributed:
        if mesh_config.coordinator_address:
            raise ValueError(
                f"config.mesh.coordinator_address={mesh_config.coordinator_address!r} is set but "
                "config.mesh.distributed is False; set --config.mesh.distributed=True"
            )
        return False
    if jax.distributed.is_initialized():
        return True
    address = mesh_config.coordinator_address or None
    num_processes = int(mesh_config.num_processes)
    process_id = int(mesh_config.process_id)
    if address is None:
        # Cloud TPU and the other environments JAX knows provide all three.
        jax.distributed.initialize()
    else:
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise ValueError(
                f"config.mesh.coordinator_address={address!r} needs config.mesh.num_processes "
                f">= 1 and 0 <= config.mesh.process_id < num_processes; got num_processes="
                f"{num_processes}, process_id={process_id}"
            )
        jax.distributed.initialize(
            coordinator_address=address, num_processes=num_processes, process_id=process_id
        )
    logging.info(
        "process %d of %d: %d local and %d global device(s)",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return True


def make_mesh(num_data: int = -1, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """A 1-D mesh with axis 'data' over `num_data` devices (-1 or 0 = all).

    Args:
      num_data: devices on the data axis; the first `num_data` of `devices`.
      devices: default `jax.devices()`, i.e. every device of every process.

    Raises:
      ValueError: more devices asked for than exist, or, in a multi-process
        run, fewer than all (every process must own part of the mesh to feed
        its part of the batch).
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices) if num_data in (-1, 0) else num_data
    if not 0 < n <= len(devices):
        raise ValueError(f"config.mesh.data={num_data} but {len(devices)} device(s) are available")
    if jax.process_count() > 1 and n != len(devices):
        raise ValueError(
            f"config.mesh.data={num_data}: a run of {jax.process_count()} processes must use "
            f"all {len(devices)} devices (config.mesh.data=-1)"
        )
    # jax 0.10 makes explicit axes the default; Auto keeps jit's sharding
    # propagation for the convolutions.
    return jax.make_mesh(
        (n,), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,), devices=devices[:n]
    )


def check_batch_size(batch_size: int, mesh: jax.sharding.Mesh, what: str = "batch_size") -> None:
    """ValueError unless the global batch splits evenly over the data axis."""
    n = mesh.shape[DATA_AXIS]
    if batch_size <= 0 or batch_size % n:
        raise ValueError(
            f"config.{what}={batch_size} must be a positive multiple of the {n} device(s) "
            "on the mesh's data axis"
        )


def replicated(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
    """Every device holds the whole array."""
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def data_sharded(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
    """Dimension 0 (the batch) split over the data axis."""
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(DATA_AXIS))


def check_param_rule(rule: str) -> None:
    """ValueError naming the valid rules for an unknown `config.mesh.param_sharding`."""
    if rule not in PARAM_RULES:
        raise ValueError(
            f"config.mesh.param_sharding={rule!r}: expected one of {', '.join(PARAM_RULES)}"
        )


def param_spec(
    shape: Sequence[int], *, rule: str, num_shards: int, min_size: int
) -> jax.sharding.PartitionSpec:
    """The PartitionSpec of one parameter (or optimiser moment) of `shape`.

    Args:
      shape: the array's shape.
      rule: 'replicated' or 'fsdp' (see the module docstring).
      num_shards: size of the data axis.
      min_size: under 'fsdp', smaller arrays stay replicated (splitting a
        bias saves nothing and costs a gather).

    Returns:
      P() (replicated), or P with 'data' at the largest dimension that
      `num_shards` divides (the last such on ties: a convolution's output
      channels rather than its kernel height).
    """
    check_param_rule(rule)
    if rule == "replicated" or num_shards == 1 or math.prod(shape) < min_size:
        return jax.sharding.PartitionSpec()
    best = None
    for axis, size in enumerate(shape):
        if size % num_shards == 0 and (best is None or size >= shape[best]):
            best = axis
    if best is None:
        return jax.sharding.PartitionSpec()
    spec: list[str | None] = [None] * len(shape)
    spec[best] = DATA_AXIS
    return jax.sharding.PartitionSpec(*spec)


def state_shardings(
    tree: Any, mesh: jax.sharding.Mesh, *, rule: str = "replicated", min_size: int = 2**14
) -> Any:
    """A NamedSharding per array leaf of `tree` (a TrainState or its shapes).

    Optimiser moments have their parameters' shapes and so get their
    parameters' shardings; scalars (step, Adam's count) are replicated.
    """
    n = mesh.shape[DATA_AXIS]

    def one(leaf: Any) -> jax.sharding.NamedSharding:
        spec = param_spec(getattr(leaf, "shape", ()), rule=rule, num_shards=n, min_size=min_size)
        return jax.sharding.NamedSharding(mesh, spec)

    return jax.tree.map(one, tree)


def replicated_key(seed: int, mesh: jax.sharding.Mesh) -> jax.Array:
    """A threefry PRNG key made on the mesh, replicated.

    Made inside jit because `jax.device_put` of a typed key onto devices of
    other processes fails in a multi-process run.
    """
    return jax.jit(functools.partial(jax.random.key, seed), out_shardings=replicated(mesh))()
