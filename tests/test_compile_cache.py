"""The persistent compilation cache (dpost.compile_cache): where it points, that a second process
reuses a compiled program instead of compiling it (JAX's own cache-hit event) with the same result,
that it never changes a run's config hash, and that a bad value is refused by config_check."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from dpost import compile_cache, config_check, defaults, workdir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One process: enable the cache from a config, compile and run one program, print what happened.
PROGRAM = """
import json, sys
import jax, jax.numpy as jnp, ml_collections
from dpost import compile_cache
events = []
jax.monitoring.register_event_listener(lambda name, **kw: events.append(name))
compile_cache.MIN_COMPILE_SECONDS = 0.0  # cache even this small program
compile_cache.enable(ml_collections.ConfigDict(dict(compilation_cache=sys.argv[1])))
x = jnp.arange(64.0).reshape(8, 8)
y = jax.jit(lambda a: jnp.tanh(a @ a.T / 100.0).sum(axis=0))(x)
print(json.dumps(dict(hits=sum(e == "/jax/compilation_cache/cache_hits" for e in events), y=y.tolist())))
"""


def run_program(setting: str, env: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", PROGRAM, setting], env=env, cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_directory_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv(workdir.CACHE_ENV, str(tmp_path / "root"))
    assert compile_cache.directory("off") is None
    assert compile_cache.directory("auto") == str(tmp_path / "root" / "xla")
    assert compile_cache.directory(str(tmp_path / "mine")) == str(tmp_path / "mine")
    monkeypatch.delenv(workdir.CACHE_ENV)
    assert compile_cache.directory("auto") == os.path.expanduser("~/.cache/dpost/xla")


def test_second_process_hits_the_cache_with_the_same_result(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    where = str(tmp_path / "xla")
    first = run_program(where, env)
    assert first["hits"] == 0 and os.listdir(where), "the first process compiles and writes an entry"
    second = run_program(where, env)
    assert second["hits"] >= 1, "the second process must load the program, not compile it"
    assert second["y"] == first["y"]
    off = run_program("off", env)
    assert off["hits"] == 0 and off["y"] == first["y"]


def test_the_setting_never_changes_a_run_config_hash():
    config = defaults.base_config()
    other = config.copy_and_resolve_references()
    other.compilation_cache = "off"
    assert workdir.config_hash(workdir.flatten_config(config)) == workdir.config_hash(workdir.flatten_config(other))


def test_config_check_refuses_an_empty_setting():
    config = defaults.base_config()
    config.compilation_cache = ""
    problems = config_check.problems(config)
    assert any("'compilation_cache'" in p for p in problems), problems
