"""Launch scripts: syntax (bash -n), usage on missing variables, and the TPU script's command plan."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("launch/tpu_pod.sh", "launch/gpu_host.sh", "launch/slurm.sbatch")
REQUIRED = {
    "launch/tpu_pod.sh": ("PROJECT", "ZONE", "TPU_NAME", "ACCELERATOR_TYPE", "CONFIG", "WORKDIR"),
    "launch/gpu_host.sh": ("CONFIG", "WORKDIR"),
    "launch/slurm.sbatch": ("CONFIG", "WORKDIR"),
}


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in {v for vs in REQUIRED.values() for v in vs}}
    env.update(extra)
    return env


def bash(script, *args, env=None):
    return subprocess.run(["bash", os.path.join(ROOT, script), *args], capture_output=True, text=True,
                          env=env if env is not None else clean_env(), timeout=60, cwd=ROOT)


@pytest.mark.parametrize("script", SCRIPTS)
def test_bash_syntax(script):
    out = subprocess.run(["bash", "-n", os.path.join(ROOT, script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_strict_mode_before_any_command(script):
    lines = [line.strip() for line in open(os.path.join(ROOT, script))]
    code = [line for line in lines if line and not line.startswith("#")]
    assert code[0] == "set -euo pipefail"


@pytest.mark.parametrize("script", SCRIPTS)
def test_missing_variables_print_usage(script):
    out = bash(script)
    assert out.returncode == 2
    assert "missing environment: " + " ".join(REQUIRED[script]) in out.stderr
    assert "usage:" in out.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script):
    out = bash(script, "--help")
    assert out.returncode == 0 and "usage:" in out.stdout


def test_slurm_runs_one_process_per_host():
    text = open(os.path.join(ROOT, "launch/slurm.sbatch")).read()
    assert re.search(r"^#SBATCH --ntasks-per-node=1$", text, re.M)
    assert "srun --ntasks-per-node=1" in text and "-m dpost.main" in text
    # every #SBATCH directive precedes the first command (sbatch stops reading them there)
    first_cmd = text.index("set -euo pipefail")
    assert all(m.start() < first_cmd for m in re.finditer(r"^#SBATCH", text, re.M))


def test_gpu_host_runs_one_process():
    text = open(os.path.join(ROOT, "launch/gpu_host.sh")).read()
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert "jax[cuda12]" in code
    assert code.count("-m dpost.main") == 1 and "srun" not in code and "mpirun" not in code


def test_tpu_dry_run_creates_installs_and_starts_every_worker():
    env = clean_env(PROJECT="proj", ZONE="us-central2-b", TPU_NAME="dpost-test", ACCELERATOR_TYPE="v4-32",
                    CONFIG="configs/llama2_7b.py", WORKDIR="gs://bucket/runs/x", DRY_RUN="1")
    out = bash("launch/tpu_pod.sh", "--config.iterations=2", env=env)
    assert out.returncode == 0, out.stderr
    cmds = [line for line in out.stdout.splitlines() if line.startswith("+ gcloud")]
    assert "tpu-vm create dpost-test" in cmds[0] and "--accelerator-type=v4-32" in cmds[0]
    assert any("tpu-vm scp" in c and "--worker=all" in c for c in cmds)
    install = next(c for c in cmds if "pip" in c)
    assert "--worker=all" in install and "jax\\[tpu\\]" in install
    plan = next(c for c in cmds if "dpost.memory" in c)
    assert "--num_devices\\ 16" in plan and "--check" in plan  # v4-32 = 16 chips
    start = cmds[-1]
    assert "--worker=all" in start and "dpost.main" in start
    assert "gs://bucket/runs/x" in start and "--config.iterations=2" in start


def test_tpu_rejects_local_workdir():
    env = clean_env(PROJECT="p", ZONE="z", TPU_NAME="t", ACCELERATOR_TYPE="v4-8", CONFIG="c", WORKDIR="/tmp/x",
                    DRY_RUN="1")
    out = bash("launch/tpu_pod.sh", env=env)
    assert out.returncode == 2 and "gs://" in out.stderr
