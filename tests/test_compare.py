"""dpost.compare's statistics and tables from hand-made runs (results.json documents and predictions
files in tmp_path; no model runs): paired intervals by seed and question, the ordering verdict, the
per-iteration diagnostics and the mechanism lines, and one-line errors for bad predictions."""

from __future__ import annotations

import json

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
    assert "| dpo_st - st | +0.0 | [+0.0, +0.0] | [+0.0, +0.0] | no difference |" in text
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
    assert difference["t"] == {"mean": pytest.approx(20.0), "low": None, "high": None, "method": stats.T_METHOD}
    assert f"| st - sft | +20.0 | [{expected.low:+.1f}, {expected.high:+.1f}] | n/a (one seed) |" in text
