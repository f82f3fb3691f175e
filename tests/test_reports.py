"""report.md's per-iteration sampling diagnostics, rendered from hand-made results.json documents."""

from __future__ import annotations

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
        stage(1, "sft", "sft_1", 0.45, pseudo_labels=1234, beyond_gold=234,
              sampled={"model": "dpo_1", "num_samples": 3, "questions": 1000, "pass_at_1": 0.5, "pass_at_n": 0.755,
                       "questions_with_correct": 755}),
    ]
    return {"config": "configs/x.py", "method": "dpo_st", "seed": 0, "stages": stages,
            "final": reports.final_entry(stages)}


HEADER = ("| iteration | trains | samples from | n | pass@1 % | pass@n % | questions with a correct sample | pairs "
          "| pseudo-labels | beyond gold | DPO reward acc % | DPO reward margin |")


def test_report_shows_sampling_diagnostics_per_iteration():
    text = reports.markdown_report(dpo_st_results())
    assert "## Sampling diagnostics per iteration" in text
    table = text[text.index(HEADER):].splitlines()
    assert table[2] == "| 1 | dpo_1 | sft_0 | 5 | 43.0 | 71.0 | 710 | 812 |  |  | 87.5 | 0.300 |"
    assert table[3] == "| 1 | sft_1 | dpo_1 | 3 | 50.0 | 75.5 | 755 |  | 1234 | 234 |  |  |"
    assert len(table) == 4  # the warm-up trains on gold rationales only: no row
    assert "Final model: `sft_1`: test 45.0% (n=100)" in text


def test_report_of_older_results_leaves_missing_diagnostics_blank():
    results = dpo_st_results()
    for st in results["stages"]:
        for key in ("sampled", "beyond_gold", "dpo_eval"):
            st.pop(key, None)
    table = reports.markdown_report(results).split(HEADER)[1].splitlines()
    assert table[2] == "| 1 | dpo_1 |  |  |  |  |  | 812 |  |  |  |  |"
    assert table[3] == "| 1 | sft_1 |  |  |  |  |  |  | 1234 |  |  |  |"


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
