"""report.md's per-iteration sampling diagnostics, rendered from hand-made results.json documents."""

from __future__ import annotations

import pytest
from etils import epath

from dpost import reports


def stage(iteration, kind, model, test_acc, **fields):
    return {"iteration": iteration, "stage": kind, "model": model, "seconds": 1.0, "flops": 2.0,
            "eval": {"test": {"accuracy": test_acc, "n": 100}}, **fields}


def dpo_st_results() -> dict:
    stages = [
        stage(0, "sft", "sft_0", 0.40),
        stage(1, "dpo", "dpo_1", 0.42, pairs=812,
              sampled={"model": "sft_0", "num_samples": 5, "questions": 1000, "pass_at_1": 0.43, "pass_at_n": 0.71,
                       "questions_with_correct": 710},
              dpo_eval={"rewards/accuracies": 0.875, "rewards/margins": 0.3, "loss": 0.5}),
        stage(1, "sft", "sft_1", 0.45, pseudo_labels=1234, beyond_gold=234, correct_samples=1500, distinct_samples=1300,
              after_dedup=600, cap=3,
              sampled={"model": "dpo_1", "num_samples": 3, "questions": 1000, "pass_at_1": 0.5, "pass_at_n": 0.755,
                       "questions_with_correct": 755}),
    ]
    return {"config": "configs/x.py", "method": "dpo_st", "seed": 0, "stages": stages,
            "final": reports.final_entry(stages)}


HEADER = ("| iteration | trains | samples from | n | pass@1 % | pass@n % | questions with a correct sample | pairs "
          "| correct samples | distinct | after de-dup | cap | pseudo-labels | beyond gold | DPO reward acc % "
          "| DPO reward margin |")


def test_report_shows_sampling_diagnostics_per_iteration():
    text = reports.markdown_report(dpo_st_results())
    assert "## Sampling diagnostics per iteration" in text
    table = text[text.index(HEADER):].splitlines()
    assert table[2] == "| 1 | dpo_1 | sft_0 | 5 | 43.0 | 71.0 | 710 | 812 |  |  |  |  |  |  | 87.5 | 0.300 |"
    assert table[3] == "| 1 | sft_1 | dpo_1 | 3 | 50.0 | 75.5 | 755 |  | 1500 | 1300 | 600 | 3 | 1234 | 234 |  |  |"
    assert len(table) == 4  # the warm-up trains on gold rationales only: no row
    assert "Final model: `sft_1`: test 45.0% (n=100)" in text


def test_report_of_older_results_leaves_missing_diagnostics_blank():
    results = dpo_st_results()
    for st in results["stages"]:
        for key in ("sampled", "beyond_gold", "correct_samples", "distinct_samples", "after_dedup", "cap", "dpo_eval"):
            st.pop(key, None)
    table = reports.markdown_report(results).split(HEADER)[1].splitlines()
    assert table[2] == "| 1 | dpo_1 |  |  |  |  |  | 812 |  |  |  |  |  |  |  |  |"
    assert table[3] == "| 1 | sft_1 |  |  |  |  |  |  |  |  |  |  | 1234 |  |  |  |"


def test_report_of_warm_up_only_has_no_diagnostics():
    results = dpo_st_results()
    results["stages"] = results["stages"][:1]
    results["final"] = reports.final_entry(results["stages"])
    assert "Sampling diagnostics" not in reports.markdown_report(results)


def test_run_reports_write_markdown_and_plot(tmp_path):
    results = dpo_st_results()
    reports.write_run_reports(epath.Path(tmp_path), results, "test")
    assert (tmp_path / "report.md").read_text() == reports.markdown_report(results)
    assert (tmp_path / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- stage entries from manifests (hand-made manifests, hand-computed sums) ------------------------

SAMPLES = {"stage": "sample_pairs", "seconds": 10.25, "flops": 1e9, "samples": 10, "num_samples": 5, "questions": 2,
           "pass_at_1": 0.3, "pass_at_n": 0.5, "questions_with_correct": 1, "shards": 1}


def test_dpo_entry_counts_its_sampling_and_pairs_and_names_its_sampler():
    trained = {"seconds": 100.0, "flops": 3e12, "pairs": 7, "filtered": 1, "eval": {"rewards/accuracies": 0.75}}
    pairs = {"seconds": 0.5, "pairs": 8, "questions": 2}
    entry = reports.dpo_entry(2, trained, {}, samples=SAMPLES, pairs=pairs)
    assert entry == {
        "iteration": 2, "stage": "dpo", "model": "dpo_2", "seconds": 110.75, "flops": 3e12 + 1e9,
        "pairs": 7,  # the pairs DPO trained on (after its length filter), not the 8 built
        "dpo_eval": {"rewards/accuracies": 0.75}, "eval": {},
        "sampled": {"model": "sft_1", "num_samples": 5, "questions": 2, "pass_at_1": 0.3, "pass_at_n": 0.5,
                    "questions_with_correct": 1},
    }


def test_sft_entries_of_the_warm_up_and_of_an_iteration():
    trained, evaluation = {"seconds": 2.0004, "flops": 5.0}, {"test": {"accuracy": 0.5, "n": 2}}
    assert reports.sft_entry(0, trained, evaluation) == {
        "iteration": 0, "stage": "sft", "model": "sft_0", "seconds": 2.0, "flops": 5.0, "eval": evaluation}
    labels = {"seconds": 1.0, "pseudo_labels": 9, "questions": 2, "beyond_gold": 7, "correct_samples": 12,
              "distinct_samples": 10, "after_dedup": 8, "cap": 5}
    entry = reports.sft_entry(1, trained, evaluation, samples=SAMPLES, sampled_by="dpo_1", labels=labels)
    assert (entry["seconds"], entry["flops"]) == (13.25, 5.0 + 1e9)
    assert entry["sampled"]["model"] == "dpo_1" and entry["sampled"]["pass_at_n"] == 0.5
    assert [entry[k] for k in ("pseudo_labels", "beyond_gold", "correct_samples", "distinct_samples",
                               "after_dedup", "cap")] == [9, 7, 12, 10, 8, 5]
    assert "questions" not in entry  # the label manifest's question count is not an entry field
    # an older manifest without the counts gives an entry without them (its report cells stay blank)
    old = reports.sft_entry(1, trained, evaluation, samples=SAMPLES, sampled_by="dpo_1",
                            labels={"pseudo_labels": 9, "questions": 2, "beyond_gold": 7})
    assert "correct_samples" not in old and reports.diagnostics_rows(
        {"stages": [old]})[0]["correct_samples"] is None


def test_final_entry_averages_the_last_stage_and_its_replicates():
    """Hand-computed: accuracies 0.5, 0.75, 0.25 -> 0.5; invalid 0, 0.25, 0.5 -> 0.25."""
    stages = [{"iteration": 0, "stage": "sft", "model": "sft_0",
               "eval": {"test": {"accuracy": 0.5, "invalid": 0.0, "n": 4}}}]
    replicates = [reports.replicate_entry("sft_0_r1", {"seconds": 2.0, "flops": 3.0},
                                          {"test": {"accuracy": 0.75, "invalid": 0.25, "n": 4}}),
                  reports.replicate_entry("sft_0_r2", {}, {"test": {"accuracy": 0.25, "invalid": 0.5, "n": 4}})]
    final = reports.final_entry(stages, replicates)
    assert final["model"] == "sft_0" and final["eval"] == {"test": {"accuracy": 0.5, "invalid": 0.25, "n": 4}}
    assert final["replicates"][0] == {"model": "sft_0_r1", "seconds": 2.0, "flops": 3.0,
                                      "eval": {"test": {"accuracy": 0.75, "invalid": 0.25, "n": 4}}}
    assert reports.final_entry(stages) == {"model": "sft_0", "eval": stages[0]["eval"]}  # no replicates: as before
    assert reports.model_name("sft", 3, 2) == "sft_3_r2" and reports.model_name("sft", 3) == "sft_3"
    replicates[1]["eval"]["test"]["n"] = 5
    with pytest.raises(ValueError, match="different numbers of test questions"):
        reports.final_entry(stages, replicates)


def test_predictions_of_a_replicate_lie_in_its_own_eval_folder():
    from dpost import compare

    run = epath.Path("/runs/st/seed_3")
    assert compare.predictions_path(run, "sft_3", "test") == run / "iter_3" / "eval_sft" / "predictions_test.jsonl"
    assert compare.predictions_path(run, "sft_3_r2", "dev") == run / "iter_3" / "eval_sft_r2" / "predictions_dev.jsonl"
