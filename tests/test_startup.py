"""dpost.startup: the entry points re-execute once with glibc malloc on transparent huge pages."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from dpost import startup

from tests.conftest import require

ON = f"{startup.TUNABLE}=1"


@pytest.mark.parametrize("environ, glibc, thp, expected", [
    ({}, (2, 36), True, ON),
    ({"GLIBC_TUNABLES": "glibc.malloc.tcache_count=0"}, (2, 36), True, f"glibc.malloc.tcache_count=0:{ON}"),
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, (2, 36), True, None),  # the user's own choice stands
    ({"GLIBC_TUNABLES": ON}, (2, 36), True, None),  # second start (after the exec): no loop
    ({startup.OPT_OUT: "0"}, (2, 36), True, None),
    ({}, (2, 34), True, None),  # glibc without the tunable
    ({}, None, True, None),  # not glibc
    ({}, (2, 36), False, None),  # THP disabled by the kernel
])
def test_tuned_environment(environ, glibc, thp, expected):
    env = startup.tuned_environment(environ, glibc, thp)
    assert (env and env["GLIBC_TUNABLES"]) == expected
    if env is not None:
        assert {k: v for k, v in env.items() if k != "GLIBC_TUNABLES"} == {
            k: v for k, v in environ.items() if k != "GLIBC_TUNABLES"}


def test_started_as():
    assert startup.started_as(["python", "-u", "-m", "dpost.main", "--config", "x"], "dpost.main")
    assert not startup.started_as(["python", "-m", "pytest", "tests"], "dpost.main")
    assert not startup.started_as(["python", "-m", "dpost.compare"], "dpost.main")
    script = os.path.join("bench", "sampler.py")
    assert startup.started_as(["python", "-X", "dev", script, "--batch", "16"], os.path.abspath(script))
    assert not startup.started_as(["python", "-m", "pytest", "tests"], os.path.abspath(script))


def test_huge_pages_available_reads_the_kernel_mode(tmp_path):
    mode = tmp_path / "enabled"
    mode.write_text("always [madvise] never\n")
    assert startup.huge_pages_available(str(mode))
    mode.write_text("always madvise [never]\n")
    assert not startup.huge_pages_available(str(mode))
    assert not startup.huge_pages_available(str(tmp_path / "missing"))


PROBE = textwrap.dedent("""
    import os, sys
    from dpost import startup
    startup.reexec_with_hugepage_malloc("probe")
    import jax, jax.numpy as jnp
    w = jax.random.normal(jax.random.key(0), (256, 512))
    x = jax.random.normal(jax.random.key(1), (4096, 256))
    grad = jax.jit(jax.grad(lambda w: jnp.tanh(x @ w).sum()))(w)  # temporaries well above 32 MB
    print(os.getpid(), os.environ.get("GLIBC_TUNABLES", ""), sys.argv[1:], grad.tobytes().hex()[:64],
          float(jnp.abs(grad).sum()).hex())
""")


def _run_probe(tmp_path, extra_env):
    (tmp_path / "probe.py").write_text(PROBE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]), **extra_env}
    env.pop("GLIBC_TUNABLES", None)
    out = subprocess.run([sys.executable, "-m", "probe", "--flag", "a b"], env=env, capture_output=True, text=True,
                         timeout=300, check=True)
    return out.stdout.split(" ", 2)


def test_entry_point_reexecutes_itself_and_results_are_bit_identical(tmp_path):
    require(startup.glibc_version() is not None and startup.glibc_version() >= startup.MIN_GLIBC
            and startup.huge_pages_available(), "glibc >= 2.35 with transparent huge pages")
    _, tuned_env, tuned_rest = _run_probe(tmp_path, {})
    _, plain_env, plain_rest = _run_probe(tmp_path, {startup.OPT_OUT: "0"})
    assert tuned_env == ON and plain_env == ""
    assert "['--flag', 'a b']" in tuned_rest  # the command line survives the exec
    assert tuned_rest == plain_rest  # same arithmetic, bit for bit


TRIM_PROBE = textwrap.dedent("""
    from dpost import startup

    def rss_mb():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024

    blocks = [bytearray(4000) for _ in range(50_000)]  # ~200 MB of small, heap-allocated blocks
    keep = blocks[::500]  # a few survivors pin the heap's top, so glibc cannot shrink it by itself
    del blocks
    before = rss_mb()
    released = startup.release_free_heap()
    print(released, before, rss_mb())
""")


def test_release_free_heap_returns_freed_heap_pages(tmp_path):
    require(startup.glibc_version() is not None, "glibc")
    (tmp_path / "trim_probe.py").write_text(TRIM_PROBE)
    out = subprocess.run([sys.executable, str(tmp_path / "trim_probe.py")], capture_output=True, text=True,
                         timeout=120, check=True)
    released, before, after = out.stdout.split()
    assert released == "True"
    assert float(before) - float(after) > 100  # MB given back of the ~200 MB freed
