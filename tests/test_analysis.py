"""analysis/dpo_token_shift.py's pure parts on hand-made pairs: where two sides first differ, token
kinds, and the rejected side's numeric tokens lined up with the chosen side's (its calculator-forced
tokens come from `forcing.forced_positions`, tested in tests/sampling/test_sampling_calculator.py)."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "analysis"))
try:
    from dpo_token_shift import first_difference, numeric_steps, token_kind
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

