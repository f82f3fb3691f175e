"""Preference pairs (for DPO_k) and pseudo-labels (for SFT_k) from sampled rationales.

Implements the protocol sections "Preference pairs" and "Pseudo-labels" (the release's
``utils/make_dpo_data.py`` and ``utils/make_rft_data.py``):

* Similarity is Jaccard over token sets. The driver passes the model tokenizer's sub-word
  ``tokenize``, as the release does; without it (``tokenize=None``) tokens are whitespace words.
* A question may be answer-only (``gold_rationale == ""``, `data.labeled`): its pairs need a correct
  sample among the positives and its pseudo-labels are its correct samples, as the release's
  ``make_rft_data.py`` treats questions without a gold rationale.
* The pseudo-label cap is the percentile of the per-question counts over the questions that have
  at least one label (the release skips the others before counting).
* Among pairs with equal similarity the release's order came from ``random.shuffle``; here ties
  are broken by (positive index, negative index) after the gold-first, sorted order.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import Callable, Iterable, NamedTuple, Sequence

import numpy as np

from dpost import calculator
from dpost.data import formatting
from dpost.data.gsm8k import extract_answer, is_correct

log = logging.getLogger(__name__)

Tokenize = Callable[[str], Sequence[str]]

MAX_PAIRS_PER_QUESTION = 3
DEDUP_THRESHOLD = 0.7
CAP_PERCENTILE = 90
SIMILARITIES = ("subword", "words")  # Jaccard tokens: the model tokenizer's sub-word pieces | whitespace words
# Which (correct, incorrect) pairs a question keeps: the least similar (the release) or the most
# similar, whose two sides tend to share their wording and differ where the reasoning went wrong.
PAIR_SELECTIONS = ("least_similar", "most_similar")
# A pair's rejected side: the incorrect sample as sampled (the release), or the chosen side's text up
# to the sample's first wrong step followed by the sample's own text from there (`graft_at_wrong_step`),
# so that the two sides part where the reasoning went wrong rather than where the wording did.
PAIR_REJECTED = ("sample", "wrong_step")
# Where a step's sentence ends after its calculator annotation, per family (T5 targets are one line).
_STEP_END = {"llama": "\n", "t5": ". "}


@dataclasses.dataclass
class QuestionSamples:
    """One training question with its gold data and the completions sampled for it."""

    id: str
    question: str
    gold_rationale: str  # raw GSM8K rationale, formatted for the family when used; "" = answer-only
    gold: float
    samples: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class Pair:
    id: str
    prompt_question: str  # the raw question; format with formatting.format_prompt
    chosen: str
    rejected: str
    # `rejected="wrong_step"`: where each side's first step that differs from the other's ends
    # (a character offset; what `dpo.count=through_wrong_step` counts)
    chosen_step_end: int | None = None
    rejected_step_end: int | None = None


@dataclasses.dataclass(frozen=True)
class Label:
    """A pseudo-label. ``target`` is already in the family's target format (do not reformat)."""

    id: str
    question: str
    target: str
    gold: float


def token_set(text: str, tokenize: Tokenize | None = None) -> frozenset[str]:
    """Set of tokens of ``text``: whitespace words, or ``tokenize(text)`` when given."""
    return frozenset(tokenize(text) if tokenize is not None else text.split())


def jaccard(a: frozenset[str] | set[str], b: frozenset[str] | set[str]) -> float:
    """|a & b| / |a | b|; two empty sets are identical (1.0) rather than a division by zero."""
    union = len(a | b)
    return len(a & b) / union if union else 1.0


def _drop_near_duplicates(texts: Sequence[str], threshold: float, tokenize: Tokenize | None) -> list[str]:
    """Scan in order; drop a text whose Jaccard with an already kept one is > threshold."""
    kept: list[str] = []
    kept_sets: list[frozenset[str]] = []
    for text in texts:
        s = token_set(text, tokenize)
        if all(jaccard(s, k) <= threshold for k in kept_sets):
            kept.append(text)
            kept_sets.append(s)
    return kept


def _gold_first(q: QuestionSamples, family: str, correct: Sequence[str]) -> list[str]:
    """Positives in the release's order: the formatted gold rationale (labeled questions) first,
    then the distinct correct samples, sorted."""
    gold = [formatting.format_target(family, q.gold_rationale)] if q.gold_rationale else []
    return gold + sorted(set(correct))


def split_samples(samples: Iterable[str], gold: float) -> tuple[list[str], list[str]]:
    """(correct, incorrect) samples; an answer that cannot be extracted counts as incorrect."""
    pos, neg = [], []
    for s in samples:
        (pos if is_correct(extract_answer(s), gold) else neg).append(s)
    return pos, neg


def pass_rates(questions: Sequence[QuestionSamples]) -> dict:
    """How good one model's samples are on the training questions: pass@1 (the mean fraction of
    correct samples per question), pass@n (the fraction of questions with a correct sample among
    its n), and the number of such questions. The paper's mechanism: DPO raises pass@n."""
    correct = np.array([len(split_samples(q.samples, q.gold)[0]) for q in questions], np.float64)
    total = np.array([max(1, len(q.samples)) for q in questions], np.float64)
    if not len(questions):
        return {"questions": 0, "pass_at_1": 0.0, "pass_at_n": 0.0, "questions_with_correct": 0}
    return {"questions": len(questions), "pass_at_1": float(np.mean(correct / total)),
            "pass_at_n": float(np.mean(correct > 0)), "questions_with_correct": int(np.sum(correct > 0))}


def _steps(text: str, family: str) -> list[tuple[int, str]]:
    """Per calculator annotation: where its step's sentence ends (offset just past it) and the result
    the annotation states (the text after its last ``=``)."""
    open_, close = calculator.markers(family)
    sep = _STEP_END[family]
    steps = []
    for m in re.finditer(re.escape(open_) + "(.*?)" + re.escape(close), text):
        end = text.find(sep, m.end())
        steps.append((len(text) if end < 0 else end + len(sep), m.group(1).rpartition("=")[2].strip()))
    return steps


def _same_result(a: str, b: str) -> bool:
    """Two stated results agree: numbers by the answers' rule (`is_correct`), anything else as text."""
    x, y = calculator.evaluate_number(a), calculator.evaluate_number(b)
    return a == b if x is None or y is None else is_correct(x, y)


class Graft(NamedTuple):
    rejected: str
    chosen_step_end: int  # where the chosen side's first step after the shared ones ends
    rejected_step_end: int  # where the grafted side's first wrong step ends


def graft_at_wrong_step(chosen: str, rejected: str, family: str) -> Graft:
    """``chosen`` through the last calculator step on which ``rejected`` agrees with it (same result at
    the same step number), then ``rejected``'s own text after that step. The steps before the first
    disagreement have the same results on both sides, so the graft is the rejected reasoning from its
    first wrong step on, after the chosen side's wording of what went right. No agreeing first step:
    ``rejected`` unchanged. A side without a step after the shared ones ends at its end."""
    c_steps, r_steps = _steps(chosen, family), _steps(rejected, family)
    agree = 0
    while agree < min(len(c_steps), len(r_steps)) and _same_result(c_steps[agree][1], r_steps[agree][1]):
        agree += 1
    c_cut, r_cut = (c_steps[agree - 1][0], r_steps[agree - 1][0]) if agree else (0, 0)
    grafted = chosen[:c_cut] + rejected[r_cut:]
    c_end = c_steps[agree][0] if agree < len(c_steps) else len(chosen)
    r_end = c_cut + r_steps[agree][0] - r_cut if agree < len(r_steps) else len(grafted)
    return Graft(grafted, c_end, r_end)


def _pair(q: QuestionSamples, chosen: str, rejected: str, family: str, how: str) -> Pair:
    if how == "sample":
        return Pair(q.id, q.question, chosen, rejected)
    return Pair(q.id, q.question, chosen, *graft_at_wrong_step(chosen, rejected, family))


def build_pairs(questions: Sequence[QuestionSamples], family: str, *,
                max_pairs_per_question: int = MAX_PAIRS_PER_QUESTION,
                dedup_threshold: float = DEDUP_THRESHOLD,
                tokenize: Tokenize | None = None,
                select: str = "least_similar", rejected: str = "sample") -> list[Pair]:
    """Preference pairs: per question, the ``max_pairs_per_question`` least similar (or, with
    ``select="most_similar"``, most similar) (correct, incorrect) pairs, the formatted gold
    rationale being the first positive. Ties keep (positive index, negative index) order either way.
    Questions without an incorrect sample are skipped. ``rejected="wrong_step"``: each pair's
    rejected side is `graft_at_wrong_step` of its two sides (similarities are the grafted side's), and
    the pair records where each side's first differing step ends."""
    if select not in PAIR_SELECTIONS:
        raise ValueError(f"select must be one of {PAIR_SELECTIONS}, got {select!r}")
    if rejected not in PAIR_REJECTED:
        raise ValueError(f"rejected must be one of {PAIR_REJECTED}, got {rejected!r}")
    sign = 1.0 if select == "least_similar" else -1.0
    pairs: list[Pair] = []
    skipped = 0
    for q in questions:
        pos, neg = split_samples(q.samples, q.gold)
        if not neg:
            skipped += 1
            continue
        pos = _drop_near_duplicates(_gold_first(q, family, pos), dedup_threshold, tokenize)
        if not pos:  # answer-only question without a correct sample
            skipped += 1
            continue
        neg = _drop_near_duplicates(sorted(set(neg)), dedup_threshold, tokenize)
        candidates = {(i, j): _pair(q, p, n, family, rejected) for i, p in enumerate(pos) for j, n in enumerate(neg)}
        sets = {text: token_set(text, tokenize) for c in candidates.values() for text in (c.chosen, c.rejected)}
        scored = sorted((sign * jaccard(sets[c.chosen], sets[c.rejected]), i, j) for (i, j), c in candidates.items())
        pairs.extend(candidates[i, j] for _, i, j in scored[:max_pairs_per_question])
    log.info("preference pairs: %d from %d questions (%d skipped: no incorrect or no correct side)",
             len(pairs), len(questions) - skipped, skipped)
    return pairs


def pseudo_label_cap(counts: Sequence[int], percentile: float = CAP_PERCENTILE) -> int:
    """``int(np.percentile(counts, percentile))`` (linear interpolation, then truncation, as
    the release), at least 1."""
    if len(counts) == 0:
        return 1
    return max(1, int(np.percentile(np.asarray(counts, dtype=np.float64), percentile)))


class PseudoLabels(NamedTuple):
    """The pseudo-labels and how the pooled correct samples thinned out on the way (gold rationales
    not counted): all correct samples, their distinct texts, those left after near-duplicate removal,
    and those under the cap (`beyond_gold`). Where DPO-ST's extra correct samples are lost shows here."""

    labels: list[Label]
    correct: int
    distinct: int
    after_dedup: int
    beyond_gold: int
    cap: int


def build_pseudo_labels(questions: Sequence[QuestionSamples], family: str, *,
                        dedup_threshold: float = DEDUP_THRESHOLD,
                        cap_percentile: float = CAP_PERCENTILE,
                        tokenize: Tokenize | None = None) -> PseudoLabels:
    """Pseudo-labels: per question the formatted gold rationale (if any) then the distinct correct
    samples (sorted), near-duplicates dropped, at most the ``cap_percentile``-th percentile of the
    per-question counts (over questions with a label). Every labeled question keeps its gold."""
    kept_per_question: list[tuple[QuestionSamples, list[str]]] = []
    correct = distinct = 0
    for q in questions:
        pos, _ = split_samples(q.samples, q.gold)
        correct, distinct = correct + len(pos), distinct + len(set(pos))
        kept = _drop_near_duplicates(_gold_first(q, family, pos), dedup_threshold, tokenize)
        if kept:  # an answer-only question without a correct sample has no label
            kept_per_question.append((q, kept))
    cap = pseudo_label_cap([len(k) for _, k in kept_per_question], cap_percentile)
    labels = [Label(q.id, q.question, t, q.gold) for q, kept in kept_per_question for t in kept[:cap]]
    golds = sum(1 for q, _ in kept_per_question if q.gold_rationale)
    after_dedup = sum(len(k) for _, k in kept_per_question) - golds
    log.info("pseudo-labels: %d for %d questions (cap %d per question); correct samples %d, distinct %d, "
             "after de-dup %d, under the cap %d (gold not counted)", len(labels), len(questions), cap,
             correct, distinct, after_dedup, len(labels) - golds)
    return PseudoLabels(labels, correct, distinct, after_dedup, len(labels) - golds, cap)
