"""Host memory under glibc: malloc on transparent huge pages at start-up, and giving the heap that
compiling a program leaves behind back to the kernel.

XLA's CPU runtime mallocs each program's temporaries on every execution (128 MB per step of the
arith_tiny SFT program). Blocks that size are above glibc's mmap threshold (32 MB at most), so
every step maps fresh memory and first-touches it one 4 KiB page at a time: ~33k page faults per
step, about 30% of the step's CPU time spent in the kernel. `GLIBC_TUNABLES=glibc.malloc.hugetlb=1`
(glibc >= 2.35) makes malloc ask for transparent huge pages (`madvise`): 2.28 M -> 0.18 M faults
over 60 steps. The arithmetic is untouched, so results are bit-identical (BENCHMARKS.md, "Host memory").

glibc reads GLIBC_TUNABLES only when a process starts, so `python -m dpost.main`,
`python -m dpost.compare` and the bench/ scripts re-execute themselves once with it set, before any
JAX work. Set DPOST_HUGEPAGE_MALLOC=0 to keep the process as started.

Compiling a train step mallocs ~0.2 GB of small compiler objects; glibc keeps the freed heap mapped,
and the step's own buffers then come from fresh mappings on top of it, so the step's peak resident
memory carries the compiler's. `release_free_heap` (glibc's `malloc_trim`) returns it between the
compile and the first execution (see `dpost.training.steps.Step`).
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from typing import Mapping

TUNABLE = "glibc.malloc.hugetlb"
OPT_OUT = "DPOST_HUGEPAGE_MALLOC"
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"
MIN_GLIBC = (2, 35)  # first glibc with glibc.malloc.hugetlb


def glibc_version() -> tuple[int, int] | None:
    """(major, minor) of the running glibc, None elsewhere (musl, macOS, Windows)."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
        major, minor = version.split(".")[:2]
        return (int(major), int(minor)) if name == "glibc" else None
    except (AttributeError, ValueError, OSError):
        return None


def huge_pages_available(mode_file: str = THP_MODE_FILE) -> bool:
    """Whether the kernel grants transparent huge pages on request ('always' or 'madvise')."""
    try:
        with open(mode_file) as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def tuned_environment(environ: Mapping[str, str], glibc: tuple[int, int] | None, thp: bool) -> dict[str, str] | None:
    """The environment to re-execute with, or None when there is nothing to change."""
    if environ.get(OPT_OUT, "1") == "0" or glibc is None or glibc < MIN_GLIBC or not thp:
        return None
    current = environ.get("GLIBC_TUNABLES", "")
    if TUNABLE in current:  # already set (by us before the exec, or by the user): never loops
        return None
    env = dict(environ)
    env["GLIBC_TUNABLES"] = f"{current}:{TUNABLE}=1" if current else f"{TUNABLE}=1"
    return env


def started_as(orig_argv: list[str], entry: str) -> bool:
    """Whether the command line runs `entry`: `python [options] -m <entry> ...` for a module name,
    `python [options] <entry> ...` for a script path (so re-executing it reruns us, not, say, a
    test runner that imported the module)."""
    if entry.endswith(".py"):
        return any(os.path.abspath(a) == os.path.abspath(entry) for a in orig_argv[1:])
    return any(a == "-m" and b == entry for a, b in zip(orig_argv, orig_argv[1:])) or f"-m{entry}" in orig_argv


def reexec_with_hugepage_malloc(entry: str) -> None:
    """Re-executes the process (same interpreter and command line) with the tunable set, when it was
    started as `entry` (a module name such as "dpost.main", or a script's `__file__`). Returns
    without doing anything where it does not apply; call it before any JAX work.
    """
    argv = list(getattr(sys, "orig_argv", []))  # the command line as typed, interpreter options included
    env = tuned_environment(os.environ, glibc_version(), huge_pages_available())
    if env is None or not started_as(argv, entry):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *argv[1:]], env)


@functools.cache
def _libc():
    return ctypes.CDLL("libc.so.6") if glibc_version() is not None else None


def release_free_heap() -> bool:
    """Returns the malloc heap's free pages to the kernel (glibc's `malloc_trim(0)`); a no-op that
    returns False where the C library is not glibc."""
    libc = _libc()
    return bool(libc is not None and libc.malloc_trim(0))
