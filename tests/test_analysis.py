"""analysis/dpo_token_shift.py's pure parts on hand-made pairs: where two sides first differ, token
kinds, and the rejected side's numeric tokens lined up with the chosen side's (its calculator-forced
tokens come from `forcing.forced_positions`, tested in tests/sampling/test_sampling_calculator.py);
analysis/label_funnel.py's drop reasons on a hand-made question and its config reading (its whole
run is checked against a driver run's results.json in tests/test_driver.py)."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
from etils import epath

from dpost.data.builders import QuestionSamples

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "analysis"))
try:
    from dpo_token_shift import first_difference, numeric_steps, token_kind
    from label_funnel import drop_reasons, run_config
    from label_quality import label_flags, question_entities, run_quality
finally:
    sys.path.pop(0)


def test_first_difference():
    assert first_difference(np.array([1, 2, 3]), np.array([1, 2, 4])) == 2
    assert first_difference(np.array([5]), np.array([6, 7])) == 0
    assert first_difference(np.array([1, 2]), np.array([1, 2, 9])) == 2  # one side is a prefix


def test_token_kind():
    assert [token_kind(p) for p in ("Ġ12", "<<", "=", "####", "Ġhas", "Ċ", "Ġpencils.")] == [
        "numeric", "numeric", "numeric", "numeric", "word", "word", "word"]


def test_numeric_steps_ignore_wording():
    vocab = ["Gus", "has", "starts", "3", "*", "2", "=", "6", "+", "1", "7", "5", "then"]
    pieces = lambda ids: [vocab[i] for i in ids]  # noqa: E731
    ids = {w: i for i, w in enumerate(vocab)}
    chosen = np.array([ids[w] for w in "Gus has 3 * 2 = 6 then 6 + 1 = 7".split()])
    rejected = np.array([ids[w] for w in "Gus starts 3 * 2 = 5 then 5 + 1".split()])
    shift = np.arange(len(rejected), dtype=float) / 10  # token t's shift: t / 10
    got = numeric_steps(rejected, chosen, shift, pieces)
    # numeric tokens of the rejected side at 2..5 ("3 * 2 ="), 6 ("5": the first off), 8..10 ("5 + 1")
    assert got["agreeing with the chosen side's"] == pytest.approx(0.2 + 0.3 + 0.4 + 0.5)
    assert got["the first one off"] == pytest.approx(0.6)
    assert got["after that"] == pytest.approx(0.8 + 0.9 + 1.0)



def test_drop_reasons_by_hand():
    """Whitespace tokens: the gold's near-duplicate and a sample's near-duplicate, in sorted order."""
    samples = ["t u v w x #### 1", "a b c d e f g h i #### 1", "p q #### 1", "t u v w #### 1", "z #### 9",
               "t u v w #### 1"]
    labeled = QuestionSamples("q1", "Q?", "a b c d e f g h #### 1", 1.0, samples)
    # sorted distinct correct: "a b ... i" (10/11 > 0.7 with the gold), "p q" (kept), "t u v w" (kept),
    # "t u v w x" (6/7 > 0.7 with "t u v w")
    assert drop_reasons(labeled, "llama", 0.7, None) == (1, 1)
    answer_only = QuestionSamples("q2", "Q?", "", 1.0, samples)  # no gold: "a b ... i" is kept
    assert drop_reasons(answer_only, "llama", 0.7, None) == (0, 1)


def test_run_config_nests_the_flat_keys(tmp_path):
    (tmp_path / "config.json").write_text(
        '{"config": {"model.family": "llama", "data.eval_splits": ["dev"], "pseudo_labels.cap_percentile": 90}}')
    config = run_config(epath.Path(tmp_path))
    assert config.model.family == "llama" and config.data.eval_splits == ("dev",)
    assert config.pseudo_labels.cap_percentile == 90


QUESTION = "Eli has 15 marbles. Then Eli gives away 5 marbles. How many marbles does Eli have now?"
GOLD = "Eli gives away 5, so Eli has 15-5=<<15-5=10>>10 marbles.\n#### 10"


def test_question_entities_both_numbers():
    assert question_entities(QUESTION) == {"Eli", "marble", "marbles"}


def test_label_flags_by_hand():
    """(same steps, fewer, more, wrong entity): the calculator results against the gold's, in order."""
    same = "Taking away 5 leaves 15-5=<<15-5=10>>10.\n#### 10"
    assert label_flags(same, GOLD, QUESTION) == (True, False, False, False)
    # a pre-training corpus name and another question's item are both wrong entities
    assert label_flags("Lu gives away 5, so Lu has 15-5=<<15-5=10>>10 marbles.\n#### 10", GOLD, QUESTION)[3]
    assert label_flags("Eli has 15-5=<<15-5=10>>10 apples.\n#### 10", GOLD, QUESTION)[3]
    assert label_flags("Eli has 10 marbles.\n#### 10", GOLD, QUESTION) == (False, True, False, False)
    two = "Eli has 15+0=<<15+0=15>>15 marble, then 15-5=<<15-5=10>>10.\n#### 10"
    assert label_flags(two, GOLD, QUESTION) == (False, False, True, False)


def test_run_quality_skips_the_gold_and_counts_answer_only_questions(tmp_path):
    """A run folder by hand: the gold label is left out; the other two are one question's each."""
    (tmp_path / "config.json").write_text('{"config": {"method": "dpo_st", "iterations": 2}}')
    (tmp_path / "data").mkdir()
    rows = [{"question": QUESTION, "answer": GOLD, "ans": 10.0}, {"question": QUESTION, "answer": GOLD, "ans": 10.0}]
    (tmp_path / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    labels = [{"id": "train-0", "question": QUESTION, "target": GOLD, "gold": 10.0},
              {"id": "train-0", "question": QUESTION, "target": "Eli has 10 marbles.\n#### 10", "gold": 10.0},
              {"id": "train-1", "question": QUESTION, "target": GOLD.replace("Eli", "Lu"), "gold": 10.0}]
    (tmp_path / "iter_1" / "pseudo_labels").mkdir(parents=True)
    (tmp_path / "iter_1" / "pseudo_labels" / "labels.jsonl").write_text("".join(json.dumps(r) + "\n" for r in labels))
    method, rows_by_iteration = run_quality(epath.Path(tmp_path))
    assert method == "dpo_st" and list(rows_by_iteration) == [1]
    # beyond gold 2, questions 2, same steps 50%, fewer 50%, more 0%, wrong entity 50%
    np.testing.assert_allclose(rows_by_iteration[1], [2, 2, 50, 50, 0, 50])
