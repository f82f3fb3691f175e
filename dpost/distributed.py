"""Multi-host start-up: initialise jax.distributed when the launch environment asks for it."""

from __future__ import annotations

import os

import jax
import logging

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


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None) -> None:
    """Explicit flags win; otherwise initialise only when a multi-process launcher is detected."""
    explicit = coordinator is not None or num_processes is not None
    if explicit:
        if None in (coordinator, num_processes, process_id):
            raise ValueError("--coordinator, --num_processes and --process_id must be given together")
        if jax.config.jax_platforms in (None, "", "cpu") and not _has_accelerator_env():
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator, num_processes, process_id)
    elif is_multi_process_env():
        jax.distributed.initialize()
    else:
        return
    if jax.process_index() == 0:
        log.info(
            "multi-host: %d processes, %d global devices (%d local), platform %s",
            jax.process_count(), jax.device_count(), jax.local_device_count(), jax.devices()[0].platform,
        )


def _has_accelerator_env() -> bool:
    return bool(os.environ.get("CUDA_VISIBLE_DEVICES") or os.environ.get("TPU_WORKER_HOSTNAMES"))


def is_main_process() -> bool:
    return jax.process_index() == 0
