#!/usr/bin/env bash
# Run dpost on one multi-GPU host: a single process drives all local GPUs (SPMD over a mesh of them).
#
#   CONFIG=configs/llama2_7b.py WORKDIR=runs/llama2_7b launch/gpu_host.sh [dpost.main flags]
#
# Creates (or reuses) a virtual environment with jax[cuda12] and dpost (editable, from this
# checkout), prints the memory plan for the local GPUs (stops if a stage does not fit), then runs
# `python -m dpost.main`. Rerunning with the same WORKDIR resumes from its checkpoints.
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: CONFIG=configs/X.py WORKDIR=DIR launch/gpu_host.sh [dpost.main flags, e.g. --config.iterations=2]

required environment:
  CONFIG     dpost config, e.g. configs/llama2_7b.py
  WORKDIR    output / checkpoint directory (local, NFS or gs://); the same WORKDIR resumes
optional environment:
  VENV       virtual environment to create or reuse (default: .venv-gpu in this checkout)
  PYTHON     interpreter that creates the venv (default: python3)
  JAX_PIP    pip requirement for JAX (default: jax[cuda12])
  INSTALL    0: skip pip install (environment already set up) (default 1)
  PLAN       0: skip the memory plan check (default 1)
  MEM_FRACTION  XLA_PYTHON_CLIENT_MEM_FRACTION (default 0.95; JAX's own default is 0.75)
  CUDA_VISIBLE_DEVICES  which GPUs to use (default: all)
USAGE
}

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then usage; exit 0; fi
missing=()
for var in CONFIG WORKDIR; do
  [[ -n "${!var:-}" ]] || missing+=("$var")
done
if (( ${#missing[@]} )); then
  echo "gpu_host.sh: missing environment: ${missing[*]}" >&2
  usage >&2
  exit 2
fi

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$REPO_ROOT/.venv-gpu}"
PYTHON="${PYTHON:-python3}"
JAX_PIP="${JAX_PIP:-jax[cuda12]}"
INSTALL="${INSTALL:-1}"
PLAN="${PLAN:-1}"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${MEM_FRACTION:-0.95}"
export PYTHONUNBUFFERED=1

if ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "gpu_host.sh: nvidia-smi not found; is this a GPU host with the NVIDIA driver installed?" >&2
  exit 1
fi
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader

if [[ ! -x "$VENV/bin/python" ]]; then
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
if [[ "$INSTALL" == 1 ]]; then
  "$PY" -m pip install -q -U pip
  "$PY" -m pip install -q -U "$JAX_PIP"
  "$PY" -m pip install -q -e "$REPO_ROOT"
fi
"$PY" -c 'import jax; d = jax.devices(); print(f"jax {jax.__version__}: {len(d)} x {d[0].device_kind}")'

cd "$REPO_ROOT"
if [[ "$PLAN" == 1 ]]; then
  overrides=()
  for arg in "$@"; do
    [[ "$arg" == --config.* ]] && overrides+=("$arg")
  done
  "$PY" -m dpost.memory --config "$CONFIG" --check ${overrides[@]+"${overrides[@]}"}
fi
exec "$PY" -m dpost.main --config "$CONFIG" --workdir "$WORKDIR" "$@"
