#!/usr/bin/env bash
# Issue 15's GPU measurements as one device call (about 7 minutes on one H200): the training steps'
# MFU with the einsum and the fused (cuDNN) attention, at 8 sequences and at the batch where the
# targets are met, step options side by side, and the sampler against the HBM bound: its kernel
# profile by source op, a run without XLA's command buffers, then T5's profile if time is left.
# Output: $OUT (default /tmp/gpu_suite)/all.log, and the tables in $OUT/summary.txt.
#
#     bash bench/gpu_suite.sh            # on the GPU host, from the repository root
#     SMOKE=1 bash bench/gpu_suite.sh    # tiny shapes on CPU: checks the script itself (~3 minutes)
#
# Runs are ordered by what matters most; every run has a time limit, and all of them together end
# before DEADLINE seconds (default 480), so a cut-short call still returns the earlier tables.
set -u
OUT=${OUT:-/tmp/gpu_suite}
DEADLINE=${DEADLINE:-480}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
start=$SECONDS

if [ -n "${SMOKE:-}" ]; then
  SIZE=(--tiny); OPTS=(--model tiny --dtype float32 --batch 4 --prompt 16 --target 16 --steps 2)
else
  SIZE=(); OPTS=(--model llama-1b --dtype bfloat16 --batch 16 --prompt 256 --target 384 --steps 3)
fi

run() {  # run NAME LIMIT_SECONDS COMMAND...: output to $OUT/all.log, table lines to $OUT/summary.txt
  local name=$1 limit=$2; shift 2
  local left=$((DEADLINE - (SECONDS - start))) log=/tmp/gpu_suite_$name.log
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 20 ]; then echo "== $name: skipped (deadline)" | tee -a "$OUT/summary.txt"; return 124; fi
  echo "== $name (limit ${limit}s, at $((SECONDS - start))s): $*" | tee -a "$OUT/summary.txt"
  timeout "$limit" "$@" >"$log" 2>&1
  local rc=$?
  { echo "== $name: $*"; cat "$log"; } >>"$OUT/all.log"
  grep -E '^(model|-----|llama|flan|variant|attention|SFT|DPO|device|/device|  (llama|flan| +[0-9]))|cuDNN refused' "$log" | tee -a "$OUT/summary.txt"
  [ "$rc" -ne 0 ] && tail -n 5 "$log" | tee -a "$OUT/summary.txt"
  echo "exit $rc after $((SECONDS - start))s" | tee -a "$OUT/summary.txt"
  return $rc
}

{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
  "$PY" -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
  git rev-parse HEAD 2>/dev/null; } | tee "$OUT/summary.txt"
ACC=("$PY" bench/accelerator.py "${SIZE[@]}")

# before: today's defaults (einsum attention), every stage of both models
run einsum 170 "${ACC[@]}" --attention einsum
# after: the fused attention (cuDNN flash attention on GPU), one model at a time; where it fails,
# that model's later runs measure einsum
L=fused; T=fused
run fused_llama 60 "${ACC[@]}" --attention fused --stages sft,dpo --models llama-1b || L=einsum
run fused_t5 70 "${ACC[@]}" --attention fused --stages sft,dpo --models flan-t5-large || T=einsum
# the batch where issue 15's MFU targets are met (BENCHMARKS.md, run 7): remat=dots, 32 / 64 sequences
run llama_b32_dots 60 "${ACC[@]}" --attention $L --stages sft,dpo --models llama-1b --batch 32 --remat dots
run t5_b64_dots 70 "${ACC[@]}" --attention $T --stages sft,dpo --models flan-t5-large --batch 64 --remat dots
# step options at 16 sequences (llama-1b): einsum first, so the loss and max |dparam| columns say how
# far the fused (cuDNN) step's numbers are from it; then remat policies, unrolled layers, bf16 moment
run options 150 "$PY" bench/train_options.py "${OPTS[@]}" \
  --variants attention=einsum+remat=dots,attention=$L+remat=dots,attention=$L+remat=full,attention=$L+remat=dots+scan_layers=0,attention=$L+remat=dots+moments=bfloat16
# where a decode call's GPU time goes (kernels, busy, idle; each XLA kernel and library call mapped to
# its HLO instruction's source op through the run's HLO dump), then the sampler without XLA's
# command buffers
XLA_FLAGS="${XLA_FLAGS:-} --xla_dump_to=/tmp/gpu_suite_hlo --xla_dump_hlo_as_text" \
  run sample_profile 60 "${ACC[@]}" --stages sample --models llama-1b --profile /tmp/gpu_suite_trace
run trace_summary 40 "$PY" bench/trace_summary.py /tmp/gpu_suite_trace --top 15 --hlo /tmp/gpu_suite_hlo
XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer=" \
  run sample_nocmdbuf 60 "${ACC[@]}" --stages sample --models llama-1b
# T5's decode is as far from the bound as Llama's with other attention code: its profile too, if time is left
XLA_FLAGS="${XLA_FLAGS:-} --xla_dump_to=/tmp/gpu_suite_hlo_t5 --xla_dump_hlo_as_text" \
  run sample_profile_t5 60 "${ACC[@]}" --stages sample --models flan-t5-large --profile /tmp/gpu_suite_trace_t5
run trace_summary_t5 40 "$PY" bench/trace_summary.py /tmp/gpu_suite_trace_t5 --top 15 --hlo /tmp/gpu_suite_hlo_t5
echo "total $((SECONDS - start))s" | tee -a "$OUT/summary.txt"
