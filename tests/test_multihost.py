"""Multi-host runs simulated on one machine: `python -m dpost.main` as two processes x 2 CPU devices
(gloo collectives, `--coordinator/--num_processes/--process_id`) against one process x 4 devices.

Covers: SIGTERM to one process of two (mid-way through the warm-up SFT) stops both at the same
step with one collective save, and the rerun resumes from it; one process of two killed mid-stage (after its first shard of `iter_1/sample_labels`)
makes the other exit too, non-zero and with a message, instead of hanging; rerunning both with
the same workdir resumes and finishes; the resumed two-process run gives the one-process run's
results.json and final params (to float tolerance, see `test_two_processes_match_one_process`);
every sampling shard is written once, by the host that sampled it. Plus the pure helpers.

The runs are test_driver's TINY run with half the questions (no assertion needs more; the same
pre-training, so a suite run builds M0 once).

Run alone (a few minutes on 2 cores):
    DPOST_DATA_DIR=../shared/data python -m pytest tests/test_multihost.py -q
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import require
from tests.test_driver import REPO, TINY, comparable, load_results

DEVICES = 4
N_TRAIN = 24
SETTINGS = {
    # The 4 devices shard params (FSDP) and batches; each host's 2 then form a local fsdp=2 mesh.
    "mesh.data": 1, "mesh.fsdp": -1,
    # 6 shards of 4 questions per sampling stage: host 0 samples 0, 2, 4 and host 1 samples 1, 3, 5.
    "data.synthetic.n_train": N_TRAIN, "sampling.pairs.shard_questions": 4, "sampling.labels.shard_questions": 4,
    # the warm-up keeps TINY's 6 steps (2 epochs of 3 batches); fewer eval questions
    "sft.batch_size": 8, "data.synthetic.n_dev": 8, "data.synthetic.n_test": 8,
    # The release's DPO (precomputed reference): arith_tiny's in-step reference on this 4-device CPU
    # mesh hung in XLA:CPU's collective rendezvous (devices waiting in different collectives)
    "dpo.reference": "precomputed", "dpo.count": "all", "pairs.rejected": "sample",
}
RUN = [a for a in TINY if a.split("=")[0].removeprefix("--config.") not in SETTINGS] + [
    f"--config.{k}={v}" for k, v in SETTINGS.items()]
HEARTBEAT_S = 10  # a dead process is noticed within this (JAX's default is 100 s)
KILL = {"DPOST_TEST_KILL_AFTER_SHARD": "iter_1/sample_labels:1"}  # process 1 only: os._exit(17)
# process 1 only: SIGTERM to itself after warm-up SFT step 2 of 6 (checkpoints every 2 steps); the
# hosts agree one step later, so both save step 3 (not a regular save step) and exit.
SIGTERM = {"DPOST_TEST_SIGTERM_AFTER_STEP": "2"}
PREEMPTED_STEP = 3
TIMEOUT_S = 420


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def launch(workdir, name: str, num_processes: int, env_for=lambda i: {}) -> list[dict]:
    """Runs `dpost.main` as `num_processes` processes sharing DEVICES CPU devices; waits for all.
    Returns per process: exit code, seconds from start to exit, log text. The runs share dpost's
    persistent compilation cache (conftest's session cache: a rerun reuses the earlier runs' programs)."""
    cmd = [sys.executable, "-m", "dpost.main", "--config", "configs/arith_tiny.py", f"--workdir={workdir}", *RUN]
    port = free_port()
    procs, logs = [], []
    start = time.monotonic()
    try:
        for i in range(num_processes):
            env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES // num_processes}",
                       **env_for(i))
            multi = [f"--coordinator=localhost:{port}", f"--num_processes={num_processes}", f"--process_id={i}",
                     f"--heartbeat_timeout={HEARTBEAT_S}"] if num_processes > 1 else []
            logs.append(open(f"{workdir}-{name}-{i}.log", "w+"))
            procs.append(subprocess.Popen(cmd + multi, cwd=REPO, env=env, stdout=logs[-1], stderr=subprocess.STDOUT))
        ended = {}
        while len(ended) < len(procs) and time.monotonic() - start < TIMEOUT_S:
            for i, p in enumerate(procs):
                if i not in ended and p.poll() is not None:
                    ended[i] = time.monotonic() - start
            time.sleep(0.2)
    finally:
        for p in procs:  # stragglers (a hang is a failure below, never a stuck test run)
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                p.wait()
    out = []
    for i, (p, log) in enumerate(zip(procs, logs)):
        log.seek(0)
        out.append({"rc": p.returncode, "seconds": ended.get(i), "log": log.read()})
        log.close()
    return out


def check_ok(runs: list[dict]) -> None:
    for i, r in enumerate(runs):
        assert r["rc"] == 0, f"process {i} exited {r['rc']}:\n{r['log'][-6000:]}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process x 4 devices; two processes, SIGTERM to process 1 in the warm-up; rerun, process 1
    killed mid-stage; the two rerun."""
    from jax._src.lib import _jax

    require(hasattr(_jax, "make_gloo_tcp_collectives"), "jaxlib with gloo CPU collectives")
    root = tmp_path_factory.mktemp("multihost")
    one, two = root / "one", root / "two"
    reference = launch(one, "reference", 1)
    check_ok(reference)
    preempted = launch(two, "preempted", 2, env_for=lambda i: SIGTERM if i == 1 else {})
    killed = launch(two, "killed", 2, env_for=lambda i: KILL if i == 1 else {})
    results_after_kill = os.path.exists(two / "results.json")
    resumed = launch(two, "resumed", 2)
    return {"one": one, "two": two, "preempted": preempted, "killed": killed, "resumed": resumed,
            "results_after_kill": results_after_kill,
            "times": [r["seconds"] for r in reference + preempted + killed + resumed]}


def test_sigterm_to_one_process_stops_both_at_one_step(runs):
    """Both exit as preempted (128 + SIGTERM) after saving the same step; none saved alone or hung;
    the rerun (the `killed` launch) resumes the warm-up from that step on both processes."""
    for i, r in enumerate(runs["preempted"]):
        assert r["seconds"] is not None, f"process {i} hung:\n" + r["log"][-3000:]
        assert r["rc"] == 128 + signal.SIGTERM, f"process {i} exited {r['rc']}:\n{r['log'][-3000:]}"
        assert re.findall(r"\[iter_0/sft\] preempted: saved step (\d+)", r["log"]) == [str(PREEMPTED_STEP)], r["log"][-3000:]
    for i, r in enumerate(runs["killed"]):
        assert f"[iter_0/sft] resumed from step {PREEMPTED_STEP}" in r["log"], f"process {i}:\n" + r["log"][-3000:]


def test_killed_process_stops_the_other(runs):
    survivor, victim = runs["killed"]
    assert victim["rc"] == 17, victim["log"][-3000:]
    assert survivor["seconds"] is not None, "the surviving process hung:\n" + survivor["log"][-3000:]
    assert survivor["rc"] != 0, survivor["log"][-3000:]
    # it stops within a few heartbeats, not at a 5-minute shutdown timeout, and says why
    assert survivor["seconds"] - victim["seconds"] < 6 * HEARTBEAT_S, runs["times"]
    assert re.search(r"another process stopped|another task died", survivor["log"]), survivor["log"][-3000:]
    assert not runs["results_after_kill"]


def assert_close(ours, ref, path="results"):
    """Equal structure and values; floats to rtol 1e-4."""
    if isinstance(ref, dict):
        assert sorted(ours) == sorted(ref), path
        for k in ref:
            assert_close(ours[k], ref[k], f"{path}.{k}")
    elif isinstance(ref, list):
        assert len(ours) == len(ref), path
        for i, (a, b) in enumerate(zip(ours, ref)):
            assert_close(a, b, f"{path}[{i}]")
    elif isinstance(ref, float):
        assert ours == pytest.approx(ref, rel=1e-4, abs=1e-6), path
    else:
        assert ours == ref, path


def test_two_processes_match_one_process(runs):
    """Not bitwise: cross-process all-reduces run through gloo (another summation order than one
    process's in-process collectives), and each host samples on its own 2 devices (params fsdp=2
    instead of fsdp=4: other partial sums), so log-probs and weights differ in the last bits."""
    check_ok(runs["resumed"])
    assert_close(comparable(load_results(runs["two"])), comparable(load_results(runs["one"])))
    from dpost import models

    import jax

    for stage in ("iter_0/sft", "iter_1/dpo", "iter_1/sft"):
        ours = jax.tree.leaves(models.load(f"orbax:{runs['two'] / stage / 'model'}").params)
        ref = jax.tree.leaves(models.load(f"orbax:{runs['one'] / stage / 'model'}").params)
        assert len(ours) == len(ref)
        for a, b in zip(ours, ref):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5, err_msg=stage)


def test_each_shard_written_once_by_its_host(runs):
    for stage in ("sample_pairs", "sample_labels"):
        names = sorted(n for n in os.listdir(runs["two"] / "iter_1" / stage) if not n.startswith("."))
        assert names == sorted(os.listdir(runs["one"] / "iter_1" / stage))
        ids = [json.loads(line)["id"] for n in names if n.startswith("shard_")
               for line in open(runs["two"] / "iter_1" / stage / n)]
        assert len(ids) == len(set(ids)) == N_TRAIN
    # shard i (log: "shard i+1/6 written") is sampled by process i % 2, in the killed run and the rerun
    for run in ("killed", "resumed"):
        for process, r in enumerate(runs[run]):
            written = [int(k) - 1 for k in re.findall(r"shard (\d+)/6 written", r["log"])]
            assert all(i % 2 == process for i in written), (run, process, written)
    assert any(re.search(r"sample_labels: shard [46]/6 written", r["log"]) for r in runs["resumed"]), \
        "the rerun should have sampled process 1's remaining labels shards"


def test_stop_vote_single_process_is_the_local_flag():
    """One process: no collective, the local flag decides at once (the loop's single-host path)."""
    from dpost.distributed import StopVote

    vote = StopVote()
    assert not vote.multi_process
    assert [vote.decided(f) for f in (False, True, False)] == [False, True, False]
    assert vote.decided(True, last=True)


def test_local_mesh_shape():
    from dpost.distributed import local_mesh_shape

    assert local_mesh_shape({"data": 1, "fsdp": 4, "tensor": 1}, 2) == {"data": 1, "fsdp": 2, "tensor": 1}
    assert local_mesh_shape({"data": 8, "fsdp": 1, "tensor": 1}, 4) == {"data": 4, "fsdp": 1, "tensor": 1}
    assert local_mesh_shape({"data": 1, "fsdp": 8, "tensor": 2}, 4) == {"data": 1, "fsdp": 2, "tensor": 2}
    assert local_mesh_shape({"data": 1, "fsdp": 1, "tensor": 8}, 4) == {"data": 1, "fsdp": 1, "tensor": 4}


def test_host_batches_are_parts_of_the_one_host_batches():
    """Each host's training batch is its contiguous part of the global batch, whatever the number of
    hosts (what make_array_from_process_local_data assembles), so runs match across host counts."""
    from dpost.data.pipeline import make_loader

    items = [{"prompt": np.full(i % 5 + 1, 100 + i, np.int32), "completion": np.arange(i % 7 + 1, dtype=np.int32)}
             for i in range(30)]

    def first(n, **kw):
        loader = make_loader(items, batch_size=8 // kw["shard_count"], pad_id=0, max_prompt_len=64,
                             max_completion_len=64, seed=3, num_epochs=None, **kw)
        batches = [next(loader) for _ in range(n)]
        return [[int(row[m == 1][0]) for row, m in zip(b["prompt"], b["prompt_mask"])] for b in batches]

    one = first(6, shard_index=0, shard_count=1)
    hosts = [first(6, shard_index=i, shard_count=2) for i in range(2)]
    assert [a + b for a, b in zip(*hosts)] == one
