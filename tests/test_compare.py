"""dpost.compare's statistics and tables from hand-made runs (results.json documents and predictions
files in tmp_path; no model runs): paired intervals by seed and question, the ordering verdict, the
per-iteration diagnostics and the mechanism lines, and one-line errors for bad predictions."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from etils import epath

from dpost import compare, reports, stats

T_975_2 = 4.3026527  # Student t quantile t_{0.975, 2} (tables)
SEEDS = (0, 1, 2)
QUESTIONS = [f"test-{i}" for i in range(5)]
# final models' correctness per seed on the 5 test questions
CORRECT = {
    "sft": [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]],  # 20, 40, 0 %
    "st": [[1, 1, 0, 0, 0], [1, 1, 1, 1, 0], [1, 0, 0, 0, 0]],   # 40, 80, 20 %
    "dpo_st": [[1, 1, 0, 0, 0], [1, 1, 1, 1, 0], [1, 0, 0, 0, 0]],
}
FINAL = {"sft": 0, "st": 2, "dpo_st": 2}  # final model sft_<k>


def sampled(model, n, pass_at_1, pass_at_n, with_correct):
    return {"model": model, "num_samples": n, "questions": 100, "pass_at_1": pass_at_1, "pass_at_n": pass_at_n,
            "questions_with_correct": with_correct}


def stages_of(method: str, i: int) -> list[dict]:
    """Stages of seed index i: iteration 1 with diagnostics (per-seed values below), iteration 2 without."""
    def entry(iteration, kind, acc, **fields):
        return {"iteration": iteration, "stage": kind, "model": f"{kind}_{iteration}", "seconds": 1.0, "flops": 1.0,
                "eval": {"test": {"accuracy": acc, "n": len(QUESTIONS)}}, **fields}

    final_acc = float(np.mean(CORRECT[method][i]))
    if method == "sft":
        return [entry(0, "sft", final_acc)]
    out = [entry(0, "sft", 0.3)]
    if method == "dpo_st":
        out.append(entry(1, "dpo", 0.3, pairs=[80, 90, 100][i], sampled=sampled("sft_0", 5, 0.3, 0.6, 60),
                         dpo_eval={"rewards/accuracies": [0.7, 0.8, 0.9][i], "rewards/margins": [0.1, 0.2, 0.3][i]}))
        out.append(entry(1, "sft", 0.3, pseudo_labels=[115, 125, 150][i], beyond_gold=[15, 25, 50][i],
                         correct_samples=[40, 45, 50][i],
                         sampled=sampled("dpo_1", 3, [0.45, 0.5, 0.55][i], [0.7, 0.8, 0.6][i], [70, 80, 60][i])))
        out.append(entry(2, "dpo", 0.3, pairs=100))
    else:
        out.append(entry(1, "sft", 0.3, pseudo_labels=[110, 120, 130][i], beyond_gold=[10, 20, 30][i],
                         correct_samples=[30, 50, 35][i],
                         sampled=sampled("sft_0", 3, [0.3, 0.4, 0.5][i], [0.5, 0.6, 0.7][i], [50, 60, 70][i])))
    out.append(entry(2, "sft", final_acc, pseudo_labels=140))
    return out


def write_runs(root: epath.Path) -> dict[str, list[dict]]:
    runs = {}
    for method in ("sft", "st", "dpo_st"):
        for i, seed in enumerate(SEEDS):
            stages = stages_of(method, i)
            results = {"config": "c.py", "method": method, "seed": seed, "stages": stages,
                       "final": reports.final_entry(stages)}
            assert results["final"]["model"] == f"sft_{FINAL[method]}"
            rows = [{"id": q, "gold": 1.0, "prediction": 1.0 if c else 2.0, "correct": bool(c), "text": "#### 1"}
                    for q, c in zip(QUESTIONS, CORRECT[method][i])]
            if (method, seed) == ("st", 1):
                rows.reverse()  # pairing must go by question id, not by line
            path = root / method / f"seed_{seed}" / f"iter_{FINAL[method]}" / "eval_sft" / "predictions_test.jsonl"
            path.parent.mkdir(parents=True)
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
            runs.setdefault(method, []).append(results)
    return runs


@pytest.fixture
def compared(tmp_path):
    root = epath.Path(tmp_path)
    runs = write_runs(root)
    text = compare.write_comparison(root, runs, ["sft", "st", "dpo_st"], "test", "c.py")
    return root, runs, text, json.loads((root / "comparison.json").read_text())


def test_paired_intervals_of_every_pair(compared):
    root, _, text, doc = compared
    differences = {(d["a"], d["b"]): d for d in doc["differences"]}
    assert list(differences) == [("st", "sft"), ("dpo_st", "sft"), ("dpo_st", "st")]
    # st - sft per seed: 20, 40, 20 points; mean 26.667, sample variance ((-6.667)^2 * 2 + 13.333^2) / 2
    # = 133.33, half width t_{0.975,2} * sqrt(133.33 / 3) = 4.3026527 * 6.6667 = 28.684
    half = T_975_2 * np.sqrt((2 * (20 / 3) ** 2 + (40 / 3) ** 2) / 2 / 3)
    for pair in (("st", "sft"), ("dpo_st", "sft")):
        t = differences[pair]["t"]
        assert t["mean"] == pytest.approx(80 / 3)
        assert t["low"] == pytest.approx(80 / 3 - half, abs=1e-4)
        assert t["high"] == pytest.approx(80 / 3 + half, abs=1e-4)
        # the bootstrap of the hand-made matrices (seed by seed, question by question) in points
        expected = stats.paired_bootstrap_interval(np.array(CORRECT[pair[0]]), np.array(CORRECT["sft"])).scaled(100)
        assert differences[pair]["bootstrap"] == expected.as_dict()
        assert differences[pair]["verdict"] == stats.pair_verdict(*pair, expected)
        assert differences[pair]["questions"] == 5 and differences[pair]["seeds"] == [0, 1, 2]
    same = differences[("dpo_st", "st")]
    assert (same["bootstrap"]["low"], same["bootstrap"]["high"], same["t"]["low"], same["t"]["high"]) == (0, 0, 0, 0)
    assert same["verdict"] == "no difference"
    assert "| dpo_st - st | +0.0 | [+0.0, +0.0] | [+0.0, +0.0] | 0.0 | no difference |" in text
    # detectable at 80% power: (t_{0.975,2} + t_{0.8,2}) x sd / sqrt(3), t_{0.8,2} = 0.6 / sqrt(0.32)
    detectable = (T_975_2 + 0.6 / np.sqrt(0.32)) * np.sqrt((2 * (20 / 3) ** 2 + (40 / 3) ** 2) / 2 / 3)
    assert differences[("st", "sft")]["detectable"] == pytest.approx(detectable)
    assert f"| {detectable:.1f} | st > sft |" in text or f"| {detectable:.1f} | no difference |" in text
    assert "| st - sft | +26.7 | " in text and f"| [{80 / 3 - half:+.1f}, {80 / 3 + half:+.1f}] |" in text
    assert "bootstrap over seeds and questions (10,000 resamples, RNG seed 0)" in text
    assert doc["intervals"]["primary"] == "bootstrap over seeds and questions"
    assert (root / "comparison.md").read_text() == text
    assert (root / "accuracy.png").exists()


def test_ordering_verdict(compared):
    _, _, text, doc = compared
    assert doc["ordering"]["chain"] == ["dpo_st", "st", "sft"]
    assert doc["ordering"]["holds"] is False
    assert doc["ordering"]["text"].startswith(
        "Ordering dpo_st > st > sft: does not hold. dpo_st vs st: no difference, +0.0 points, "
        "95% CI [+0.0, +0.0] contains zero; ")
    assert doc["ordering"]["text"] in text


def test_diagnostics_mean_over_seeds_and_mechanism(compared):
    _, _, text, doc = compared
    table = text[text.index("| method | iteration | trains |"):].splitlines()
    assert table[2:8] == [
        "| st | 1 | sft_1 | sft_0 | 3 | 40.0 | 60.0 | 60 |  | 38.3 |  |  |  | 120 | 20 |  |  |",
        "| st | 2 | sft_2 |  |  |  |  |  |  |  |  |  |  | 140 |  |  |  |",
        "| dpo_st | 1 | dpo_1 | sft_0 | 5 | 30.0 | 60.0 | 60 | 90 |  |  |  |  |  |  | 80.0 | 0.200 |",
        "| dpo_st | 1 | sft_1 | dpo_1 | 3 | 50.0 | 70.0 | 70 |  | 45 |  |  |  | 130 | 30 |  |  |",
        "| dpo_st | 2 | dpo_2 |  |  |  |  |  | 100 |  |  |  |  |  |  |  |  |",
        "| dpo_st | 2 | sft_2 |  |  |  |  |  |  |  |  |  |  | 140 |  |  |  |",
    ]
    # pass@n dpo_st - st per seed: +20, +20, -10 points; correct samples +10, -5, +15; beyond gold +5, +5, +20
    assert doc["mechanism"] == [
        "- iteration 1, dpo_st minus st: pass@n +10.0 points (higher in 2 of 3 seeds), "
        "correct samples (pooled) +6.7 (higher in 2 of 3 seeds), "
        "pseudo-labels beyond gold +10.0 (higher in 3 of 3 seeds)",
        "- iteration 2, dpo_st minus st: not recorded in results.json (older runs)",
    ]
    assert "\n".join(doc["mechanism"]) in text


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.unlink(), "missing"),
    (lambda p: p.write_text(p.read_text() + "{not json\n"), "predictions_test.jsonl:6: not a prediction row"),
    (lambda p: p.write_text("".join(p.read_text().splitlines(True)[:4])), "4 questions, but results.json says"),
    (lambda p: p.write_text(p.read_text().replace("test-4", "test-9")), "questions differ from those of"),
])
def test_bad_predictions_are_refused_by_name(tmp_path, damage, message):
    root = epath.Path(tmp_path)
    runs = write_runs(root)
    damage(root / "dpo_st" / "seed_2" / "iter_2" / "eval_sft" / "predictions_test.jsonl")
    with pytest.raises((ValueError, FileNotFoundError), match=message) as err:
        compare.write_comparison(root, runs, ["sft", "st", "dpo_st"], "test", "c.py")
    assert "dpo_st/seed_2/iter_2/eval_sft/predictions_test.jsonl" in str(err.value)
    assert not (root / "comparison.json").exists() and not (root / "comparison.md").exists()


def test_one_seed_has_a_bootstrap_interval_but_no_t_interval(tmp_path):
    root = epath.Path(tmp_path)
    runs = {method: results[:1] for method, results in write_runs(root).items()}
    text = compare.write_comparison(root, runs, ["sft", "st"], "test", "c.py")
    (difference,) = json.loads((root / "comparison.json").read_text())["differences"]
    # seed 0: st - sft is +1 on question test-1 only, so the bootstrap over the 5 questions alone
    expected = stats.paired_bootstrap_interval(np.array(CORRECT["st"][:1]), np.array(CORRECT["sft"][:1])).scaled(100)
    assert difference["bootstrap"] == expected.as_dict()
    assert difference["t"] == {"mean": pytest.approx(20.0), "low": None, "high": None, "method": stats.T_METHOD,
                               "level": 0.95}
    assert difference["detectable"] is None
    assert (f"| st - sft | +20.0 | [{expected.low:+.1f}, {expected.high:+.1f}] | n/a (one seed) | n/a (one seed) |"
            in text)


def t_quantile_2_dof(p: float) -> float:
    """Student t quantile with 2 degrees of freedom, closed form: (2p - 1) / sqrt(2p(1 - p))."""
    return (2 * p - 1) / np.sqrt(2 * p * (1 - p))


def test_level_widens_both_intervals_and_names_itself(tmp_path):
    assert t_quantile_2_dof(0.975) == pytest.approx(T_975_2)
    root = epath.Path(tmp_path)
    runs = write_runs(root)
    text = compare.write_comparison(root, runs, ["sft", "st", "dpo_st"], "test", "c.py", level=0.975)
    doc = json.loads((root / "comparison.json").read_text())
    st_sft = doc["differences"][0]
    assert (st_sft["a"], st_sft["b"]) == ("st", "sft")
    # per seed +20, +40, +20 points (test_paired_intervals_of_every_pair), now with t_{0.9875, 2}
    half = t_quantile_2_dof(0.9875) * np.sqrt((2 * (20 / 3) ** 2 + (40 / 3) ** 2) / 2 / 3)
    assert (st_sft["t"]["low"], st_sft["t"]["high"]) == (pytest.approx(80 / 3 - half), pytest.approx(80 / 3 + half))
    replicates = 100 * stats.bootstrap_differences(np.array(CORRECT["st"]), np.array(CORRECT["sft"]))
    low, high = np.percentile(replicates, [1.25, 98.75])
    assert (st_sft["bootstrap"]["low"], st_sft["bootstrap"]["high"]) == (pytest.approx(low), pytest.approx(high))
    assert st_sft["bootstrap"]["level"] == st_sft["t"]["level"] == doc["intervals"]["level"] == 0.975
    assert "| difference | mean | bootstrap 97.5% CI | t 97.5% CI | detectable | verdict |" in text
    assert st_sft["detectable"] == pytest.approx(half / t_quantile_2_dof(0.9875) * (t_quantile_2_dof(0.9875)
                                                                                     + t_quantile_2_dof(0.8)))
    assert "Primary interval: 97.5% percentile interval" in text and "also the 97.5% paired t interval" in text
    assert "97.5% CI [+0.0, +0.0] contains zero" in doc["ordering"]["text"]


def run_compare(*args) -> subprocess.CompletedProcess:
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "dpost.compare", "--config", "configs/arith_tiny.py", *args],
                          cwd=repo, capture_output=True, text=True, timeout=300, env=env)


def test_report_only_pools_finished_runs_and_refuses_an_unfinished_one(tmp_path):
    root = epath.Path(tmp_path) / "pooled"
    runs = write_runs(root)
    for method, results_list in runs.items():
        for results in results_list:
            (root / method / f"seed_{results['seed']}" / "results.json").write_text(json.dumps(results))
    expected = compare.write_comparison(epath.Path(tmp_path) / "pooled", runs, ["sft", "st", "dpo_st"], "test",
                                        "configs/arith_tiny.py", level=0.975)
    (root / "comparison.md").unlink()
    proc = run_compare("--report_only", "--level=0.975", "--seeds=0,1,2", f"--workdir={root}")
    assert proc.returncode == 0, proc.stderr
    assert (root / "comparison.md").read_text() == expected
    assert not (root / "st" / "seed_0" / "compare.log").exists()  # nothing ran

    (root / "comparison.md").unlink()
    (root / "dpo_st" / "seed_2" / "results.json").unlink()
    proc = run_compare("--report_only", "--seeds=0,1,2", f"--workdir={root}")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"dpost.compare: error: {root / 'dpo_st' / 'seed_2' / 'results.json'}: missing (that run has not finished; "
        "--report_only trains nothing)"], proc.stderr
    assert not (root / "comparison.md").exists()


def test_report_only_refuses_a_run_filed_under_another_seed(tmp_path):
    root = epath.Path(tmp_path)
    runs = write_runs(root)
    for method, results_list in runs.items():
        for results in results_list:
            (root / method / f"seed_{results['seed']}" / "results.json").write_text(json.dumps(results))
    (root / "st" / "seed_1" / "results.json").write_text(json.dumps(runs["st"][2]))
    with pytest.raises(ValueError, match=r"st/seed_1/results.json: a run of st seed 2, not of st seed 1$"):
        compare.read_finished_runs(root, ["sft", "st"], [0, 1, 2])


def test_level_outside_zero_and_one_is_refused(tmp_path):
    proc = run_compare("--report_only", "--level=1.5", f"--workdir={tmp_path / 'cmp'}")
    assert proc.returncode != 0
    assert "--level must lie between 0 and 1" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "cmp").exists()


def test_protocol_models_leave_the_replicates_out(tmp_path):
    """Runs whose last stage was retrained (eval.final_replicates): by default each st run counts as
    the mean of its two models; with --protocol_models as its own last model alone, which gives the
    tables of the same runs without replicates."""
    plain_root, root = epath.Path(tmp_path) / "plain", epath.Path(tmp_path) / "replicated"
    plain = write_runs(plain_root)
    compare.write_comparison(plain_root, plain, ["sft", "st", "dpo_st"], "test", "configs/arith_tiny.py")
    expected = json.loads((plain_root / "comparison.json").read_text())
    runs = write_runs(root)
    for results in runs["st"]:  # a replicate that answers every question wrong
        run = root / "st" / f"seed_{results['seed']}"
        evaluation = {"test": {"accuracy": 0.0, "n": len(QUESTIONS)}}
        results["final"] = reports.final_entry(results["stages"], [reports.replicate_entry(
            "sft_2_r1", {"seconds": 1.0, "flops": 1.0}, evaluation)])
        path = compare.predictions_path(run, "sft_2_r1", "test")
        path.parent.mkdir(parents=True)
        path.write_text("".join(json.dumps({"id": q, "correct": False}) + "\n" for q in QUESTIONS))
    for method, results_list in runs.items():
        for results in results_list:
            (root / method / f"seed_{results['seed']}" / "results.json").write_text(json.dumps(results))

    proc = run_compare("--report_only", "--seeds=0,1,2", f"--workdir={root}")
    assert proc.returncode == 0, proc.stderr
    averaged = json.loads((root / "comparison.json").read_text())
    st_sft = {(d["a"], d["b"]): d["bootstrap"]["mean"] for d in averaged["differences"]}[("st", "sft")]
    # st's per-seed accuracy halves (40, 80, 20 -> 20, 40, 10 %) against sft's 20, 40, 0 %
    assert st_sft == pytest.approx(np.mean([20 - 20, 40 - 40, 10 - 0]))

    proc = run_compare("--report_only", "--protocol_models", "--seeds=0,1,2", f"--workdir={root}")
    assert proc.returncode == 0, proc.stderr
    protocol = json.loads((root / "comparison.json").read_text())
    assert protocol["differences"] == expected["differences"]
    assert protocol["summary"]["st"]["final"] == expected["summary"]["st"]["final"]
    assert protocol["summary"]["st"]["replicates_left_out"] == 3
    assert "the 3 retrainings of last stages (`eval.final_replicates`) are left out" in \
        (root / "comparison.md").read_text()
