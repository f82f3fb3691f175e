"""A synthetic multi-step arithmetic task written as GSM8K rows (the CPU default).

Each problem: a person starts with some items, then 1-4 operations change the count. The
rationale (``Difficulty.style``) is either

* ``sentences`` (default): one sentence per step in one of several phrasings, each with a
  GSM8K-style calculator annotation (``so Ava has 12+5=<<12+5=17>>17 apples.``), an optional
  opening sentence that restates the start and an optional closing sentence before ``#### N``; or
* ``equations``: one bare equation line per step (``12+5=<<12+5=17>>17``).

Why sentences: the protocol's builders drop a correct sample as a near-duplicate when its sub-word
token set overlaps an already kept one by more than 0.7 (Jaccard). Equation-only rationales of one
question share almost every token, so every correct sample collapses onto the gold rationale and
self-training adds no data (measured: docs/experiments.md, the first final); phrasings in words
make distinct correct rationales distinct, as GSM8K's are. The operands of ``+`` and ``*`` may also
be written in either order (``Difficulty.commute``).

``make_splits`` draws held-out sets first, then train, from one seeded stream and removes duplicate
questions across all splits, so held-out questions never appear in train and test/dev do not
change when ``n_train`` does. ``make_corpus`` draws the pre-training corpus of the CPU default's
M0 (``dpost.pretrain``) with other names than the task's, so no corpus question is a task question.
``train_tokenizer`` builds a small byte-level BPE tokenizer (digits split one per token) that
round-trips the text exactly.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

from dpost.data.gsm8k import Example

NAMES = ("Ava", "Ben", "Cleo", "Dan", "Eli", "Fay", "Gus", "Ivy")
CORPUS_NAMES = ("Hal", "Jo", "Kim", "Lu", "Max", "Ned", "Oli", "Pam")  # pre-training corpus only
ITEMS = ("apple", "marble", "book", "coin", "shell", "card", "pencil", "sticker")
OPS = ("+", "-", "*", "/")
STYLES = ("sentences", "equations")

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")  # ids 0..3, in this order
PAD, BOS, EOS, UNK = SPECIAL_TOKENS
TOKENIZER_FILE = "tokenizer.json"


@dataclasses.dataclass(frozen=True)
class Difficulty:
    """Knobs of the task. Every intermediate and final value stays in [0, max_value]."""

    min_steps: int = 2
    max_steps: int = 4
    max_start: int = 50  # the starting count is drawn from [2, max_start]
    max_operand: int = 20  # operands of + and - are drawn from [1, max_operand]
    max_factor: int = 5  # factors and divisors are drawn from [2, max_factor]
    max_value: int = 999
    ops: tuple[str, ...] = OPS
    commute: float = 0.5  # probability that a + or * line writes its operands as k op x
    style: str = "sentences"  # rationale style: sentences | equations (see the module doc)

    def __post_init__(self) -> None:
        if not 1 <= self.min_steps <= self.max_steps:
            raise ValueError(f"need 1 <= min_steps <= max_steps, got {self.min_steps}, {self.max_steps}")
        if not self.ops or any(op not in OPS for op in self.ops):
            raise ValueError(f"ops must be a non-empty subset of {OPS}, got {self.ops}")
        if self.max_start < 2 or self.max_operand < 1 or self.max_factor < 2:
            raise ValueError("need max_start >= 2, max_operand >= 1, max_factor >= 2")
        if self.max_value < max(self.max_start, self.max_operand):
            raise ValueError("max_value must be >= max_start and max_operand")
        if not 0.0 <= self.commute <= 1.0:
            raise ValueError(f"commute is a probability in [0, 1], got {self.commute}")
        if self.style not in STYLES:
            raise ValueError(f"style must be one of {STYLES}, got {self.style!r}")


# op -> question sentence. Fields: n (name), i (item), k (operand).
_QUESTION_TEMPLATES = {
    "+": "Then {n} gets {k} more {i}s.",
    "-": "Then {n} gives away {k} {i}s.",
    "*": "Then {n} ends up with {k} times as many {i}s.",
    "/": "Then {n} splits the {i}s into {k} equal piles and keeps one pile.",
}
COMMUTATIVE = ("+", "*")


# op -> phrasings of a rationale step. Fields: n (name), i (item), k (operand), eq (the annotated
# equation). Each phrasing words the step differently, so rationales that choose different
# phrasings share few sub-word tokens beyond the numbers.
_STEP_PHRASINGS = {
    "+": ("{n} gets {k} more, so {n} has {eq} {i}s.",
          "After getting {k} more {i}s, the count is {eq}.",
          "Adding the {k} new ones gives {eq}."),
    "-": ("{n} gives away {k}, so {n} has {eq} {i}s.",
          "After giving {k} {i}s away, the count is {eq}.",
          "Taking away {k} leaves {eq}."),
    "*": ("{n} has {k} times as many, so {n} has {eq} {i}s.",
          "With {k} times as many {i}s, the count is {eq}.",
          "Multiplying by {k} gives {eq}."),
    "/": ("{n} keeps one of {k} equal piles, so {n} has {eq} {i}s.",
          "After splitting the {i}s into {k} piles, the count is {eq}.",
          "Dividing by {k} leaves {eq}."),
}
_OPENINGS = ("{n} starts with {x} {i}s.", "At first there are {x} {i}s.")
_CLOSINGS = ("In the end {n} has {x} {i}s.", "So the answer is {x}.")


def equation(op: str, x: int, k: int, r: int, swap: bool = False) -> str:
    """A step's annotated equation ``x op k=<<x op k=r>>r``; ``swap`` writes ``k op x`` (only for
    commutative operations)."""
    if swap and op not in COMMUTATIVE:
        raise ValueError(f"operation {op!r} does not commute")
    expr = f"{k}{op}{x}" if swap else f"{x}{op}{k}"
    return f"{expr}=<<{expr}={r}>>{r}"


def _sentence_rationale(rng: random.Random, name: str, item: str, start: int,
                        steps: Sequence[tuple[str, int, int, int, bool]]) -> list[str]:
    """One ``sentences``-style rationale: optional opening, a phrasing per step, optional closing."""
    fields = {"n": name, "i": item}
    lines = [rng.choice(_OPENINGS).format(x=start, **fields)] if rng.random() < 0.5 else []
    for op, x, k, r, swap in steps:
        lines.append(rng.choice(_STEP_PHRASINGS[op]).format(k=k, eq=equation(op, x, k, r, swap), **fields))
    if rng.random() < 0.5:
        lines.append(rng.choice(_CLOSINGS).format(x=steps[-1][3] if steps else start, **fields))
    return lines


def _step(rng: random.Random, x: int, d: Difficulty) -> tuple[str, int, int] | None:
    """One applicable (op, operand, result) for the current value ``x``, or None."""
    choices = []
    for op in d.ops:
        if op == "+" and x + 1 <= d.max_value:
            choices.append((op, [k for k in range(1, d.max_operand + 1) if x + k <= d.max_value]))
        elif op == "-" and x > 1:
            choices.append((op, list(range(1, min(d.max_operand, x - 1) + 1))))
        elif op == "*":
            ks = [k for k in range(2, d.max_factor + 1) if x * k <= d.max_value]
            if ks:
                choices.append((op, ks))
        elif op == "/":
            ks = [k for k in range(2, d.max_factor + 1) if x % k == 0]
            if ks:
                choices.append((op, ks))
    if not choices:
        return None
    op, ks = rng.choice(choices)
    k = rng.choice(ks)
    r = {"+": x + k, "-": x - k, "*": x * k, "/": x // k}[op]
    return op, k, r


def make_problem(rng: random.Random, difficulty: Difficulty = Difficulty(), names: Sequence[str] = NAMES) -> dict:
    """One GSM8K-format row: ``{"question", "answer", "ans"}``."""
    d = difficulty
    name, item = rng.choice(names), rng.choice(ITEMS)
    start = x = rng.randint(2, d.max_start)
    fields = {"n": name, "i": item}
    question = [f"{name} has {x} {item}s."]
    steps = []
    for _ in range(rng.randint(d.min_steps, d.max_steps)):
        step = _step(rng, x, d)
        if step is None:
            break
        op, k, r = step
        question.append(_QUESTION_TEMPLATES[op].format(k=k, **fields))
        swap = d.commute > 0 and op in COMMUTATIVE and rng.random() < d.commute  # commute=0: no draw
        steps.append((op, x, k, r, swap))
        x = r
    question.append(f"How many {item}s does {name} have now?")
    if d.style == "sentences":
        lines = _sentence_rationale(rng, name, item, start, steps)
    else:
        lines = [equation(op, a, k, r, swap) for op, a, k, r, swap in steps]
    lines.append(f"#### {x}")
    return {"question": " ".join(question), "answer": "\n".join(lines), "ans": float(x)}


def make_splits(seed: int, n_train: int, n_dev: int, n_test: int,
                difficulty: Difficulty = Difficulty(), max_tries_factor: int = 20,
                n_test_extra: int = 0) -> dict[str, list[Example]]:
    """Disjoint, deterministic splits (unique question texts across and within splits).

    Drawn in the order test, dev, train from one ``random.Random(seed)`` stream, then
    ``n_test_extra`` more test questions appended to test: drawn last, so a larger test set
    leaves train, dev and the first ``n_test`` test questions as they were. Ids follow
    ``gsm8k.load_jsonl`` (``{split}-{row}``) so written and reloaded splits are identical.
    """
    rng = random.Random(seed)
    seen: set[str] = set()
    out: dict[str, list[Example]] = {"test": []}
    for split, n in (("test", n_test), ("dev", n_dev), ("train", n_train), ("test", n_test + n_test_extra)):
        rows: list[Example] = out.get(split, [])
        n_drawn = len(rows)
        tries = 0
        while len(rows) < n:
            tries += 1
            if tries > max_tries_factor * (n - n_drawn) + 100:
                raise ValueError(f"synthetic task too small for {n} unique {split} questions; "
                                 "raise the difficulty ranges")
            row = make_problem(rng, difficulty)
            if row["question"] in seen:
                continue
            seen.add(row["question"])
            rows.append(Example(row["question"], row["answer"], row["ans"], f"{split}-{len(rows)}"))
        out[split] = rows
    return {s: out[s] for s in ("train", "dev", "test")}


def splits_from_fields(seed: int, fields: dict) -> dict[str, list[Example]]:
    """`make_splits` from a config's `data.synthetic` fields: the split sizes and `n_test_extra`, the
    rest `Difficulty` fields (a misspelled one is a config error naming the field)."""
    fields = dict(fields)
    sizes = {k: fields.pop(k) for k in ("n_train", "n_dev", "n_test")}
    n_test_extra = fields.pop("n_test_extra", 0)
    difficulty = difficulty_from_fields(fields, "data.synthetic")
    return make_splits(seed, **sizes, difficulty=difficulty, n_test_extra=n_test_extra)


def difficulty_from_fields(fields: dict, config_key: str) -> Difficulty:
    """A config's generator fields as a `Difficulty`; a misspelled field is an error naming `config_key`."""
    try:
        return Difficulty(**fields)
    except TypeError as err:
        raise ValueError(f"config field '{config_key}': {err}") from None


def make_corpus(seed: int, n: int, difficulty: Difficulty) -> list[Example]:
    """``n`` distinct problems for pre-training: the task's generator with ``CORPUS_NAMES``, so no
    corpus question can equal a question of the task's splits (whose names are ``NAMES``)."""
    rng = random.Random(seed)
    seen: set[str] = set()
    rows: list[Example] = []
    for _ in range(20 * n + 100):
        if len(rows) == n:
            return rows
        row = make_problem(rng, difficulty, CORPUS_NAMES)
        if row["question"] not in seen:
            seen.add(row["question"])
            rows.append(Example(row["question"], row["answer"], row["ans"], f"corpus-{len(rows)}"))
    raise ValueError(f"synthetic corpus too small for {n} unique questions; raise the difficulty ranges")


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict | Example]) -> None:
    """Write rows as jsonl atomically (temporary file in the same folder, then rename), so a
    crash never leaves a half-written file that a resumed run would trust."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows:
                if isinstance(row, Example):
                    row = {"question": row.question, "answer": row.answer, "ans": row.gold}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_splits(out_dir: str | os.PathLike, splits: dict[str, Sequence[Example]]) -> Path:
    """Write ``{split}.jsonl`` files readable by ``gsm8k.load_split(split, out_dir)``."""
    out_dir = Path(out_dir)
    for split, rows in splits.items():
        write_jsonl(out_dir / f"{split}.jsonl", rows)
    return out_dir


def train_tokenizer(texts: Iterable[str], out_dir: str | os.PathLike, vocab_size: int = 512):
    """Train a byte-level BPE tokenizer on ``texts`` and save it to ``out_dir``.

    Digits are pre-split one per token (arithmetic stays learnable: no multi-digit merges), and
    ``<< >> [ ] = + - * /`` are isolated;
    byte-level pre-tokenization/decoding make ``decode(encode(x)) == x`` for any text. No
    post-processor: BOS/EOS are added by ``dpost.data.pipeline`` per family, not implicitly.
    Writes ``tokenizer.json`` plus the transformers config files; returns
    ``transformers.PreTrainedTokenizerFast`` with pad/bos/eos/unk set (see ``load_tokenizer``).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        # Calculator markers and operators are tokens of their own ("=<<" never merges), so the
        # sampler's trigger and forced closing marker are single tokens.
        pre_tokenizers.Split(Regex(r"<<|>>|[\[\]=+\-*/]"), behavior="isolated"),
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / TOKENIZER_FILE))
    hf = load_tokenizer(out_dir)
    hf.save_pretrained(str(out_dir))  # tokenizer_config.json etc.: AutoTokenizer works too
    return hf


def load_tokenizer(path: str | os.PathLike):
    """``PreTrainedTokenizerFast`` for a saved synthetic tokenizer (folder or tokenizer.json)."""
    from transformers import PreTrainedTokenizerFast

    path = Path(path)
    file = path / TOKENIZER_FILE if path.is_dir() else path
    return PreTrainedTokenizerFast(tokenizer_file=str(file), pad_token=PAD, bos_token=BOS,
                                   eos_token=EOS, unk_token=UNK, clean_up_tokenization_spaces=False)


def tokenizer_corpus(examples: Iterable[Example]) -> list[str]:
    """Texts to train the tokenizer on: prompts and targets in both families' formats."""
    from dpost.data.formatting import FAMILIES, format_example

    return [text for ex in examples for fam in FAMILIES for text in format_example(fam, ex)]
