"""The synthetic arithmetic task: valid GSM8K rows, deterministic disjoint splits, atomic
writes, and a tokenizer that round-trips the text exactly."""

from __future__ import annotations

import json
import random
import re

import pytest

from dpost import calculator
from dpost.data import gsm8k, synthetic
from dpost.data.formatting import FAMILIES, format_example
from dpost.data.synthetic import Difficulty


@pytest.fixture(scope="module")
def splits():
    return synthetic.make_splits(seed=7, n_train=400, n_dev=50, n_test=50)


@pytest.fixture(scope="module")
def tokenizer(splits, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    synthetic.train_tokenizer(synthetic.tokenizer_corpus(splits["train"]), out, vocab_size=400)
    return synthetic.load_tokenizer(out)


def test_rows_are_valid_gsm8k(splits):
    for ex in splits["train"] + splits["test"]:
        annotations = re.findall(r"<<(.*?)=(.*?)>>(\d+)", ex.answer)
        assert 2 <= len(annotations) <= 4
        for expr, result, written in annotations:
            assert calculator.evaluate(expr) == result == written  # the calculator reproduces every step
        assert gsm8k.extract_answer(ex.answer) == ex.gold == float(annotations[-1][1])
        assert ex.gold == int(ex.gold) and 0 <= ex.gold <= Difficulty().max_value


def test_splits_deterministic_and_disjoint(splits):
    again = synthetic.make_splits(seed=7, n_train=400, n_dev=50, n_test=50)
    assert again == splits
    assert [len(splits[s]) for s in ("train", "dev", "test")] == [400, 50, 50]
    qs = {s: [e.question for e in rows] for s, rows in splits.items()}
    assert all(len(set(v)) == len(v) for v in qs.values())
    assert not set(qs["train"]) & (set(qs["dev"]) | set(qs["test"]))
    assert not set(qs["dev"]) & set(qs["test"])
    other = synthetic.make_splits(seed=8, n_train=400, n_dev=50, n_test=50)
    assert other["test"] != splits["test"]


def test_held_out_sets_do_not_depend_on_train_size(splits):
    bigger = synthetic.make_splits(seed=7, n_train=800, n_dev=50, n_test=50)
    assert bigger["test"] == splits["test"] and bigger["dev"] == splits["dev"]


def test_difficulty_knobs():
    d = Difficulty(min_steps=3, max_steps=3, ops=("+", "-"), max_operand=5, max_value=100)
    rng = random.Random(0)
    for _ in range(100):
        row = synthetic.make_problem(rng, d)
        steps = re.findall(r"<<(.*?)>>", row["answer"])
        assert len(steps) == 3 and all("*" not in s and "/" not in s for s in steps)
        assert 0 <= row["ans"] <= 100
    with pytest.raises(ValueError):
        Difficulty(min_steps=3, max_steps=2)
    with pytest.raises(ValueError):
        Difficulty(ops=("^",))
    with pytest.raises(ValueError, match="too small"):
        synthetic.make_splits(0, 500, 0, 0, Difficulty(max_start=2, min_steps=1, max_steps=1, ops=("+",), max_operand=1))


def test_equation_rationales_commute():
    """Equation style: operands of + and * appear in both orders in the gold rationales, so a correct
    sample can differ from the gold one (under whitespace-word Jaccard it survives de-duplication)."""
    from dpost.data import builders

    splits = synthetic.make_splits(seed=7, n_train=400, n_dev=50, n_test=50, difficulty=Difficulty(style="equations"))

    def steps(ex):  # (x, op, k, r, line) per equation line, x being the running count before it
        x = int(re.match(r"\w+ has (\d+)", ex.question).group(1))
        for line in ex.answer.splitlines()[:-1]:
            a, op, b, r = re.fullmatch(r"(\d+)([-+*/])(\d+)=<<.*=(\d+)>>\d+", line).groups()
            k = int(b) if int(a) == x else int(a)
            yield x, op, k, int(r), line
            x = int(r)

    swapped = [ex for ex in splits["train"] if any(
        op in "+*" and line == synthetic.equation(op, x, k, r, swap=True) != synthetic.equation(op, x, k, r)
        for x, op, k, r, line in steps(ex))]
    assert 0.3 < len(swapped) / len(splits["train"]) < 0.95

    # the other order of every commutable line is also a correct rationale, and it is kept as a pseudo-label
    ex = next(e for e in splits["train"] if next(steps(e))[1] in "+*")
    x, op, k, r, first = next(steps(ex))
    flipped = synthetic.equation(op, x, k, r, swap=first == synthetic.equation(op, x, k, r))
    other = ex.answer.replace(first, flipped, 1)
    assert other != ex.answer and gsm8k.is_correct(gsm8k.extract_answer(other), ex.gold)
    labels = builders.build_pseudo_labels(
        [builders.QuestionSamples(ex.id, ex.question, ex.answer, ex.gold, [other, ex.answer])], "llama").labels
    assert [l.target for l in labels] == [format_example("llama", ex)[1], format_example("llama", type(ex)(
        ex.question, other, ex.gold, ex.id))[1]]


def test_commute_zero_writes_one_order():
    rng = random.Random(3)
    for _ in range(200):
        row = synthetic.make_problem(rng, Difficulty(commute=0.0, max_start=20, max_value=200, style="equations"))
        x = int(re.match(r"\w+ has (\d+)", row["question"]).group(1))
        for line in row["answer"].splitlines()[:-1]:  # each line starts from the running count
            assert line.startswith(f"{x}")
            x = int(line.rsplit(">>", 1)[1])
    with pytest.raises(ValueError, match="commute"):
        Difficulty(commute=1.5)
    with pytest.raises(ValueError, match="does not commute"):
        synthetic.equation("-", 5, 2, 3, swap=True)


def test_sentence_rationales(splits):
    """Default style: one sentence per step, each with its annotated equation from the running
    count, in several phrasings; optional opening and closing sentences; the last line #### N."""
    phrasings, openings, closings = set(), 0, 0
    for ex in splits["train"]:
        lines = ex.answer.splitlines()
        assert lines[-1] == f"#### {int(ex.gold)}"
        x = int(re.match(r"\w+ has (\d+)", ex.question).group(1))
        body = [line for line in lines[:-1] if "<<" in line]
        assert len(body) == len(re.findall(r"Then ", ex.question))  # one sentence per question step
        for line in body:
            expr = re.search(r"(\d+[-+*/]\d+)=<<\1=(\d+)>>\2", line)
            assert expr and str(x) in expr.group(1).split(re.search(r"[-+*/]", expr.group(1)).group())
            assert line.endswith(".") and line[0].isupper()
            phrasings.add(re.sub(r"\d+[-+*/]\d+=<<.*>>\d+", "EQ", re.sub(r"\b(\d+|[A-Z][a-z]+|\w+s)\b", "_", line)))
            x = int(expr.group(2))
        extra = [line for line in lines[:-1] if "<<" not in line]
        openings += bool(extra) and extra[0] == lines[0]
        closings += bool(extra) and extra[-1] == lines[-2]
    assert len(phrasings) >= 10  # several phrasings per operation
    assert 0.3 < openings / len(splits["train"]) < 0.7 and 0.3 < closings / len(splits["train"]) < 0.7
    with pytest.raises(ValueError, match="style"):
        Difficulty(style="prose")


def test_write_splits_round_trip(splits, tmp_path):
    synthetic.write_splits(tmp_path, splits)
    for split, rows in splits.items():
        assert gsm8k.load_split(split, tmp_path) == rows
    assert not list(tmp_path.glob(".*.tmp"))


def test_write_jsonl_is_atomic(tmp_path):
    path = tmp_path / "rows.jsonl"
    synthetic.write_jsonl(path, [{"a": 1}])

    def rows():
        yield {"a": 2}
        raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError):
        synthetic.write_jsonl(path, rows())
    assert [json.loads(l) for l in path.read_text().splitlines()] == [{"a": 1}]  # old file intact
    assert [p.name for p in tmp_path.iterdir()] == ["rows.jsonl"]  # no temporary left behind


def test_tokenizer_round_trip_and_specials(splits, tokenizer):
    assert 260 < len(tokenizer) <= 400
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2, 3)
    texts = [t for ex in splits["test"] for fam in FAMILIES for t in format_example(fam, ex)]
    texts += ["Ünïcode ✓ and  double  spaces\n\n", "#### -12,345.5", "<<3*4=12>>12 [ 3 * 4 = 12] 12"]
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.decode(ids) == text
    # digits are single tokens; calculator markers and "=" are tokens of their own
    tokens = tokenizer.convert_ids_to_tokens(tokenizer.encode("1234=<<12*3=36>>36", add_special_tokens=False))
    assert tokens[:6] == ["1", "2", "3", "4", "=", "<<"] and ">>" in tokens
    assert tokenizer.decode([1, *tokenizer.encode("5", add_special_tokens=False), 2], skip_special_tokens=True) == "5"


def test_tokenizer_loads_with_transformers(splits, tokenizer, tmp_path):
    from transformers import PreTrainedTokenizerFast  # (AutoTokenizer works too; its import is slow)

    synthetic.train_tokenizer(synthetic.tokenizer_corpus(splits["dev"]), tmp_path, vocab_size=300)
    direct = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / synthetic.TOKENIZER_FILE))
    auto = PreTrainedTokenizerFast.from_pretrained(str(tmp_path))  # specials from the config
    text = splits["dev"][0].answer
    assert direct.decode(direct.encode(text, add_special_tokens=False)) == text
    assert auto.eos_token == "</s>" and auto.pad_token == "<pad>" and auto.bos_token == "<s>"
    assert auto.encode(text, add_special_tokens=False) == direct.encode(text, add_special_tokens=False)


def test_extra_test_questions_leave_train_dev_and_test_as_they_were(splits):
    more = synthetic.make_splits(seed=7, n_train=400, n_dev=50, n_test=50, n_test_extra=30)
    assert more["train"] == splits["train"] and more["dev"] == splits["dev"]
    assert more["test"][:50] == splits["test"] and len(more["test"]) == 80
    assert [e.id for e in more["test"][50:]] == [f"test-{i}" for i in range(50, 80)]
    held_in = {e.question for e in splits["train"] + splits["dev"] + splits["test"]}
    extra = [e.question for e in more["test"][50:]]
    assert len(set(extra)) == 30 and not set(extra) & held_in


def test_config_fields_build_the_splits_and_a_misspelled_one_is_named():
    fields = dict(n_train=400, n_dev=50, n_test=50, n_test_extra=30)
    more = synthetic.make_splits(seed=7, n_train=400, n_dev=50, n_test=50, n_test_extra=30)
    assert synthetic.splits_from_fields(7, fields) == more
    with pytest.raises(ValueError, match=r"config field 'data.synthetic': .*max_stepz"):
        synthetic.splits_from_fields(7, dict(fields, max_stepz=3))
