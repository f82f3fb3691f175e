"""Training tests: cheaper XLA CPU compilation.

These tests compile a few dozen small programs; on CPU, LLVM's optimisation passes dominate their
run time. Unless DPOST_TEST_FAST_COMPILE=0, add flags that skip the expensive passes (about 3x
faster compiles; numerics are unchanged: the flags only change code generation). They take
effect only if no JAX backend exists yet when this file is collected; child processes started by
the tests set them explicitly.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import training_helpers as th  # noqa: E402


def _backend_initialised() -> bool:
    xb = sys.modules.get("jax._src.xla_bridge")
    return bool(getattr(xb, "_backends", None))


if os.environ.get("DPOST_TEST_FAST_COMPILE", "1") != "0" and not _backend_initialised():
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_backend_optimization_level" not in flags:
        os.environ["XLA_FLAGS"] = (flags + " " + th.FAST_COMPILE_FLAGS).strip()


# test-module name fragment -> background job (see training_helpers.start_job)
_BACKGROUND = {"test_training_sharded": "sharded", "test_resume_after_kill": "resume"}


def pytest_collection_modifyitems(session, config, items):
    """Start the child-process checks now, so they overlap the in-process tests, and move the
    tests that wait for them to the end of the session."""
    if os.environ.get("DPOST_TEST_BACKGROUND", "1") == "0" or config.option.collectonly:
        return  # nothing runs on --collect-only, so nothing starts
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return  # every xdist worker collects every test: each job starts when its test asks for it
    waiting = [item for item in items if any(f in item.nodeid for f in _BACKGROUND)]
    for fragment, job in sorted(_BACKGROUND.items(), key=lambda kv: kv[1] != "resume"):
        if any(fragment in item.nodeid for item in waiting):
            th.start_job(job)
    if waiting:
        items[:] = [item for item in items if item not in waiting] + waiting
