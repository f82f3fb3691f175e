"""The padding and bucketing policy, on hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest

from dpost.data import batching


@pytest.mark.parametrize("n,cap,expected", [(0, 200, 16), (1, 200, 16), (16, 200, 16), (17, 200, 32),
                                            (64, 200, 64), (65, 200, 128), (129, 200, 200), (300, 256, 256),
                                            (300, None, 512)])
def test_bucket_length(n, cap, expected):
    assert batching.bucket_length(n, cap) == expected


def test_bucket_length_minimum_is_a_parameter():
    assert [batching.bucket_length(n, minimum=8) for n in (1, 8, 9, 17)] == [8, 8, 16, 32]


@pytest.mark.parametrize("n,expected", [(1, 16), (16, 16), (17, 20), (20, 20), (21, 24), (25, 28), (29, 32),
                                        (33, 40), (100, 112), (113, 128)])
def test_quarter_octave_bucket(n, expected):
    assert batching.quarter_octave_bucket(n) == expected


@pytest.mark.parametrize("n,cap,expected", [(1, 200, 16), (16, 200, 16), (17, 200, 32), (33, 40, 40), (190, 200, 192)])
def test_stage_length(n, cap, expected):
    assert batching.stage_length(n, cap) == expected


def test_pad_rows_left_and_right():
    ids, mask = batching.pad_rows([[5, 6], [7], []], 3, pad_id=9, left=True)
    np.testing.assert_array_equal(ids, [[9, 5, 6], [9, 9, 7], [9, 9, 9]])
    np.testing.assert_array_equal(mask, [[0, 1, 1], [0, 0, 1], [0, 0, 0]])
    ids, mask = batching.pad_rows([[5, 6], [7]], 3, pad_id=9, left=False)
    np.testing.assert_array_equal(ids, [[5, 6, 9], [7, 9, 9]])
    np.testing.assert_array_equal(mask, [[1, 1, 0], [1, 0, 0]])
    assert ids.dtype == mask.dtype == np.int32
    with pytest.raises(ValueError, match="3 tokens does not fit length 2"):
        batching.pad_rows([[1, 2, 3]], 2, pad_id=0, left=True)


def test_pad_to_lengths_widens_prompts_left_and_completions_right():
    batch = {"prompt": np.array([[4, 5]]), "prompt_mask": np.array([[1, 1]]),
             "chosen": np.array([[6]]), "chosen_mask": np.array([[1]]),
             "rejected": np.array([[7]]), "rejected_mask": np.array([[1]]), "valid": np.array([1])}
    out = batching.pad_to_lengths(batch, 4, 3, pad_id=0)
    np.testing.assert_array_equal(out["prompt"], [[0, 0, 4, 5]])
    np.testing.assert_array_equal(out["prompt_mask"], [[0, 0, 1, 1]])
    np.testing.assert_array_equal(out["chosen"], [[6, 0, 0]])
    np.testing.assert_array_equal(out["rejected_mask"], [[1, 0, 0]])
    np.testing.assert_array_equal(out["valid"], [1])
    assert batching.pad_to_lengths(batch, None, None)["prompt"] is batch["prompt"]
    with pytest.raises(ValueError, match="prompt length 2 exceeds pad_to 1"):
        batching.pad_to_lengths(batch, 1, None)


def test_fill_batch_repeats_the_last_row_as_invalid():
    batch = {"prompt": np.array([[1, 2], [3, 4]]), "valid": np.array([1, 1], np.int32)}
    out = batching.fill_batch(batch, 4)
    np.testing.assert_array_equal(out["prompt"], [[1, 2], [3, 4], [3, 4], [3, 4]])
    np.testing.assert_array_equal(out["valid"], [1, 1, 0, 0])
    np.testing.assert_array_equal(batch["valid"], [1, 1])  # the input is not modified
    np.testing.assert_array_equal(batching.fill_batch({"x": np.array([1.5])}, 3)["x"], [1.5, 1.5, 1.5])
    assert batching.fill_batch(batch, 2)["prompt"] is batch["prompt"]
    with pytest.raises(ValueError, match="2 rows does not fit batch size 1"):
        batching.fill_batch(batch, 1)
