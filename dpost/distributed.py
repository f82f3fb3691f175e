"""Multi-host: start-up (jax.distributed when the launch environment asks for it) and host-local
meshes for the stages that each host runs on its own devices (sampling)."""

from __future__ import annotations

import logging
import math
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dpost import sharding

log = logging.getLogger(__name__)

# Environment markers of launchers whose topology jax.distributed.initialize() auto-detects.
_AUTO_DETECTED = ("TPU_WORKER_HOSTNAMES", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")


def is_multi_process_env() -> bool:
    if os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0:
        return True
    for var in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        if int(os.environ.get(var, "1") or 1) > 1:
            return True
    return False


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               heartbeat_timeout: int | None = None) -> None:
    """Explicit flags win; otherwise initialise only when a multi-process launcher is detected.

    `heartbeat_timeout` (seconds, JAX's default 100 when None): a process that stops sending
    heartbeats that long (killed, preempted, lost) is declared dead and JAX terminates every other
    process ("the JAX distributed service detected fatal errors"), so survivors exit instead of
    waiting forever in a collective; a collective with a dead peer on CPU (gloo) fails at once.
    """
    explicit = coordinator is not None or num_processes is not None
    options = {} if heartbeat_timeout is None else {"heartbeat_timeout_seconds": int(heartbeat_timeout)}
    if explicit:
        if None in (coordinator, num_processes, process_id):
            raise ValueError("--coordinator, --num_processes and --process_id must be given together")
        if jax.config.jax_platforms in (None, "", "cpu") and not _has_accelerator_env():
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator, num_processes, process_id, **options)
    elif is_multi_process_env():
        jax.distributed.initialize(**options)
    else:
        return
    if jax.process_index() == 0:
        log.info(
            "multi-host: %d processes, %d global devices (%d local), platform %s",
            jax.process_count(), jax.device_count(), jax.local_device_count(), jax.devices()[0].platform,
        )


def _has_accelerator_env() -> bool:
    return bool(os.environ.get("CUDA_VISIBLE_DEVICES") or os.environ.get("TPU_WORKER_HOSTNAMES"))


def is_multi_process() -> bool:
    return jax.process_count() > 1


def describe() -> str:
    return f"{jax.process_index()} of {jax.process_count()}"


def exit_now_if_multi_process(code: int) -> None:
    """A failed process of a multi-process run exits at once, skipping JAX's shutdown barrier (where
    it would wait, up to its 5-minute timeout, for peers blocked in a collective it will never
    join): the peers' next collective then fails at once, and JAX's heartbeat check ends peers that
    are still computing."""
    if is_multi_process():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


# -- agreeing on stopping (preemption) --------------------------------------------------------------

class StopVote:
    """The processes agree on stopping before any collective save: a SIGTERM reaches one host, but
    a checkpoint save is collective, so a host that saved alone would hang the others.

    Each step every process casts its local flag into a max over all devices (one tiny all-reduce,
    dispatched asynchronously behind the step); `decided` returns the previous step's result, so
    reading it waits only for the previous step while this one runs, and every process sees the
    same answer at the same step. One process: the local flag itself, no collective.
    """

    def __init__(self):
        self.multi_process = jax.process_count() > 1
        self._pending = None
        if self.multi_process:
            mesh = Mesh(np.asarray(jax.devices()), ("all",))
            self._flags = NamedSharding(mesh, PartitionSpec("all"))
            self._any = jax.jit(jnp.max, out_shardings=NamedSharding(mesh, PartitionSpec()))

    def decided(self, local: bool, last: bool = False) -> bool:
        """Casts this step's vote; True on every process at the same step once any process voted to
        stop (the previous step's vote; this step's when `last`, the loop's final step)."""
        if not self.multi_process:
            return local
        flags = np.full(jax.local_device_count(), int(local), np.int32)
        vote = self._any(jax.make_array_from_process_local_data(self._flags, flags, (jax.device_count(),)))
        previous, self._pending = self._pending, vote
        if last:
            return bool(vote)
        return previous is not None and bool(previous)


# -- host-local meshes (multi-host sampling) -------------------------------------------------------

def local_mesh_shape(global_shape: dict[str, int], num_local: int) -> dict[str, int]:
    """The mesh one host's devices form alone: `tensor` as in the global mesh (as far as the host
    has devices for it), the rest on `fsdp` when the global mesh shards params over it (a big
    model then stays sharded within the host), else on `data`."""
    tensor = math.gcd(int(global_shape.get("tensor", 1)), num_local)
    rest = num_local // tensor
    if int(global_shape.get("fsdp", 1)) > 1:
        return {"data": 1, "fsdp": rest, "tensor": tensor}
    return {"data": rest, "fsdp": 1, "tensor": tensor}


def host_local_mesh(mesh: Mesh) -> Mesh:
    """This host's devices as a mesh with the global mesh's axis names."""
    return sharding.make_mesh(local_mesh_shape(dict(mesh.shape), jax.local_device_count()), jax.local_devices())


def _all_hosts_mesh(local: Mesh) -> Mesh:
    """Every host's local mesh stacked along a leading `hosts` axis (same device order per host)."""
    grids = [np.asarray(jax.local_devices(process_index=p)).reshape(local.devices.shape)
             for p in range(jax.process_count())]
    return Mesh(np.stack(grids), ("hosts",) + tuple(local.axis_names))


def params_to_host_local(params: Any, local_shardings: Any) -> Any:
    """Params laid out on the global mesh -> a full copy on every host's local mesh.

    One reshard of the global arrays to the layout "replicated over hosts, sharded within a host
    as the local mesh shards it" (an all-gather across hosts; each device then holds 1/local-devices
    of the params, what sampling on the local mesh needs anyway, never a full copy per device); each
    host's part of that layout is then its local array, taken without a copy.
    """
    local = jax.tree.leaves(local_shardings)[0].mesh
    hosts = _all_hosts_mesh(local)
    staged = jax.device_put(params, jax.tree.map(lambda s: NamedSharding(hosts, s.spec), local_shardings))
    return jax.tree.map(
        lambda x, s: jax.make_array_from_single_device_arrays(x.shape, s, [sh.data for sh in x.addressable_shards]),
        staged, local_shardings)


def barrier(name: str) -> None:
    """Every process waits here until all have reached the barrier of the same name."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


# -- per-host rows of global batches ---------------------------------------------------------------

def host_rows(batch: dict) -> dict:
    """This host's contiguous part of a global batch: the rows `jax.make_array_from_process_local_data`
    places on its devices, so the global batch is the same whatever the number of hosts."""
    n = len(next(iter(batch.values()))) // jax.process_count()
    i = jax.process_index()
    return {k: v[i * n : (i + 1) * n] for k, v in batch.items()}


class HostBatches:
    """This host's rows of every global batch of a checkpointable iterator (state passes through)."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return host_rows(next(self.batches))

    def get_state(self):
        return self.batches.get_state()

    def set_state(self, state) -> None:
        self.batches.set_state(state)
