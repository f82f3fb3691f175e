"""analysis/dpo_token_shift.py's pure parts on hand-made pairs: where two sides first differ, token
kinds, and the rejected side's numeric tokens lined up with the chosen side's (its calculator-forced
tokens come from `forcing.forced_positions`, tested in tests/sampling/test_sampling_calculator.py);
analysis/label_funnel.py's drop reasons on a hand-made question and its config reading (its whole
run is checked against a driver run's results.json in tests/test_driver.py)."""

from __future__ import annotations

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
