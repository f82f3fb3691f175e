"""GSM8K answer extraction, correctness and loading (local release files; hub split indices)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import data_dir
from dpost.data import gsm8k
from dpost.data.gsm8k import DataError, extract_answer, is_correct


@pytest.mark.parametrize("text,expected", [
    ("... #### 1,234", 1234.0),
    ("#### 72", 72.0),
    ("so #### -5", -5.0),
    ("#### 2.5", 2.5),
    ("#### .5", 0.5),
    ("#### 27.", 27.0),  # the regex takes the trailing dot; float() accepts it
    ("# 3", 3.0),  # "#+ " : one hash is enough
    ("#### 1\n#### 2", 2.0),  # the last match wins
    ("#### 5 apples #### 6 pears", 6.0),
    ("The answer is #### 100,000.", 100000.0),
    ("####72", None),  # the space is required
    ("#### abc", None),
    ("#### 1.2.3", None),  # matches the regex, not a float
    ("#### .", None),
    ("#### ,", None),
    ("no answer here", None),
    ("", None),
    ("#### " + "9" * 400, None),  # overflows to inf: invalid
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_extract_answer_non_string():
    assert extract_answer(None) is None  # type: ignore[arg-type]


def test_is_correct():
    assert is_correct(72.0, 72.0)
    assert is_correct(72.00001, 72.0)
    assert not is_correct(72.0001, 72.0)
    assert not is_correct(None, 72.0)
    assert is_correct(extract_answer("x #### 1,800"), 1800.0)
    assert not is_correct(extract_answer("x #### 18"), 1800.0)


def test_load_release_splits():
    sizes = {"train": 6705, "dev": 768, "test": 1319}
    questions = {}
    for split, n in sizes.items():
        rows = gsm8k.load_split(split, data_dir())
        assert len(rows) == n
        assert rows[0].id == f"{split}-0" and len({r.id for r in rows}) == n
        for r in rows:  # the stored gold agrees with the rationale's final line
            assert is_correct(extract_answer(r.answer), r.gold), r
        questions[split] = {r.question for r in rows}
    assert not questions["train"] & questions["dev"]
    assert sizes["train"] + sizes["dev"] == 7473  # the hub's training set


def test_load_split_default_from_env(monkeypatch, tmp_path):
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "dev.jsonl").write_text(
        json.dumps({"question": "q?", "answer": "a\n#### 3", "ans": 3.0}) + "\n")
    monkeypatch.setenv(gsm8k.DATA_DIR_ENV, str(tmp_path))
    rows = gsm8k.load_split("dev")
    assert rows == [gsm8k.Example("q?", "a\n#### 3", 3.0, "dev-0")]
    assert gsm8k.load_split("dev", tmp_path / "gsm8k") == rows  # a folder with dev.jsonl directly
    with pytest.raises(DataError, match="train.jsonl"):
        gsm8k.load_split("train")
    with pytest.raises(ValueError, match="split"):
        gsm8k.load_split("validation")


def _write(tmp_path, lines):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


GOOD = json.dumps({"question": "How many?", "answer": "2+2=<<2+2=4>>4\n#### 4", "ans": 4.0})


@pytest.mark.parametrize("bad", [
    "{not json",
    json.dumps(["a", "list"]),
    json.dumps({"answer": "#### 4", "ans": 4}),  # no question
    json.dumps({"question": "q", "ans": 4}),  # no answer
    json.dumps({"question": "q", "answer": "#### 4", "ans": "four"}),
    json.dumps({"question": "q", "answer": "no final line"}),  # no ans, nothing to derive it from
    json.dumps({"question": "", "answer": "#### 4"}),
])
def test_malformed_line_names_file_and_line(tmp_path, bad):
    path = _write(tmp_path, [GOOD, "", bad, GOOD])  # the blank line is skipped but counted
    with pytest.raises(DataError) as err:
        gsm8k.load_jsonl(path)
    assert f"{path}:3:" in str(err.value)


def test_missing_ans_is_derived(tmp_path):
    path = _write(tmp_path, [json.dumps({"question": "q", "answer": "x\n#### 1,234"}), GOOD])
    rows = gsm8k.load_jsonl(path)
    assert [r.gold for r in rows] == [1234.0, 4.0]
    assert [r.id for r in rows] == ["bad-0", "bad-1"]


def test_unreadable_file(tmp_path):
    with pytest.raises(DataError, match="missing.jsonl"):
        gsm8k.load_jsonl(tmp_path / "missing.jsonl")


def test_hub_split_indices():
    train, dev = gsm8k.hub_train_dev_indices(7473)
    assert len(train) == 6705 and len(dev) == 768
    assert not set(train.tolist()) & set(dev.tolist())
    assert sorted(np.concatenate([train, dev]).tolist()) == list(range(7473))
    again = gsm8k.hub_train_dev_indices(7473)
    assert np.array_equal(train, again[0]) and np.array_equal(dev, again[1])


def test_load_split_from_hub_without_network(monkeypatch):
    """The hub path with ``datasets`` faked: the documented seeded train/dev split of 7,473 rows."""
    import sys
    import types

    def row(i):
        return {"question": f"q{i}?", "answer": f"step\n#### {i:,}"}

    fake = types.ModuleType("datasets")
    fake.load_dataset = lambda name, config: {"train": [row(i) for i in range(7473)],
                                              "test": [row(i) for i in range(1319)]}
    monkeypatch.setitem(sys.modules, "datasets", fake)
    train, dev, test = (gsm8k.load_split(s, "hub") for s in ("train", "dev", "test"))
    assert (len(train), len(dev), len(test)) == (6705, 768, 1319)
    assert {r.question for r in train}.isdisjoint({r.question for r in dev})
    train_idx, dev_idx = gsm8k.hub_train_dev_indices(7473)
    assert [r.gold for r in dev] == [float(i) for i in dev_idx]  # gold derived from "#### 1,234"
    assert dev[0].id == f"hub-dev-{dev_idx[0]}" and test[5].id == "hub-test-5"
