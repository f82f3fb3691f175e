"""GSM8K: answer extraction, correctness, and loading (local jsonl or the Hugging Face hub).

Rows are ``Example(question, answer, gold, id)``: ``answer`` is the raw GSM8K rationale (with
``<<expr=result>>`` annotations and a last line ``#### N``) and ``gold`` the final number.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from pathlib import Path

import numpy as np

DEFAULT_DATA_DIR = "/work/shared/data"
DATA_DIR_ENV = "DPOST_DATA_DIR"
SPLITS = ("train", "dev", "test")
HUB_ID, HUB_CONFIG = "openai/gsm8k", "main"
HUB_DEV_SIZE = 768  # DPO-ST: 7,473 hub training rows -> train 6,705 / dev 768
HUB_SPLIT_SEED = 42

_ANSWER = re.compile(r"#+ (-?[0-9.,]+)")
TOLERANCE = 1e-4


class DataError(ValueError):
    """A data file is malformed; the message names the file (and line when there is one)."""


@dataclasses.dataclass(frozen=True)
class Example:
    question: str
    answer: str  # rationale; empty for evaluation-only sets (OOD)
    gold: float
    id: str


def extract_answer(text: str) -> float | None:
    """The release's rule: last match of ``#+ (-?[0-9.,]+)``, commas removed, as a float.

    None when there is no match or the match is not a number (``"1.2.3"``, ``"."``) or not finite.
    """
    if not isinstance(text, str):
        return None
    matches = _ANSWER.findall(text)
    if not matches:
        return None
    try:
        value = float(matches[-1].replace(",", ""))
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def is_correct(pred: float | None, gold: float) -> bool:
    """Valid and within 1e-4 of the gold answer."""
    return pred is not None and abs(pred - gold) < TOLERANCE


def data_dir() -> Path:
    """Folder holding ``gsm8k/`` and the OOD sets: ``$DPOST_DATA_DIR`` or the shared default."""
    return Path(os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR)


def example_from_row(row: object, ident: str) -> Example:
    """Validate one GSM8K row (``question``, ``answer``, optional ``ans``); ValueError if bad."""
    if not isinstance(row, dict):
        raise ValueError("row is not a JSON object")
    question, answer = row.get("question"), row.get("answer")
    if not isinstance(question, str) or not question.strip():
        raise ValueError("missing or empty 'question'")
    if not isinstance(answer, str) or not answer.strip():
        raise ValueError("missing or empty 'answer'")
    if "ans" in row and row["ans"] is not None:
        try:
            gold = float(str(row["ans"]).replace(",", ""))
        except ValueError:
            raise ValueError(f"unparsable 'ans' {row['ans']!r}") from None
    else:
        gold = extract_answer(answer)
        if gold is None:
            raise ValueError("no 'ans' and no '#### N' line in 'answer'")
    if not math.isfinite(gold):
        raise ValueError(f"non-finite 'ans' {row.get('ans')!r}")
    return Example(question=question, answer=answer, gold=gold, id=ident)


def load_jsonl(path: str | os.PathLike, id_prefix: str | None = None) -> list[Example]:
    """Load GSM8K-format jsonl. Ids are ``{prefix}-{0-based row}`` (prefix: the file stem).

    Blank lines are ignored; any malformed line raises DataError naming ``file:line`` (1-based).
    """
    path = Path(path)
    prefix = id_prefix if id_prefix is not None else path.stem
    examples: list[Example] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read: {e}") from e
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            examples.append(example_from_row(row, f"{prefix}-{len(examples)}"))
        except ValueError as e:  # json.JSONDecodeError is a ValueError
            raise DataError(f"{path}:{lineno}: {e}") from e
    return examples


def hub_train_dev_indices(n_rows: int, dev_size: int = HUB_DEV_SIZE,
                          seed: int = HUB_SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic train/dev split of the hub's training rows: a seeded permutation, last
    ``dev_size`` rows are dev. Not byte-identical to the release's split (whose procedure is not
    published); use the local copy of the release files for exact reproduction."""
    perm = np.random.default_rng(seed).permutation(n_rows)
    return np.sort(perm[:-dev_size]), np.sort(perm[-dev_size:])


def _load_hub(split: str) -> list[Example]:
    import datasets  # heavy; only needed for hub access

    ds = datasets.load_dataset(HUB_ID, HUB_CONFIG)
    if split == "test":
        rows, idx = ds["test"], range(len(ds["test"]))
    else:
        rows = ds["train"]
        train_idx, dev_idx = hub_train_dev_indices(len(rows))
        idx = (train_idx if split == "train" else dev_idx).tolist()
    out = []
    for j in idx:
        try:
            out.append(example_from_row(dict(rows[j]), f"hub-{split}-{j}"))
        except ValueError as e:
            raise DataError(f"{HUB_ID} {split} row {j}: {e}") from e
    return out


def load_split(split: str, source: str | os.PathLike | None = None) -> list[Example]:
    """One GSM8K split ("train", "dev" or "test").

    ``source``: ``"hub"`` (``openai/gsm8k`` via ``datasets``, train/dev made by
    ``hub_train_dev_indices``), or a folder holding ``{split}.jsonl`` or ``gsm8k/{split}.jsonl``;
    default ``$DPOST_DATA_DIR`` (the release's own split files).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if source is not None and str(source) == "hub":
        return _load_hub(split)
    folder = Path(source) if source is not None else data_dir()
    for candidate in (folder / f"{split}.jsonl", folder / "gsm8k" / f"{split}.jsonl"):
        if candidate.is_file():
            return load_jsonl(candidate, id_prefix=split)
    raise DataError(f"{folder}: no {split}.jsonl (nor gsm8k/{split}.jsonl); set ${DATA_DIR_ENV} "
                    f"or pass source='hub'")
