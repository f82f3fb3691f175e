#!/usr/bin/env bash
# Run dpost on a Cloud TPU VM slice (single- or multi-host), resuming after preemption.
#
#   PROJECT=my-proj ZONE=us-central2-b TPU_NAME=dpost-v4-32 ACCELERATOR_TYPE=v4-32 \
#   CONFIG=configs/llama2_7b.py WORKDIR=gs://my-bucket/runs/llama2_7b \
#   launch/tpu_pod.sh [extra dpost.main flags, e.g. --config.iterations=2]
#
# What it does, in a loop until the run finishes:
#   1. create the TPU VM slice if it does not exist (re-create it if it was preempted);
#   2. copy this checkout to every worker and `pip install -e` it there with jax[tpu];
#   3. start `python -m dpost.main --config $CONFIG --workdir $WORKDIR` on all workers at once
#      (jax.distributed.initialize() auto-detects the pod: one process per worker), streaming
#      worker 0's log here; the other workers log to ~/dpost.log on their VM;
#   4. if the slice was preempted (or a worker died), go back to 1: dpost resumes from the
#      checkpoints in $WORKDIR (same workdir = resume), at most MAX_RESTARTS times.
# The workdir must be on GCS (gs://...) so that every worker and every attempt sees it.
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: PROJECT=.. ZONE=.. TPU_NAME=.. ACCELERATOR_TYPE=.. CONFIG=.. WORKDIR=gs://.. launch/tpu_pod.sh [dpost.main flags]

required environment:
  PROJECT           GCP project id
  ZONE              TPU zone, e.g. us-central2-b (v4), us-west4-a (v5e)
  TPU_NAME          name of the TPU VM slice (created if missing, reused otherwise)
  ACCELERATOR_TYPE  e.g. v4-8, v4-32, v5litepod-16
  CONFIG            dpost config, e.g. configs/llama2_7b.py (path inside this checkout)
  WORKDIR           gs://bucket/path: outputs and checkpoints (rerun with the same one to resume)
optional environment:
  RUNTIME_VERSION   TPU VM image (default: tpu-ubuntu2204-base; v5e: v2-alpha-tpuv5-lite)
  SPOT              1: create a spot (preemptible) slice (default 0)
  MAX_RESTARTS      re-creations / restarts after preemption or failure (default 20)
  JAX_PIP           pip requirement for JAX on TPU (default: jax[tpu])
  DPOST_ENV         extra environment for the run, e.g. "DPOST_DATA_DIR=/data HF_HOME=/tmp/hf"
  PLAN              1 (default): print `python -m dpost.memory` for the slice first and stop if it does not fit
  DRY_RUN           1: print the gcloud commands instead of running them
USAGE
}

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then usage; exit 0; fi
missing=()
for var in PROJECT ZONE TPU_NAME ACCELERATOR_TYPE CONFIG WORKDIR; do
  [[ -n "${!var:-}" ]] || missing+=("$var")
done
if (( ${#missing[@]} )); then
  echo "tpu_pod.sh: missing environment: ${missing[*]}" >&2
  usage >&2
  exit 2
fi
if [[ "$WORKDIR" != gs://* ]]; then
  echo "tpu_pod.sh: WORKDIR must be a gs:// path shared by all workers and attempts (got $WORKDIR)" >&2
  exit 2
fi

RUNTIME_VERSION="${RUNTIME_VERSION:-tpu-ubuntu2204-base}"
SPOT="${SPOT:-0}"
MAX_RESTARTS="${MAX_RESTARTS:-20}"
JAX_PIP="${JAX_PIP:-jax[tpu]}"
DPOST_ENV="${DPOST_ENV:-}"
PLAN="${PLAN:-1}"
DRY_RUN="${DRY_RUN:-0}"
EXTRA_ARGS=("$@")
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
GCLOUD=(gcloud compute tpus tpu-vm)
WHERE=(--zone="$ZONE" --project="$PROJECT")

run() {  # run (or, with DRY_RUN=1, print) a command
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '+'; printf ' %q' "$@"; printf '\n'
  else
    "$@"
  fi
}

pod_state() {  # READY | CREATING | PREEMPTED | ... | MISSING
  if [[ "$DRY_RUN" == 1 ]]; then echo MISSING; return; fi
  "${GCLOUD[@]}" describe "$TPU_NAME" "${WHERE[@]}" --format='value(state)' 2>/dev/null || echo MISSING
}

ensure_pod() {
  local state
  state="$(pod_state)"
  case "$state" in
    READY) echo "tpu_pod.sh: reusing $TPU_NAME (READY)";;
    CREATING|STARTING|RESTARTING|REPAIRING)
      echo "tpu_pod.sh: $TPU_NAME is $state; waiting";;
    MISSING|"")
      local spot=()
      [[ "$SPOT" == 1 ]] && spot=(--spot)
      echo "tpu_pod.sh: creating $TPU_NAME ($ACCELERATOR_TYPE, $RUNTIME_VERSION)"
      run "${GCLOUD[@]}" create "$TPU_NAME" "${WHERE[@]}" --accelerator-type="$ACCELERATOR_TYPE" \
        --version="$RUNTIME_VERSION" "${spot[@]}";;
    *)  # PREEMPTED, TERMINATED, STOPPED, ...: a slice cannot be restarted in place
      echo "tpu_pod.sh: $TPU_NAME is $state; deleting and re-creating it"
      run "${GCLOUD[@]}" delete "$TPU_NAME" "${WHERE[@]}" --quiet
      local spot=()
      [[ "$SPOT" == 1 ]] && spot=(--spot)
      run "${GCLOUD[@]}" create "$TPU_NAME" "${WHERE[@]}" --accelerator-type="$ACCELERATOR_TYPE" \
        --version="$RUNTIME_VERSION" "${spot[@]}";;
  esac
  if [[ "$DRY_RUN" != 1 ]]; then
    for _ in $(seq 120); do
      [[ "$(pod_state)" == READY ]] && return 0
      sleep 10
    done
    echo "tpu_pod.sh: $TPU_NAME did not become READY" >&2
    return 1
  fi
}

install_dpost() {  # the same checkout on every worker, installed editable with jax[tpu]
  local tarball="dpost.tar.gz"
  if [[ "$DRY_RUN" == 1 ]]; then
    :
  elif git -C "$REPO_ROOT" rev-parse >/dev/null 2>&1; then
    tarball="$(mktemp -d)/dpost.tar.gz"
    (cd "$REPO_ROOT" && git ls-files -co --exclude-standard -z | tar --null -czf "$tarball" -T -)
  else
    tarball="$(mktemp -d)/dpost.tar.gz"
    tar -C "$REPO_ROOT" --exclude=.git --exclude=runs -czf "$tarball" .
  fi
  run "${GCLOUD[@]}" scp "$tarball" "$TPU_NAME":dpost.tar.gz "${WHERE[@]}" --worker=all
  run "${GCLOUD[@]}" ssh "$TPU_NAME" "${WHERE[@]}" --worker=all --command \
    "set -e; rm -rf ~/dpost && mkdir -p ~/dpost && tar -xzf ~/dpost.tar.gz -C ~/dpost && \
     python3 -m pip install -q -U pip && python3 -m pip install -q -U '$JAX_PIP' && \
     python3 -m pip install -q -e ~/dpost"
}

num_devices() {  # JAX devices of a slice: chips for v4/v5p (megacore: 2 cores per device), cores otherwise
  local n="${ACCELERATOR_TYPE##*-}"
  case "$ACCELERATOR_TYPE" in
    v4-*|v5p-*) echo $((n / 2));;
    *) echo "$n";;
  esac
}

plan_check() {  # the memory plan for the whole slice, on worker 0 (it reads the chip's memory)
  local overrides=""
  for arg in ${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"}; do
    [[ "$arg" == --config.* ]] && overrides+=" $(printf '%q' "$arg")"
  done
  run "${GCLOUD[@]}" ssh "$TPU_NAME" "${WHERE[@]}" --worker=0 --command \
    "cd ~/dpost && python3 -m dpost.memory --config '$CONFIG' --num_devices $(num_devices) --check$overrides"
}

start_run() {  # all workers at once; worker 0 streams, the others log to ~/dpost.log
  local q_args=""
  if (( ${#EXTRA_ARGS[@]} )); then q_args="$(printf ' %q' "${EXTRA_ARGS[@]}")"; fi
  local cmd
  cmd="cd ~/dpost && \
if [ -f ~/dpost.pid ] && kill -0 \$(cat ~/dpost.pid) 2>/dev/null; then kill \$(cat ~/dpost.pid); sleep 5; fi; \
export $DPOST_ENV PYTHONUNBUFFERED=1; \
WID=\$(curl -s -H 'Metadata-Flavor: Google' http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number || echo 0); \
nohup python3 -m dpost.main --config '$CONFIG' --workdir '$WORKDIR'$q_args > ~/dpost.log 2>&1 & echo \$! > ~/dpost.pid; \
if [ \"\$WID\" = 0 ]; then tail -n +1 --pid=\$(cat ~/dpost.pid) -F ~/dpost.log; fi; \
wait \$(cat ~/dpost.pid)"
  run "${GCLOUD[@]}" ssh "$TPU_NAME" "${WHERE[@]}" --worker=all --command "$cmd"
}

attempt=0
installed=""
while :; do
  ensure_pod
  if [[ "$installed" != "$TPU_NAME" ]]; then
    install_dpost
    installed="$TPU_NAME"
    if [[ "$PLAN" == 1 && $attempt == 0 ]]; then
      plan_check || { echo "tpu_pod.sh: the memory plan says the run does not fit this slice (see above)" >&2; exit 1; }
    fi
  fi
  status=0
  start_run || status=$?
  if [[ "$DRY_RUN" == 1 || $status == 0 ]]; then
    echo "tpu_pod.sh: run finished; results in $WORKDIR/results.json"
    exit 0
  fi
  if [[ $status == 2 ]]; then  # dpost.main's exit status for configuration / user errors
    echo "tpu_pod.sh: dpost reported a configuration error (exit 2); not retrying" >&2
    exit 2
  fi
  attempt=$((attempt + 1))
  if (( attempt > MAX_RESTARTS )); then
    echo "tpu_pod.sh: giving up after $MAX_RESTARTS restarts" >&2
    exit 1
  fi
  state="$(pod_state)"
  echo "tpu_pod.sh: run stopped (exit $status, slice $state); restart $attempt/$MAX_RESTARTS resumes from $WORKDIR" >&2
  [[ "$state" == READY ]] || installed=""  # a re-created slice needs dpost installed again
  sleep 30
done
