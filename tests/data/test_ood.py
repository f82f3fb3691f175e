"""OOD evaluation sets: sizes, question construction, ASDiv's skipped answers, clear errors."""

from __future__ import annotations

import json
import os

import pytest

from tests.conftest import data_dir
from dpost.data import ood
from dpost.data.gsm8k import DataError


def _path(name: str) -> str:
    return os.path.join(data_dir(), ood.FILES[name])


def test_multiarith():
    rows = ood.load_multiarith(_path("multiarith"))
    assert len(rows) == 600
    assert rows[0].question.startswith("For Halloween Debby") and rows[0].gold == 39.0
    assert all(r.answer == "" and r.question == r.question.strip() for r in rows)


def test_svamp():
    rows = ood.load_svamp(_path("svamp"))
    assert len(rows) == 1000
    assert rows[0].question == ("Each pack of dvds costs 76 dollars. If there is a discount of 25 dollars "
                                "on each pack How much do you have to pay to buy each pack?")
    assert rows[0].gold == 51.0 and rows[0].id == "chal-1"


def test_asdiv_skips_non_numeric_answers():
    rows, skipped = ood.parse_asdiv(_path("asdiv"))
    assert len(rows) + len(skipped) == 2305
    assert 2000 < len(rows) < 2305 and skipped
    first = rows[0]
    assert first.id == "nluds-0001" and first.gold == 9.0
    assert first.question == "Seven red apples and two green apples are in the basket. How many apples are in the basket?"
    assert ood.load_asdiv(_path("asdiv")) == rows


@pytest.mark.parametrize("text,expected", [
    ("9 (apples)", 9.0), ("2.5 (kg)", 2.5), ("1,200 (dollars)", 1200.0), ("42", 42.0), ("-3 (degrees)", -3.0),
    ("2:3", None), ("3; 4", None), ("Yes", None), ("9th", None), ("", None), ("1/2", None),
])
def test_asdiv_answer(text, expected):
    assert ood.parse_asdiv_answer(text) == expected


def test_load_ood_from_default_dir(monkeypatch):
    monkeypatch.setenv("DPOST_DATA_DIR", data_dir())
    assert len(ood.load_ood("multiarith")) == 600
    with pytest.raises(ValueError, match="unknown OOD set"):
        ood.load_ood("mawps")


@pytest.mark.parametrize("name,content", [
    ("multiarith", "{not json"),
    ("multiarith", json.dumps({"a": 1})),
    ("multiarith", json.dumps([{"sQuestion": "q", "lSolutions": []}])),
    ("svamp", json.dumps([{"Body": "b", "Question": "q", "Answer": "lots"}])),
    ("svamp", json.dumps([{"Body": "b", "Answer": 3}])),
    ("asdiv", "<ProblemSet><Problem ID='x'><Body>b</Body></Problem>"),  # not well-formed
    ("asdiv", "<ProblemSet><Problem ID='x'><Body>b</Body><Answer>3</Answer></Problem></ProblemSet>"),
])
def test_malformed_files_name_the_file(tmp_path, name, content):
    path = tmp_path / f"bad-{name}.data"
    path.write_text(content)
    with pytest.raises(DataError, match=str(path)):
        ood.load_ood(name, path)
