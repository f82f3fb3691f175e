"""The builders against a transcription of the release's `utils/make_dpo_data.py` and
`utils/make_rft_data.py` (TianduoWang/DPO-ST), on hand-made samples, with a sub-word tokenizer.

The transcription keeps the release's logic line for line (file reading and writing aside): the
model tokenizer's `tokenize` for Jaccard, gold first, sorted exact de-duplication, the 0.7 threshold,
the 3 least similar pairs after a `random.shuffle` (seed 0), and the 90th-percentile cap computed
over the questions that have a label. dpost breaks similarity ties by position instead of the
shuffle, so pairs are compared as their similarity multisets, and as sets where no tie sits at the cut.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from dpost import stages
from dpost.data import builders, synthetic
from dpost.data.gsm8k import extract_answer, is_correct

# -- the transcription ---------------------------------------------------------------------------


def compare_similarity(string1, string2, t):
    data1, data2 = t.tokenize(string1), t.tokenize(string2)
    s1 = set(data1)
    s2 = set(data2)
    return float(len(s1.intersection(s2))) / float(len(s1.union(s2)))


def release_dpo(lst, tokenizer):
    """make_dpo_data.process_dpo_train; lst items: question, gold_ans, positives, negatives."""
    random.seed(0)
    sim_threshold = 0.7
    train_data_ls = []
    for item in lst:
        if len(item["negatives"]) == 0:
            continue
        positives = list(set(item["positives"]))
        negatives = list(set(item["negatives"]))
        positives.sort()
        negatives.sort()
        gold_rationale = item["gold_ans"]  # process_answer_func: the identity for llama
        positives = [gold_rationale] + positives
        positives_dedup = [positives[0]]
        if len(positives) > 1:
            for p in positives[1:]:
                indicator = True
                for p_n in positives_dedup:
                    if compare_similarity(p, p_n, tokenizer) > sim_threshold:
                        indicator = False
                        break
                if indicator:
                    positives_dedup.append(p)
            positives = positives_dedup
        negatives_dedup = [negatives[0]]
        if len(negatives) > 1:
            for p in negatives[1:]:
                indicator = True
                for p_n in negatives_dedup:
                    if compare_similarity(p, p_n, tokenizer) > sim_threshold:
                        indicator = False
                        break
                if indicator:
                    negatives_dedup.append(p)
        negatives = negatives_dedup
        random.shuffle(positives)
        random.shuffle(negatives)
        p_ls = []
        for positive in positives:
            for negative in negatives:
                sim_score = compare_similarity(positive, negative, tokenizer)
                p_ls.append(({"prompt": item["question"], "chosen": positive, "rejected": negative}, sim_score))
        p_ls.sort(key=lambda item: item[1])
        train_data_ls.append([(d["chosen"], d["rejected"], sim) for d, sim in p_ls[:3]] + [p_ls])
    return train_data_ls


def release_rft(lst, tokenizer, limit=0):
    """make_rft_data.process_rft_train (llama: the gold is not reformatted); items as above."""
    sim_threshold = 0.7
    train_data_ls, sol_pre_question = [], []
    for item in lst:
        origin_positives = list(item["positives"])
        gold_solution = item["gold_ans"]
        if len(gold_solution) > 1:
            origin_positives.append(gold_solution)
        else:
            gold_solution = None
        if len(origin_positives) == 0 and gold_solution is None:
            continue
        positives = list(set(origin_positives))
        positives.sort()
        positives_dedup = [gold_solution] if gold_solution else [positives[0]]
        if len(positives) > 1:
            for p in positives:
                indicator = True
                for p_n in positives_dedup:
                    if compare_similarity(p, p_n, tokenizer) > sim_threshold:
                        indicator = False
                        break
                if indicator:
                    positives_dedup.append(p)
            positives = positives_dedup
        max_threshold = 100 if limit == 0 else limit
        p_ls = [{"question": item["question"], "answer": p} for p in positives[:max_threshold]]
        sol_pre_question.append(len(p_ls))
        train_data_ls.extend(p_ls)
    if limit > 0:
        return train_data_ls
    return int(np.percentile(sol_pre_question, 90))


# -- hand-made samples -----------------------------------------------------------------------------

def _problems(n: int, seed: int = 5):
    rng = random.Random(seed)
    d = synthetic.Difficulty(min_steps=2, max_steps=3, max_start=20, max_operand=9, max_factor=4, max_value=200,
                             commute=0.3)
    return [synthetic.make_problem(rng, d) for _ in range(n)]


def _restyle(answer: str, rng: random.Random) -> str:
    """Another correct rationale: the same equations in freshly drawn phrasings (and openings)."""
    import re

    lines = answer.split("\n")
    eqs = [re.search(r"(\d+)([+\-*/])(\d+)=<<", line) for line in lines]
    steps = []
    for line, m in zip(lines, eqs):
        if m:
            a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
            r = int(re.search(r">>(\d+)", line).group(1))
            steps.append((op, a, b, r, False))
    name = "Ava"
    out = synthetic._sentence_rationale(rng, name, "apple", steps[0][1] if steps else 0, steps)
    return "\n".join(out + [lines[-1]])


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    rows = _problems(300, seed=11)
    texts = [r["question"] for r in rows] + [r["answer"] for r in rows]
    return synthetic.train_tokenizer(texts, tmp_path_factory.mktemp("tok"), vocab_size=400)


@pytest.fixture(scope="module")
def questions():
    """Per question: the gold, 2-5 alternative correct rationales (some exact or near copies), and
    1-4 incorrect ones (wrong final answers, a truncated one); every tenth question is answer-only."""
    rng = random.Random(3)
    out = []
    for i, row in enumerate(_problems(40)):
        samples = [_restyle(row["answer"], rng) for _ in range(rng.randint(2, 5))]
        samples.append(row["answer"])  # an exact copy of the gold
        for _ in range(rng.randint(0 if i % 4 == 0 else 1, 4)):
            wrong = _restyle(row["answer"], rng)
            samples.append(wrong.rsplit("#### ", 1)[0] + f"#### {int(row['ans']) + rng.randint(1, 9)}")
        if i % 5 == 0:
            samples.append(row["answer"].split("\n")[0])  # no final answer: invalid
        gold = "" if i % 10 == 3 else row["answer"]
        out.append(builders.QuestionSamples(f"q{i}", row["question"], gold, row["ans"], samples))
    return out


def _release_items(questions):
    items = []
    for q in questions:
        pos = [s for s in q.samples if is_correct(extract_answer(s), q.gold)]
        neg = [s for s in q.samples if not is_correct(extract_answer(s), q.gold)]
        items.append({"question": q.question, "gold_ans": q.gold_rationale, "positives": pos, "negatives": neg})
    return items


def test_pairs_match_the_release(questions, tokenizer):
    labeled = [q for q in questions if q.gold_rationale]  # the release's make_dpo_data needs a gold
    ours = builders.build_pairs(labeled, "llama", tokenize=tokenizer.tokenize)
    theirs = release_dpo(_release_items(labeled), tokenizer)
    assert len(theirs) > 20 and any(len(t) > 1 for t in theirs)
    by_question = {}
    for p in ours:
        by_question.setdefault(p.id, []).append(p)
    with_negatives = [q for q in labeled if any(not is_correct(extract_answer(s), q.gold) for s in q.samples)]
    assert [q.id for q in with_negatives] == list(by_question)
    ties = 0
    for q, release in zip(with_negatives, theirs):
        *kept, everything = release
        mine = by_question[q.id]
        sims = sorted(compare_similarity(p.chosen, p.rejected, tokenizer) for p in mine)
        assert sims == pytest.approx(sorted(s for _, _, s in kept))  # the same similarities kept
        cut_tied = len(everything) > 3 and everything[2][1] == everything[3][1]
        if cut_tied:
            ties += 1
        else:
            assert {(p.chosen, p.rejected) for p in mine} == {(c, r) for c, r, _ in kept}
    assert ties < len(with_negatives)


def test_pseudo_labels_match_the_release(questions, tokenizer):
    items = _release_items(questions)
    cap = release_rft(items, tokenizer)
    theirs = release_rft(items, tokenizer, cap)
    ours = builders.build_pseudo_labels(questions, "llama", tokenize=tokenizer.tokenize).labels
    assert cap > 1
    assert [(l.question, l.target) for l in ours] == [(d["question"], d["answer"]) for d in theirs]
    # Sub-word similarity keeps fewer labels than whitespace words do on these sentence rationales.
    words = builders.build_pseudo_labels(questions, "llama").labels
    assert len(words) != len(ours)


def test_stages_use_the_model_tokenizer(tokenizer):
    assert stages.similarity_tokens("subword", tokenizer)("Ava has 12 apples") == tokenizer.tokenize("Ava has 12 apples")
    assert stages.similarity_tokens("words", tokenizer) is None
    with pytest.raises(ValueError, match="similarity must be one of"):
        stages.similarity_tokens("word", tokenizer)


def test_distinct_phrasings_stay_distinct(tokenizer):
    """The CPU default's task: correct rationales in other phrasings survive sub-word Jaccard 0.7."""
    rng = random.Random(0)
    kept = []
    for row in _problems(50, seed=9):
        samples = [_restyle(row["answer"], rng) for _ in range(6)]
        q = builders.QuestionSamples("q", row["question"], row["answer"], row["ans"], samples)
        kept.append(len(builders.build_pseudo_labels([q], "llama", tokenize=tokenizer.tokenize, cap_percentile=100).labels))
    assert np.mean(kept) > 2.0  # gold plus, on average, more than one distinct sample


def test_equation_rationales_collapse(tokenizer):
    """The previous task's equation-only rationales: sub-word Jaccard leaves only the gold."""
    rng = random.Random(1)
    d = synthetic.Difficulty(min_steps=2, max_steps=3, max_start=20, max_operand=9, max_factor=4, max_value=200,
                             commute=0.5, style="equations")
    kept = []
    for _ in range(50):
        row = synthetic.make_problem(rng, d)
        lines = row["answer"].split("\n")
        swapped = []
        for line in lines[:-1]:  # the same steps, + and * operands written in the other order
            expr, rest = line.split("=<<", 1)
            for op in "+*":
                if op in expr:
                    a, b = expr.split(op)
                    line = line.replace(expr, f"{b}{op}{a}")
            swapped.append(line)
        q = builders.QuestionSamples("q", row["question"], row["answer"], row["ans"], ["\n".join(swapped + lines[-1:])])
        kept.append(len(builders.build_pseudo_labels([q], "llama", tokenize=tokenizer.tokenize, cap_percentile=100).labels))
    assert np.mean(kept) < 1.2


def test_dpo_eval_set_is_exactly_the_first_pairs():
    arrays = {"prompt": np.arange(700).reshape(350, 2), "valid": np.ones(350, np.int32)}
    batches = stages._eval_batches(arrays, 320, 96)
    assert [len(b["prompt"]) for b in batches] == [96] * 4  # one shape
    valid = np.concatenate([b["valid"] for b in batches])
    assert valid.sum() == 320 and valid[:320].all()
    rows = np.concatenate([b["prompt"] for b in batches])[valid.astype(bool)]
    np.testing.assert_array_equal(rows, arrays["prompt"][:320])
    assert arrays["valid"].all()  # the source arrays are not modified
    small = stages._eval_batches(arrays, 500, 96)  # fewer pairs than asked: all of them
    assert sum(b["valid"].sum() for b in small) == 350
