"""Out-of-distribution evaluation sets of the paper: MultiArith, SVAMP, ASDiv.

Each loader returns ``list[Example]`` with an empty rationale (these sets are evaluated only).
Paths default to ``$DPOST_DATA_DIR/{multiarith,svamp,asdiv}/...``. Malformed input raises
``DataError`` naming the file (and the row / problem id).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Callable

from dpost.data.gsm8k import DataError, Example, data_dir

log = logging.getLogger(__name__)

FILES = {
    "multiarith": "multiarith/MultiArith.json",
    "svamp": "svamp/SVAMP.json",
    "asdiv": "asdiv/ASDiv.xml",
}
# ASDiv answers such as "9 (apples)" or "2.5"; ratios ("2:3"), lists ("3; 4") and words are skipped,
# as in the usual arithmetic-subset evaluation.
_ASDIV_ANSWER = re.compile(r"\s*(-?\d[\d,]*(?:\.\d+)?)\s*(?:\([^()]*\))?\s*")


def _path(name: str, path: str | os.PathLike | None) -> Path:
    return Path(path) if path is not None else data_dir() / FILES[name]


def _read_json_list(path: Path) -> list:
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DataError(f"{path}: cannot read JSON: {e}") from e
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON list of problems, got {type(rows).__name__}")
    return rows


def _number(value: object) -> float:
    if isinstance(value, bool):
        raise ValueError(f"not a number: {value!r}")
    x = float(value)  # type: ignore[arg-type]
    if not math.isfinite(x):
        raise ValueError(f"not finite: {value!r}")
    return x


def _text(row: dict, key: str) -> str:
    value = row.get(key)
    if not isinstance(value, str):
        raise ValueError(f"missing or non-string {key!r}")
    return value.strip()


def load_multiarith(path: str | os.PathLike | None = None) -> list[Example]:
    """MultiArith (600): question = ``sQuestion``, gold = ``lSolutions[0]``."""
    path = _path("multiarith", path)
    out = []
    for i, row in enumerate(_read_json_list(path)):
        try:
            if not isinstance(row, dict):
                raise ValueError("problem is not an object")
            sols = row.get("lSolutions")
            if not isinstance(sols, list) or not sols:
                raise ValueError("missing 'lSolutions'")
            out.append(Example(_text(row, "sQuestion"), "", _number(sols[0]),
                               f"multiarith-{row.get('iIndex', i)}"))
        except (ValueError, TypeError) as e:
            raise DataError(f"{path}: problem {i}: {e}") from e
    return out


def load_svamp(path: str | os.PathLike | None = None) -> list[Example]:
    """SVAMP (1,000): question = ``Body + " " + Question``, gold = ``Answer``."""
    path = _path("svamp", path)
    out = []
    for i, row in enumerate(_read_json_list(path)):
        try:
            if not isinstance(row, dict):
                raise ValueError("problem is not an object")
            question = _text(row, "Body") + " " + _text(row, "Question")
            out.append(Example(question, "", _number(row.get("Answer")), str(row.get("ID", f"svamp-{i}"))))
        except (ValueError, TypeError) as e:
            raise DataError(f"{path}: problem {i}: {e}") from e
    return out


def parse_asdiv_answer(text: str) -> float | None:
    """``"9 (apples)"`` -> 9.0; None for answers that are not one number (``"2:3"``, ``"Yes"``)."""
    m = _ASDIV_ANSWER.fullmatch(text or "")
    if m is None:
        return None
    try:
        return _number(m.group(1).replace(",", ""))
    except ValueError:
        return None


def parse_asdiv(path: str | os.PathLike | None = None) -> tuple[list[Example], list[str]]:
    """ASDiv problems with a single-number answer, and the ids of the skipped ones."""
    path = _path("asdiv", path)
    try:
        root = ET.parse(path).getroot()  # local, trusted file shipped with the data
    except (OSError, ET.ParseError) as e:
        raise DataError(f"{path}: cannot parse XML: {e}") from e
    problems = root.iter("Problem")
    out, skipped = [], []
    for i, p in enumerate(problems):
        pid = p.get("ID") or f"asdiv-{i}"
        body, question, answer = p.findtext("Body"), p.findtext("Question"), p.findtext("Answer")
        if body is None or question is None or answer is None:
            raise DataError(f"{path}: problem {pid}: missing Body, Question or Answer")
        gold = parse_asdiv_answer(answer)
        if gold is None:
            skipped.append(pid)
            continue
        out.append(Example(body.strip() + " " + question.strip(), "", gold, pid))
    if not out and not skipped:
        raise DataError(f"{path}: no <Problem> elements")
    return out, skipped


def load_asdiv(path: str | os.PathLike | None = None) -> list[Example]:
    """ASDiv, arithmetic subset: problems whose answer is not a single number are skipped
    (their count is logged; ``parse_asdiv`` returns their ids)."""
    out, skipped = parse_asdiv(path)
    log.info("ASDiv: %d problems kept, %d skipped (answer not a single number)", len(out), len(skipped))
    return out


LOADERS: dict[str, Callable[..., list[Example]]] = {
    "multiarith": load_multiarith,
    "svamp": load_svamp,
    "asdiv": load_asdiv,
}


def load_ood(name: str, path: str | os.PathLike | None = None) -> list[Example]:
    """Load an OOD set by name ("multiarith", "svamp" or "asdiv")."""
    if name not in LOADERS:
        raise ValueError(f"unknown OOD set {name!r}; expected one of {sorted(LOADERS)}")
    return LOADERS[name](path)
