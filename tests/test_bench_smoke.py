"""bench/accelerator.py runs on accelerators only a few sessions ever get: its CPU smoke mode keeps
the script working between those runs (no timing is asserted)."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_accelerator_bench_tiny_prints_its_table(tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "bench", "accelerator.py"), "--tiny", "--stages", "sft,dpo,sample",
           "--remat", "--profile", str(tmp_path)]
    env = dict(os.environ, DPOST_HUGEPAGE_MALLOC="0")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line for line in out.stdout.splitlines() if "(tiny)" in line]
    stages = {(line.split()[0], line.split()[4]) for line in rows}  # model, "(tiny)", params, "M", stage
    assert stages == {(m, s) for m in ("llama-1b", "flan-t5-large") for s in ("sft", "dpo", "sample")}, out.stdout
    traces = [os.path.join(d, f) for d, _, files in os.walk(tmp_path) for f in files if f.endswith(".xplane.pb")]
    assert len(traces) == 6
