"""bench/accelerator.py runs on accelerators only a few sessions ever get: its CPU smoke mode keeps
the script working between those runs (no timing is asserted)."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_accelerator_bench_tiny_prints_its_table(tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "bench", "accelerator.py"), "--tiny", "--stages", "sft,dpo,sample",
           "--remat", "full", "--profile", str(tmp_path)]
    env = dict(os.environ, DPOST_HUGEPAGE_MALLOC="0")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line for line in out.stdout.splitlines() if "(tiny)" in line]
    stages = {(line.split()[0], line.split()[4]) for line in rows}  # model, "(tiny)", params, "M", stage
    assert stages == {(m, s) for m in ("llama-1b", "flan-t5-large") for s in ("sft", "dpo", "sample")}, out.stdout
    traces = [os.path.join(d, f) for d, _, files in os.walk(tmp_path) for f in files if f.endswith(".xplane.pb")]
    assert len(traces) == 6


def test_train_options_bench_dpo_step_prints_each_variant():
    """The DPO mode of bench/train_options.py: one row per variant; remat recomputes the same forward,
    so its trained params differ from the base's by rounding only (the same bits for the base itself)."""
    cmd = [sys.executable, os.path.join(ROOT, "bench", "train_options.py"), "--model", "tiny", "--step", "dpo",
           "--batch", "4", "--prompt", "16", "--target", "16", "--steps", "2", "--variants", "base,remat=full"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("DPO step, tiny"), out.stdout
    rows = {line.split()[0]: line.split() for line in out.stdout.splitlines()[2:]}
    assert set(rows) == {"base", "remat=full"}, out.stdout
    assert float(rows["base"][-1]) == 0.0
    assert float(rows["remat=full"][-1]) < 1e-4, out.stdout


def test_trace_summary_busy_time_is_the_union_of_kernel_intervals():
    """bench/trace_summary.py's idle share rests on this: overlapping kernels count once."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        from trace_summary import busy_ns
    finally:
        sys.path.pop(0)
    assert busy_ns([(20, 25), (0, 10), (5, 12)]) == 17  # [0, 12) and [20, 25)
    assert busy_ns([(0, 10), (2, 3)]) == 10
    assert busy_ns([]) == 0
