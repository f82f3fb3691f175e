"""JAX's persistent compilation cache for dpost's runs.

Every stage builds its own jitted programs (a train step per stage, the sampler's prefill and decode
per prompt bucket, the evaluator's), so JAX's in-memory cache does not carry a program from one
stage, method or seed to the next even when it is the same program. On the CPU default compiling is
a large share of a run (the SFT step alone takes tens of seconds to compile on 2 cores). The on-disk
cache is keyed by the program itself (its HLO, compile options, XLA flags, backend and devices), so
a hit returns the executable an identical compile would have produced: results are bit-identical.

`compilation_cache` (a runtime field: it never changes a run's config hash):
"auto" -> <cache root>/xla, the root being $DPOST_CACHE_DIR, else ~/.cache/dpost (M0's pre-training
cache lives there too); "off"; or a directory (local or gs://). JAX reads the setting at a process's
first compile, so the first run of a process decides it.
"""

from __future__ import annotations

import logging

import jax

from dpost.workdir import absolute, cache_root

log = logging.getLogger(__name__)

OFF = "off"
AUTO = "auto"
# Programs that compile faster than this are not worth a disk round trip.
MIN_COMPILE_SECONDS = 0.5


def directory(setting: str) -> str | None:
    """The cache directory a `compilation_cache` value names, None when off."""
    if setting == OFF:
        return None
    return str(cache_root() / "xla" if setting == AUTO else absolute(setting))


def enable(config) -> None:
    """Points JAX's persistent compilation cache at the directory `config.compilation_cache` names."""
    where = directory(config.compilation_cache)
    if where is None or jax.config.jax_compilation_cache_dir == where:
        return
    jax.config.update("jax_compilation_cache_dir", where)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    log.info("compiled programs cached in %s", where)
