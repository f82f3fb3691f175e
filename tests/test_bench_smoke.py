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


HLO_DUMP = """\
fused_computation.3 {
  %param_0 = f32[64,8,1,384]{3,2,1,0} parameter(0)
  ROOT %reduce.2 = f32[64,8,1]{2,1,0} reduce(%param_0), metadata={op_name="jit(decode)/while/body/attn/reduce_sum"}
}
ENTRY main {
  %fusion.1172 = f32[64,8,1]{2,1,0} fusion(%p), kind=kInput, calls=%fused_computation.3, metadata={op_name="jit(decode)/while/body/attn/reduce_sum"}
  %custom-call.5 = (bf16[64,5632]{1,0}, s8[0]{0}) custom-call(%a, %b), custom_call_target="__cublas$gemm", metadata={op_name="jit(decode)/while/body/mlp/dot_general"}
}
"""


def test_trace_summary_labels_kernels_with_their_hlo_source_op(tmp_path):
    """--hlo: kernels and XLA Ops events are named after HLO instructions (dots and dashes as
    underscores in kernel names); their time is summed per (shape, source op), others keep their name."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        from trace_summary import by_source, hlo_sources
    finally:
        sys.path.pop(0)
    dump = tmp_path / "module_0001.jit_decode.sm_9.0_gpu_after_optimizations.txt"
    dump.write_text(HLO_DUMP)
    sources = hlo_sources([str(dump)])
    assert sources["fusion_1172"] == ("f32[64,8,1]{2,1,0}", "attn/reduce_sum")
    assert sources["custom_call_5"] == ("(bf16[64,5632]{1,0},", "mlp/dot_general")
    assert sources["reduce_2"] == ("f32[64,8,1]{2,1,0}", "attn/reduce_sum")
    totals = by_source({"fusion_1172": 5, "fusion.1172": 2, "custom-call.5": 7, "sm90_xmma_gemm": 3}, sources)
    assert totals == {("f32[64,8,1]{2,1,0}", "attn/reduce_sum"): 7, ("(bf16[64,5632]{1,0},", "mlp/dot_general"): 7,
                      ("", "sm90_xmma_gemm"): 3}
