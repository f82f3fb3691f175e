"""The DPO-ST stages' own logic on hand-made inputs (the stages end to end: test_driver.py)."""

from __future__ import annotations

import numpy as np

from dpost import stages
from dpost.data import gsm8k
from dpost.data.builders import build_pairs


def test_production_pooling_merges_rounds_by_question():
    """stages.question_samples pools the sampled texts of several rounds per question, in round order."""
    ex = [gsm8k.Example("Q1?", "g1 #### 1", 1.0, "q1"), gsm8k.Example("Q2?", "", 2.0, "q2")]
    r1 = {"q1": [{"text": "A #### 1"}], "q2": [{"text": "B #### 2"}]}
    r2 = {"q2": [{"text": "C #### 5"}], "q1": [{"text": "D #### 3"}, {"text": "E #### 1"}]}
    pooled = stages.question_samples(ex, [r1, r2])
    assert [(x.id, x.gold_rationale, x.samples) for x in pooled] == [
        ("q1", "g1 #### 1", ["A #### 1", "D #### 3", "E #### 1"]), ("q2", "", ["B #### 2", "C #### 5"])]
    assert stages.question_samples(ex, [])[0].samples == []
    # Neither question has a negative in round 1 alone; pooled, q1 has gold + 2 correct vs 1 wrong.
    assert build_pairs(stages.question_samples(ex, [r1]), "llama") == []
    pairs = build_pairs(pooled, "llama")
    assert [(p.id, p.rejected) for p in pairs] == [("q1", "D #### 3")] * 3 + [("q2", "C #### 5")]


def test_dpo_eval_batches_are_the_first_pairs_with_an_invalid_filler():
    arrays = {"prompt": np.arange(10).reshape(5, 2), "valid": np.ones(5, np.int32)}
    batches = stages._eval_batches(arrays, n_eval=5, batch_size=2)
    assert [b["prompt"][:, 0].tolist() for b in batches] == [[0, 2], [4, 6], [8, 8]]
    assert [b["valid"].tolist() for b in batches] == [[1, 1], [1, 1], [1, 0]]
    assert [b["prompt"][:, 0].tolist() for b in stages._eval_batches(arrays, n_eval=3, batch_size=4)] == [[0, 2, 4, 4]]


def test_a_stage_has_one_shape_from_its_longest_rows():
    items = [{"prompt": [1] * 3, "chosen": [1] * 20, "rejected": [1] * 5}, {"prompt": [1] * 17, "chosen": [1], "rejected": [1]}]
    assert stages._stage_lengths(items, ["chosen", "rejected"], max_p=256, max_c=24) == (32, 24)
