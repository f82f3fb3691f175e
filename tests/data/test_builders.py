"""Preference pairs and pseudo-labels on hand-made cases whose answers are worked out by hand
(similarities are Jaccard over whitespace-token sets), plus counts on a small real sample."""

from __future__ import annotations

import pytest

from tests.conftest import data_dir
from dpost.data import builders, formatting, gsm8k
from dpost.data.builders import Label, Pair, QuestionSamples, build_pairs, build_pseudo_labels, jaccard, token_set


def q(samples, gold_rationale="a b c #### 1", gold=1.0, qid="q1", question="Q?"):
    return QuestionSamples(qid, question, gold_rationale, gold, list(samples))


def test_token_set_and_jaccard():
    assert token_set("a b  a\nc") == {"a", "b", "c"}
    assert token_set("ab", tokenize=list) == {"a", "b"}
    assert jaccard(token_set("a b c"), token_set("b c d")) == 2 / 4
    assert jaccard(frozenset(), frozenset()) == 1.0
    assert jaccard(token_set("a"), frozenset()) == 0.0


def test_question_without_negative_is_skipped():
    # every sample is correct ("1.0" and "1," parse to 1.0): no negative, no pair
    assert build_pairs([q(["x #### 1", "y #### 1.0", "z #### 1,"])], "llama") == []


def test_invalid_answer_counts_as_negative_and_gold_is_first_positive():
    # No correct sample at all: the gold rationale is the only positive.
    pairs = build_pairs([q(["I do not know"])], "llama")
    assert pairs == [Pair("q1", "Q?", "a b c #### 1", "I do not know")]


def test_gold_is_formatted_for_the_family():
    raw = "2+2=<<2+2=4>>4\n#### 4"
    (pair,) = build_pairs([q(["#### 5"], gold_rationale=raw, gold=4.0)], "t5")
    assert pair.chosen == formatting.t5_rationale(raw) == "2 + 2 = [ 2 + 2 = 4] 4. #### 4"


def test_three_least_similar_pairs_with_stable_ties():
    gold = "a b c #### 1"  # G
    p1 = "x y z w #### 1"
    n1, n2, n3 = "a b c #### 2", "q r s t u #### 2", "a q r v #### 3"
    pairs = build_pairs([q([n2, p1, n1, n3, n1])], "llama")
    # Jaccard: G-N1 4/6, G-N3 2/9, G-N2 1/11, P1-N1 1/10, P1-N3 1/11, P1-N2 1/12.
    # Sorted: P1-N2 (1/12); then the 1/11 tie G-N2 (positive 0) before P1-N3 (positive 1).
    assert [(p.chosen, p.rejected) for p in pairs] == [(p1, n2), (gold, n2), (p1, n3)]
    two = build_pairs([q([n2, p1, n1, n3])], "llama", max_pairs_per_question=2)
    assert [(p.chosen, p.rejected) for p in two] == [(p1, n2), (gold, n2)]


def test_most_similar_pairs_option():
    gold = "a b c #### 1"
    p1 = "x y z w #### 1"
    n1, n2, n3 = "a b c #### 2", "q r s t u #### 2", "a q r v #### 3"
    pairs = build_pairs([q([n2, p1, n1, n3])], "llama", select="most_similar")
    # Jaccard (as above): G-N1 4/6 > G-N3 2/9 > P1-N1 1/10 > the rest.
    assert [(p.chosen, p.rejected) for p in pairs] == [(gold, n1), (gold, n3), (p1, n1)]
    # Equal similarities keep (positive, negative) order, as the default does.
    tied = build_pairs([q(["k #### 2", "m #### 3"], gold_rationale="g #### 1")], "llama", select="most_similar")
    assert [p.rejected for p in tied] == ["k #### 2", "m #### 3"]
    with pytest.raises(ValueError, match="select must be one of"):
        build_pairs([q([n1])], "llama", select="most")


def test_exact_dedup_sorting_then_near_duplicates():
    na, nb = "a p q r s #### 2", "b p q r s #### 2"  # Jaccard 6/8 = 0.75 > 0.7
    # Whatever the sample order, sorting keeps "a p q ..." and drops its near-duplicate.
    for samples in ([nb, na, nb], [na, nb], [nb, nb, na, na]):
        pairs = build_pairs([q(samples, gold_rationale="g h #### 1")], "llama")
        assert [(p.chosen, p.rejected) for p in pairs] == [("g h #### 1", na)]


def test_near_duplicate_threshold_is_strict():
    gold = "a b c d e f g h #### 1"  # 10 tokens
    s_dup = "a b c d e f g h i #### 1"  # 10/11 > 0.7: dropped (near-duplicate of the gold)
    s_edge = "a b c d e #### 1"  # 7/10 == 0.7: kept (only > 0.7 drops)
    s_far = "t u v w #### 1"
    labels = build_pseudo_labels([q([s_dup, s_edge, s_far, "t u v w #### 1", "wrong #### 9"], gold_rationale=gold)],
                                 "llama", cap_percentile=100).labels
    assert [l.target for l in labels] == [gold, s_edge, s_far]


@pytest.mark.parametrize("counts,cap", [([1] * 10, 1), (list(range(1, 11)), 9), ([3, 3, 3], 3), ([], 1), ([1, 1, 1, 1, 1, 1, 1, 1, 1, 50], 5)])
def test_percentile_cap(counts, cap):
    # numpy linear interpolation then int(): 1..10 -> 9.1 -> 9; nine 1s and a 50 -> 1 + 0.1 * 49 = 5.9 -> 5
    assert builders.pseudo_label_cap(counts) == cap


def test_pseudo_labels_cap_and_gold_first():
    questions = []
    for k in range(1, 11):  # question k has k-1 distinct correct samples plus its gold: k labels
        samples = [f"s{k}x{j} t{k}x{j} #### {k}" for j in range(k - 1)] + [f"bad{k} #### -1"]
        questions.append(q(samples, gold_rationale=f"gold{k} #### {k}", gold=float(k), qid=f"q{k}"))
    labels = build_pseudo_labels(questions, "llama").labels
    per_q = {qq.id: [l for l in labels if l.id == qq.id] for qq in questions}
    assert [len(v) for v in per_q.values()] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 9]  # cap int(9.1) = 9
    for k, v in enumerate(per_q.values(), start=1):
        assert v[0] == Label(f"q{k}", "Q?", f"gold{k} #### {k}", float(k))  # gold first, always kept
        assert all("bad" not in l.target for l in v)
    assert [l.target for l in per_q["q10"]][1:] == sorted(f"s10x{j} t10x{j} #### 10" for j in range(9))[:8]


def test_pseudo_label_counts_follow_the_samples_to_the_labels():
    """correct -> distinct -> after de-dup -> under the cap, gold rationales not counted (by hand)."""
    gold = "a b c d e f g h #### 1"
    labeled = q(["a b c d e f g h i #### 1",  # near-duplicate of the gold (10/11 > 0.7)
                 "t u v w #### 1", "t u v w #### 1",  # one text twice
                 "p q r s #### 1", "x #### 9"], gold_rationale=gold)
    answer_only = q(["k l #### 2"], gold_rationale="", gold=2.0, qid="q2")
    no_correct = q(["z #### 9"], gold_rationale="m n o #### 3", gold=3.0, qid="q3")
    built = build_pseudo_labels([labeled, answer_only, no_correct], "llama")
    # kept per question (gold included): 3, 1, 1 -> int(percentile([1, 1, 3], 90)) = int(2.6) = 2,
    # so q1 keeps its gold and the first of its two sorted distinct samples
    assert (built.correct, built.distinct, built.after_dedup, built.beyond_gold, built.cap) == (5, 4, 3, 2, 2)
    assert [(l.id, l.target) for l in built.labels] == [("q1", gold), ("q1", "p q r s #### 1"),
                                                        ("q2", "k l #### 2"), ("q3", "m n o #### 3")]


def test_pass_rates():
    qs = [q(["x #### 1", "y #### 2", "z #### 1", "w"]), q(["#### 3", "#### 3"], gold=2.0, qid="q2"), q([], qid="q3")]
    rates = builders.pass_rates(qs)
    # per-question correct fractions 2/4, 0/2, 0 (no samples): pass@1 = (0.5 + 0 + 0) / 3
    assert rates == {"questions": 3, "pass_at_1": 0.5 / 3, "pass_at_n": 1 / 3, "questions_with_correct": 1}


def test_answer_only_questions():
    """No gold rationale (data.labeled): pairs need a correct sample, labels are the correct samples."""
    only_wrong = q(["x y #### 2", "I do not know"], gold_rationale="")
    assert build_pairs([only_wrong], "llama") == []
    assert build_pseudo_labels([only_wrong], "llama").labels == []
    mixed = q(["p q r #### 1", "x y #### 2", "p q r #### 1"], gold_rationale="", qid="q2")
    assert build_pairs([mixed], "llama") == [Pair("q2", "Q?", "p q r #### 1", "x y #### 2")]
    labeled = q(["s t #### 1", "u v w #### 1"], qid="q3")
    labels = build_pseudo_labels([only_wrong, mixed, labeled], "llama", cap_percentile=100).labels
    assert [(l.id, l.target) for l in labels] == [("q2", "p q r #### 1"), ("q3", "a b c #### 1"),
                                                  ("q3", "s t #### 1"), ("q3", "u v w #### 1")]


def test_cap_counts_only_questions_with_labels():
    """The release's make_rft_data skips a question with neither gold nor correct sample before the
    percentile: nine questions without labels must not pull the cap down to 1."""
    empty = [q(["#### 9"], gold_rationale="", qid=f"e{i}") for i in range(9)]
    three = q(["k l #### 1", "m n #### 1"], qid="full")
    labels = build_pseudo_labels(empty + [three], "llama").labels
    assert len(labels) == 3


def test_small_real_sample():
    """Gold rationales of dev questions as 'samples' of other questions' answers: every
    question gets its own gold as a positive and a foreign rationale as a negative."""
    rows = gsm8k.load_split("dev", data_dir())[:30]
    questions = [QuestionSamples(r.id, r.question, r.answer, r.gold,
                                 [r.answer, rows[(i + 1) % len(rows)].answer, "no idea"])
                 for i, r in enumerate(rows)]
    for family in ("llama", "t5"):
        pairs = build_pairs(questions, family)
        # negatives per question: the foreign rationale (unless it has the same answer) + "no idea";
        # positives: the gold (its raw copy is a near-duplicate for llama; for t5 the formatted gold
        # and the raw sample differ enough to be kept or not) -> 2 to 3 pairs each.
        per_q = {}
        for p in pairs:
            per_q[p.id] = per_q.get(p.id, 0) + 1
            assert gsm8k.is_correct(gsm8k.extract_answer(p.chosen), next(r.gold for r in rows if r.id == p.id))
        assert set(per_q) == {r.id for r in rows}
        assert all(1 <= n <= 3 for n in per_q.values())
        if family == "llama":
            assert all(n == 2 for n in per_q.values())
        labels = build_pseudo_labels(questions, family).labels
        assert {l.id for l in labels} == {r.id for r in rows}
        if family == "llama":  # the raw gold sample is an exact duplicate of the gold: one label each
            assert len(labels) == len(rows)


# -- pairs.rejected=wrong_step: the rejected side grafted at the sample's first wrong step ----------

def graft(chosen, rejected, family="llama"):
    """(grafted rejected side, chosen side through its first differing step, grafted side through its own)."""
    g = builders.graft_at_wrong_step(chosen, rejected, family)
    return g.rejected, chosen[: g.chosen_step_end], g.rejected[: g.rejected_step_end]


def test_graft_at_wrong_step_llama():
    chosen = "a is 1+1=<<1+1=2>>2.\nb is 2*3=<<2*3=6>>6.\n#### 6"
    # Agrees on step 1 (same result, other wording), goes wrong at step 2.
    wrong = "x was 1+1=<<1+1=2>>2 now.\ny is 2*2=<<2*2=4>>4.\n#### 4"
    assert graft(chosen, wrong) == ("a is 1+1=<<1+1=2>>2.\ny is 2*2=<<2*2=4>>4.\n#### 4",
                                    "a is 1+1=<<1+1=2>>2.\nb is 2*3=<<2*3=6>>6.\n",
                                    "a is 1+1=<<1+1=2>>2.\ny is 2*2=<<2*2=4>>4.\n")
    # Wrong from the first step: nothing to graft onto; each side counts through its first step.
    first = "z is 1+2=<<1+2=3>>3.\n#### 3"
    assert graft(chosen, first) == (first, "a is 1+1=<<1+1=2>>2.\n", "z is 1+2=<<1+2=3>>3.\n")
    # Every step agrees (a commuted expression, 6.0 for 6), the answer line does not: both count whole.
    late = "1+1=<<1+1=2>>2\n3*2=<<3*2=6.0>>6.0\nSo 7.\n#### 7"
    grafted = "a is 1+1=<<1+1=2>>2.\nb is 2*3=<<2*3=6>>6.\nSo 7.\n#### 7"
    assert graft(chosen, late) == (grafted, chosen, grafted)
    # Stops after one agreeing step: the chosen side counts through its second step, the graft whole.
    short = "1+1=<<1+1=2>>2\n#### 2"
    assert graft(chosen, short) == ("a is 1+1=<<1+1=2>>2.\n#### 2", "a is 1+1=<<1+1=2>>2.\nb is 2*3=<<2*3=6>>6.\n",
                                    "a is 1+1=<<1+1=2>>2.\n#### 2")


def test_graft_at_wrong_step_t5():
    chosen = formatting.t5_rationale("a is 10+1=<<10+1=11>>11\nb is 11*3=<<11*3=33>>33\n#### 33")
    wrong = formatting.t5_rationale("x was 10+1=<<10+1=11>>11 now\ny is 11*2=<<11*2=22>>22\n#### 22")
    assert graft(chosen, wrong, "t5") == (
        "a is 10 + 1 = [ 10 + 1 = 11] 11. y is 11 * 2 = [ 11 * 2 = 22] 22. #### 22",
        "a is 10 + 1 = [ 10 + 1 = 11] 11. b is 11 * 3 = [ 11 * 3 = 33] 33. ",
        "a is 10 + 1 = [ 10 + 1 = 11] 11. y is 11 * 2 = [ 11 * 2 = 22] 22. ")


def test_wrong_step_pairs():
    gold = "a is 1+1=<<1+1=2>>2.\nb is 2*3=<<2*3=6>>6.\n#### 6"
    n1 = "x was 1+1=<<1+1=2>>2 now.\ny is 2*2=<<2*2=4>>4.\n#### 4"
    n2 = "z is 1+2=<<1+2=3>>3.\n#### 3"
    pairs = build_pairs([q([n1, n2], gold_rationale=gold, gold=6.0)], "llama", rejected="wrong_step")
    grafted = "a is 1+1=<<1+1=2>>2.\ny is 2*2=<<2*2=4>>4.\n#### 4"
    # Jaccard over words with gold: n1 2/14, n2 2/10 (no step shared: unchanged), n1's graft 4/10.
    assert [(p.chosen, p.rejected) for p in pairs] == [(gold, n2), (gold, grafted)]
    assert [(p.chosen[: p.chosen_step_end], p.rejected[: p.rejected_step_end]) for p in pairs] == [
        ("a is 1+1=<<1+1=2>>2.\n", n2[:-6]), (gold[:-6], grafted[:-6])]  # without "#### N"
    assert build_pairs([q([n1, n2], gold_rationale=gold, gold=6.0)], "llama") == \
        [Pair("q1", "Q?", gold, n1), Pair("q1", "Q?", gold, n2)]
    with pytest.raises(ValueError, match="rejected must be one of"):
        build_pairs([q([n1])], "llama", rejected="graft")
