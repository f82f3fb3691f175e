"""End-to-end runs of `python -m dpost.main` on a tiny arith_tiny configuration (subprocesses).

Covers: each method for one iteration; resume after SIGKILL-style crashes during sampling, DPO and
SFT, one workdir crashed at each in turn (the final results equal an uninterrupted run's, no stage
output duplicated or lost); model.dropout reaches the warm-up; a changed config under an existing
workdir is refused; bad input exits non-zero with a message naming it.

The runs share dpost's persistent compilation cache (`compilation_cache=auto`: $DPOST_CACHE_DIR/xla,
one temporary directory per test session, set in conftest), so each program compiles once per
session rather than once per subprocess; a cached executable is the compiled one.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from etils import epath

from dpost.data import gsm8k

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A few dozen problems, one iteration, short schedules: the whole loop in well under a minute.
TINY = [
    "--config.iterations=1",
    "--config.progress=False",
    "--config.data.synthetic.n_train=48",
    "--config.data.synthetic.n_dev=16",
    "--config.data.synthetic.n_test=16",
    "--config.data.synthetic.max_steps=2",
    "--config.sft.epochs=2",
    "--config.sft.batch_size=16",
    "--config.dpo.steps=4",
    "--config.dpo.batch_size=8",
    "--config.dpo.eval_pairs=8",
    "--config.checkpoint.every_steps=2",
    "--config.sampling.pairs.num_samples=2",
    "--config.sampling.labels.num_samples=2",
    "--config.sampling.pairs.shard_questions=16",
    "--config.sampling.labels.shard_questions=16",
    "--config.sampling.pairs.max_new_tokens=64",
    "--config.sampling.labels.max_new_tokens=64",
    "--config.sampling.eval.max_new_tokens=64",
    "--config.model.logits_chunk=8",  # the chunked vocabulary head through SFT, DPO and resume
    # M0: a few pre-training steps on a small corpus, built once per test session (conftest's cache)
    "--config.pretrain.corpus.n=200",
    "--config.pretrain.max_steps=30",
    "--config.pretrain.batch_size=16",
]


def run_main(workdir, *extra, env=None, check=True):
    cmd = [sys.executable, "-m", "dpost.main", "--config", "configs/arith_tiny.py", f"--workdir={workdir}", *TINY, *extra]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, **(env or {})))
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def load_results(workdir) -> dict:
    with open(os.path.join(workdir, "results.json")) as f:
        return json.load(f)


def comparable(results: dict) -> dict:
    """results.json without wall-clock fields and without whether M0 came from the cache."""
    def strip(obj):
        if isinstance(obj, dict):
            return {k: strip(v) for k, v in obj.items() if k not in ("seconds", "reused")}
        if isinstance(obj, list):
            return [strip(v) for v in obj]
        return obj

    return strip(results)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("ref")
    run_main(workdir, "--config.method=dpo_st")
    return workdir


def test_dpo_st_end_to_end(reference_run):
    results = load_results(reference_run)
    assert results["method"] == "dpo_st"
    assert [(s["iteration"], s["stage"]) for s in results["stages"]] == [(0, "sft"), (1, "dpo"), (1, "sft")]
    dpo, sft1 = results["stages"][1], results["stages"][2]
    assert dpo["pairs"] > 0 and sft1["pseudo_labels"] >= 48  # every gold rationale is a label
    for stage in results["stages"]:  # arith_tiny evaluates the SFT models only (eval.every_stage False)
        if stage["stage"] == "sft":
            assert set(stage["eval"]) == {"dev", "test"} and stage["eval"]["test"]["n"] == 16
        else:
            assert stage["eval"] == {}
        assert stage["flops"] > 0
    assert results["final"]["model"] == "sft_1"
    for name in ("report.md", "accuracy.png", "config.json"):
        assert os.path.exists(os.path.join(reference_run, name)), name
    # DPO used the sampler's log-probs for the reference's own samples.
    with open(os.path.join(reference_run, "iter_1", "dpo", "manifest.json")) as f:
        assert json.load(f)["harvested_reference_logps"] > 0


def test_diagnostics_in_results(reference_run):
    """Each iteration reports its samplers' pass rates and the pseudo-labels beyond gold."""
    dpo, sft1 = load_results(reference_run)["stages"][1:]
    assert dpo["sampled"]["model"] == "sft_0" and dpo["sampled"]["num_samples"] == 2
    assert sft1["sampled"]["model"] == "dpo_1" and sft1["sampled"]["questions"] == 48
    for entry in (dpo, sft1):
        s = entry["sampled"]
        assert 0 <= s["pass_at_1"] <= s["pass_at_n"] <= 1 and s["questions_with_correct"] == round(48 * s["pass_at_n"])
    assert sft1["beyond_gold"] == sft1["pseudo_labels"] - 48
    # Iteration 1 pools one round (DPO_1's samples): its correct samples are pass@1 x n x questions.
    s = sft1["sampled"]
    assert sft1["correct_samples"] == round(s["pass_at_1"] * s["num_samples"] * s["questions"])
    assert sft1["correct_samples"] >= sft1["distinct_samples"] >= sft1["after_dedup"] >= sft1["beyond_gold"]
    assert sft1["cap"] >= 1
    assert {"rewards/accuracies", "rewards/margins"} <= set(dpo["dpo_eval"])
    pretrain = load_results(reference_run)["pretrain"]
    assert pretrain["steps"] == 30 and pretrain["flops"] > 0


def test_label_funnel_script_reads_a_run(reference_run):
    """analysis/label_funnel.py rebuilds the run's labels from its stored samples and config."""
    sys.path.insert(0, os.path.join(REPO, "analysis"))
    try:
        from label_funnel import funnel
    finally:
        sys.path.pop(0)
    method, rows = funnel(epath.Path(reference_run))
    sft1 = load_results(reference_run)["stages"][2]
    assert method == "dpo_st" and list(rows) == [1]
    correct, distinct, after_dedup, beyond_gold, cap, near_gold, near_sample = rows[1]
    assert (correct, distinct, after_dedup, beyond_gold, cap) == tuple(
        sft1[k] for k in ("correct_samples", "distinct_samples", "after_dedup", "beyond_gold", "cap"))
    assert near_gold + near_sample == distinct - after_dedup


def test_answer_only_questions_end_to_end(tmp_path):
    """data.labeled=16: the warm-up trains on 16 gold rationales; sampling covers all 48 questions;
    an answer-only question's labels are its correct samples only, never a gold rationale."""
    run_main(tmp_path, "--config.method=dpo_st", "--config.data.labeled=16")
    with open(os.path.join(tmp_path, "iter_0", "sft", "manifest.json")) as f:
        assert json.load(f)["examples"] == 16
    sampled = load_results(tmp_path)["stages"][1]["sampled"]
    assert sampled["questions"] == 48
    train = {}
    with open(os.path.join(tmp_path, "data", "train.jsonl")) as f:
        for i, line in enumerate(f):
            train[f"train-{i}"] = json.loads(line)
    labels = [json.loads(line) for line in open(os.path.join(tmp_path, "iter_1", "pseudo_labels", "labels.jsonl"))]
    labeled = {f"train-{i}" for i in range(16)}
    assert labeled <= {row["id"] for row in labels}  # every labeled question keeps its gold
    for row in labels:
        if row["id"] not in labeled:
            assert row["target"] != train[row["id"]]["answer"]
            assert gsm8k.is_correct(gsm8k.extract_answer(row["target"]), train[row["id"]]["ans"])
    gold_labels = sum(1 for row in labels if row["id"] in labeled and row["target"] == train[row["id"]]["answer"])
    assert gold_labels == 16
    assert load_results(tmp_path)["stages"][2]["beyond_gold"] == len(labels) - 16


WHOLE_HEAD = "--config.model.logits_chunk=0"  # the other methods compute the whole vocabulary head at once


@pytest.fixture(scope="module")
def st_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("st")
    run_main(workdir, "--config.method=st", WHOLE_HEAD)
    return workdir


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """method=sft with dropout: its warm-up differs from st_run's in model.dropout only."""
    workdir = tmp_path_factory.mktemp("sft")
    run_main(workdir, "--config.method=sft", "--config.model.dropout=0.3", WHOLE_HEAD)
    return workdir


@pytest.mark.parametrize("method,stages", [("sft", [(0, "sft")]), ("st", [(0, "sft"), (1, "sft")])])
def test_other_methods_end_to_end(request, method, stages):
    workdir = request.getfixturevalue(f"{method}_run")
    results = load_results(workdir)
    assert [(s["iteration"], s["stage"]) for s in results["stages"]] == stages
    assert not os.path.exists(os.path.join(workdir, "iter_1", "dpo"))


def test_final_replicates_average_the_last_stage_and_leave_the_protocol_alone(tmp_path, st_run):
    """A finished st run rerun with eval.final_replicates=3: SFT_1 is trained twice more on its labels
    with other seeds and nothing else runs again; the final accuracy and the comparison's
    per-question correctness are the means over the three evaluations."""
    import shutil

    from dpost import compare

    shutil.copytree(st_run, tmp_path, dirs_exist_ok=True)
    manifests = {}
    for root, _, files in os.walk(tmp_path):
        if "manifest.json" in files:
            manifests[os.path.join(root, "manifest.json")] = os.stat(os.path.join(root, "manifest.json")).st_mtime_ns
    run_main(tmp_path, "--config.method=st", WHOLE_HEAD, "--config.eval.final_replicates=3")
    assert {p: os.stat(p).st_mtime_ns for p in manifests} == manifests  # no stage of the run ran again
    results, plain = load_results(tmp_path), load_results(st_run)
    assert comparable(results["stages"]) == comparable(plain["stages"])
    final = results["final"]
    assert final["model"] == "sft_1" and [r["model"] for r in final["replicates"]] == ["sft_1_r1", "sft_1_r2"]
    losses = []
    for name in ("sft", "sft_r1", "sft_r2"):
        with open(os.path.join(tmp_path, "iter_1", name, "manifest.json")) as f:
            manifest = json.load(f)
        assert manifest["examples"] == plain["stages"][1]["pseudo_labels"]  # the same data each time
        losses.append(manifest["final_loss"])
    assert len(set(losses)) == 3  # other seeds: other batch orders
    for split in ("dev", "test"):
        files = [os.path.join(tmp_path, "iter_1", folder, f"predictions_{split}.jsonl")
                 for folder in ("eval_sft", "eval_sft_r1", "eval_sft_r2")]
        per_model = [[json.loads(line)["correct"] for line in open(f)] for f in files]
        want = sum(sum(map(float, rows)) / len(rows) for rows in per_model) / 3
        assert abs(final["eval"][split]["accuracy"] - want) < 1e-12
    root = tmp_path / "cmp"
    (root / "st").mkdir(parents=True)
    os.symlink(tmp_path, root / "st" / "seed_0")
    _, matrices = compare.correctness_matrices(epath.Path(root), {"st": [results]}, "test")
    assert abs(matrices["st"].mean() - final["eval"]["test"]["accuracy"]) < 1e-12
    assert set(matrices["st"].ravel()) <= {0, 1 / 3, 2 / 3, 1}
    assert "mean over it and its 2 replicates" in (tmp_path / "report.md").read_text()


def test_dropout_reaches_the_sft_stage(sft_run, st_run):
    """model.dropout changes the warm-up's training (same config and seed otherwise: the warm-up
    does not depend on the method)."""
    def final_loss(root):
        with open(os.path.join(root, "iter_0", "sft", "manifest.json")) as f:
            return json.load(f)["final_loss"]

    assert abs(final_loss(sft_run) - final_loss(st_run)) > 1e-3


# Each stops a run (exit 17, no clean-up) part-way through a stage of iteration 1, in run order.
CRASHES = {
    "sampling": {"DPOST_TEST_KILL_AFTER_SHARD": "iter_1/sample_pairs:0"},
    "dpo": {"DPOST_TEST_KILL_STAGE": "iter_1/dpo", "DPOST_TEST_KILL_AFTER_STEP": "2"},
    "sft": {"DPOST_TEST_KILL_STAGE": "iter_1/sft", "DPOST_TEST_KILL_AFTER_STEP": "2"},
}


@pytest.fixture(scope="module")
def crashed_run(tmp_path_factory):
    """One workdir crashed in turn during sampling, DPO and SFT (each rerun resumes from the last
    crash and runs into the next), then resumed to the end. Per crash: the killed process, whether
    results.json existed after it, and whether the crashed stage was left unfinished (no manifest)."""
    workdir = tmp_path_factory.mktemp("crashed")
    stage_of = {"sampling": "sample_pairs", "dpo": "dpo", "sft": "sft"}
    crashes = {}
    for name, crash in CRASHES.items():
        killed = run_main(workdir, "--config.method=dpo_st", env=crash, check=False)
        crashes[name] = dict(proc=killed, results=os.path.exists(os.path.join(workdir, "results.json")),
                             finished=os.path.exists(os.path.join(workdir, "iter_1", stage_of[name], "manifest.json")))
    run_main(workdir, "--config.method=dpo_st")
    return workdir, crashes


@pytest.mark.parametrize("crash", CRASHES)
def test_crash_stops_the_run_mid_stage(crashed_run, crash):
    killed = crashed_run[1][crash]
    assert killed["proc"].returncode == 17, killed["proc"].stderr[-3000:]
    assert not killed["results"] and not killed["finished"]


def test_resume_after_crashes_matches_uninterrupted(crashed_run, reference_run):
    workdir = crashed_run[0]
    assert comparable(load_results(workdir)) == comparable(load_results(reference_run))
    # No sampling shard lost or duplicated: the same files, each question once.
    for stage in ("sample_pairs", "sample_labels"):
        ours = sorted(os.listdir(os.path.join(workdir, "iter_1", stage)))
        assert ours == sorted(os.listdir(os.path.join(reference_run, "iter_1", stage)))
        ids = []
        for name in ours:
            if name.startswith("shard_"):
                with open(os.path.join(workdir, "iter_1", stage, name)) as f:
                    ids += [json.loads(line)["id"] for line in f]
        assert len(ids) == len(set(ids)) == 48
    assert not [n for n in os.listdir(workdir) if ".tmp" in n]


def test_rerun_of_finished_run_changes_nothing(reference_run):
    """Rerunning a finished run skips every stage and rewrites the same reports in place."""
    manifests = {}
    for root, _, files in os.walk(reference_run):
        if "manifest.json" in files:
            path = os.path.join(root, "manifest.json")
            manifests[path] = os.stat(path).st_mtime_ns
    before = load_results(reference_run)
    run_main(reference_run, "--config.method=dpo_st")
    assert comparable(load_results(reference_run)) == comparable(before)
    assert {p: os.stat(p).st_mtime_ns for p in manifests} == manifests  # no stage ran again
    assert not [n for n in os.listdir(reference_run) if ".tmp" in n]


def compare_cmd(workdir, *extra):
    return [sys.executable, "-m", "dpost.compare", "--config", "configs/arith_tiny.py", f"--workdir={workdir}",
            "--seeds=0", "--methods=st,dpo_st", "--jobs=2", *TINY, *extra]


def run_compare(workdir, *extra, env=None):
    return subprocess.run(compare_cmd(workdir, *extra), cwd=REPO, capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, **(env or {})))


def state_and_parent(pid) -> tuple[str, int] | None:
    """(state letter, parent pid) of a process from /proc, None once it has gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state, ppid = f.read().rsplit(")", 1)[1].split()[:2]  # after "pid (comm)"
    except (FileNotFoundError, ProcessLookupError):
        return None
    return state, int(ppid)


def is_running(pid) -> bool:
    found = state_and_parent(pid)
    return found is not None and found[0] != "Z"


def child_pids(pid: int) -> list[int]:
    """Live processes whose parent is `pid`."""
    found = {int(e): state_and_parent(e) for e in filter(str.isdigit, os.listdir("/proc"))}
    return [child for child, sp in found.items() if sp is not None and sp[0] != "Z" and sp[1] == pid]


def test_compare_jobs_run_side_by_side_with_the_same_results(tmp_path, reference_run):
    """dpost.compare --jobs 2: the seed's warm-up (as the sft run) first, then st and dpo_st at once in
    worker processes. A worker that dies stops the comparison with one line, so does a SIGTERM to the
    comparison (its workers stop too); the rerun resumes, and dpo_st's results equal a plain
    dpost.main run's. A worker's config error is one line too."""
    killed = run_compare(tmp_path, env={"DPOST_TEST_KILL_STAGE": "iter_1/dpo", "DPOST_TEST_KILL_AFTER_STEP": "2"})
    assert killed.returncode == 2 and "Traceback" not in killed.stderr, killed.stderr[-3000:]
    assert killed.stderr.strip().splitlines()[-1].startswith(
        "dpost.compare: error: dpo_st seed 0: its process died (exit code 17)")

    # A SIGTERM to the comparison alone (`kill PID`) stops its workers too, in one line; the rerun resumes.
    proc = subprocess.Popen(compare_cmd(tmp_path), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("dpost.compare: dpo_st seed 0: started"):
            break
    workers = child_pids(proc.pid)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("dpost.compare: stopped by SIGTERM"), err[-3000:]
    deadline = time.time() + 60
    while any(map(is_running, workers)) and time.time() < deadline:
        time.sleep(0.5)
    assert len(workers) >= 2 and not any(map(is_running, workers)), workers

    proc = run_compare(tmp_path)
    assert proc.returncode == 0, proc.stderr[-6000:]
    started = [line.split(":")[1].strip() for line in proc.stdout.splitlines() if line.endswith("compare.log")]
    assert started == ["sft seed 0", "st seed 0", "dpo_st seed 0"]
    assert comparable(load_results(tmp_path / "dpo_st" / "seed_0")) == comparable(load_results(reference_run))
    st = load_results(tmp_path / "st" / "seed_0")
    assert [(e["iteration"], e["stage"]) for e in st["stages"]] == [(0, "sft"), (1, "sft")]
    assert st["stages"][0] == load_results(tmp_path / "sft" / "seed_0")["stages"][0]  # the shared warm-up
    assert "dpo_st - st" in proc.stdout
    for method in ("sft", "st", "dpo_st"):  # each worker's output went to its run's log
        log = (tmp_path / method / "seed_0" / "compare.log").read_text()
        assert f"dpost.driver: run {tmp_path / method / 'seed_0'}" in log

    proc = run_compare(tmp_path, "--config.dpo.beta=0.5")  # this workdir's runs had beta 0.1
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("dpost.compare: error: sft seed 0: workdir")
    assert "dpo.beta: 0.1 -> 0.5" in proc.stderr


def test_changed_config_is_refused(reference_run):
    proc = run_main(reference_run, "--config.method=dpo_st", "--config.dpo.beta=0.5", check=False)
    assert proc.returncode != 0
    assert "dpo.beta" in proc.stderr and "0.1" in proc.stderr and "0.5" in proc.stderr


def test_unknown_config_field_is_an_error(tmp_path):
    proc = run_main(tmp_path, "--config.dpo.betta=0.5", check=False)
    assert proc.returncode != 0 and "betta" in proc.stderr


def test_malformed_data_line_names_file_and_line(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    good = json.dumps({"question": "Q?", "answer": "1+1=<<1+1=2>>2\n#### 2", "ans": 2})
    (data / "train.jsonl").write_text(good + "\n" + '{"question": "no answer"}\n')
    (data / "dev.jsonl").write_text(good + "\n")
    (data / "test.jsonl").write_text(good + "\n")
    proc = subprocess.run(
        [sys.executable, "-m", "dpost.main", "--config", "configs/arith_tiny.py", f"--workdir={tmp_path / 'w'}",
         "--config.data.source=local", f"--config.data.dir={data}", "--config.model.source=scratch"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode != 0
    assert f"{data / 'train.jsonl'}:2" in proc.stderr and "answer" in proc.stderr
