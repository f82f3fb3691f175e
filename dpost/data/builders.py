"""Preference pairs (for DPO_k) and pseudo-labels (for SFT_k) from sampled rationales.

Implements the protocol sections "Preference pairs" and "Pseudo-labels" (the release's
``utils/make_dpo_data.py`` and ``utils/make_rft_data.py``). Two documented differences, both for
determinism and independence from a model tokenizer:

* Similarity is Jaccard over *token sets*. By default tokens are whitespace-separated words; the
  release used the model tokenizer's sub-word ``tokenize``. Pass ``tokenize=tokenizer.tokenize``
  to reproduce the release exactly.
* Among pairs with equal similarity the release's order came from ``random.shuffle``; here ties
  are broken by (positive index, negative index) after the gold-first, sorted order.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Iterable, Sequence

import numpy as np

from dpost.data import formatting
from dpost.data.gsm8k import extract_answer, is_correct

log = logging.getLogger(__name__)

Tokenize = Callable[[str], Sequence[str]]

MAX_PAIRS_PER_QUESTION = 3
DEDUP_THRESHOLD = 0.7
CAP_PERCENTILE = 90
DPO_EVAL_PAIRS = 320  # the first 320 pairs double as a small DPO eval set


@dataclasses.dataclass
class QuestionSamples:
    """One training question with its gold data and the completions sampled for it."""

    id: str
    question: str
    gold_rationale: str  # raw GSM8K rationale; formatted for the family when used
    gold: float
    samples: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class Pair:
    id: str
    prompt_question: str  # the raw question; format with formatting.format_prompt
    chosen: str
    rejected: str


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


def pool_samples(rounds: Iterable[Sequence[QuestionSamples]]) -> list[QuestionSamples]:
    """Merge per-question samples of several models (current and earlier) by question id.

    Question order and gold data come from the first round; samples are concatenated in round order.
    """
    merged: dict[str, QuestionSamples] = {}
    for questions in rounds:
        for q in questions:
            if q.id in merged:
                merged[q.id].samples.extend(q.samples)
            else:
                merged[q.id] = dataclasses.replace(q, samples=list(q.samples))
    return list(merged.values())


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


def split_samples(samples: Iterable[str], gold: float) -> tuple[list[str], list[str]]:
    """(correct, incorrect) samples; an answer that cannot be extracted counts as incorrect."""
    pos, neg = [], []
    for s in samples:
        (pos if is_correct(extract_answer(s), gold) else neg).append(s)
    return pos, neg


def build_pairs(questions: Sequence[QuestionSamples], family: str, *,
                max_pairs_per_question: int = MAX_PAIRS_PER_QUESTION,
                dedup_threshold: float = DEDUP_THRESHOLD,
                tokenize: Tokenize | None = None) -> list[Pair]:
    """Preference pairs: per question, the ``max_pairs_per_question`` least similar
    (correct, incorrect) pairs, the formatted gold rationale being the first positive.
    Questions without an incorrect sample are skipped."""
    pairs: list[Pair] = []
    skipped = 0
    for q in questions:
        pos, neg = split_samples(q.samples, q.gold)
        if not neg:
            skipped += 1
            continue
        gold = formatting.format_target(family, q.gold_rationale)
        pos = _drop_near_duplicates([gold] + sorted(set(pos)), dedup_threshold, tokenize)
        neg = _drop_near_duplicates(sorted(set(neg)), dedup_threshold, tokenize)
        pos_sets = [token_set(p, tokenize) for p in pos]
        neg_sets = [token_set(n, tokenize) for n in neg]
        scored = sorted((jaccard(ps, ns), i, j)
                        for i, ps in enumerate(pos_sets) for j, ns in enumerate(neg_sets))
        pairs.extend(Pair(q.id, q.question, pos[i], neg[j])
                     for _, i, j in scored[:max_pairs_per_question])
    log.info("preference pairs: %d from %d questions (%d skipped: no incorrect sample)",
             len(pairs), len(questions) - skipped, skipped)
    return pairs


def dpo_eval_pairs(pairs: Sequence[Pair], n: int = DPO_EVAL_PAIRS) -> list[Pair]:
    """The release's DPO eval set: the first ``n`` pairs (they stay in the training set too)."""
    return list(pairs[:n])


def pair_texts(pairs: Sequence[Pair], family: str) -> list[tuple[str, str, str]]:
    """(prompt_text, chosen, rejected) for ``pipeline.tokenize_pairs``."""
    return [(formatting.format_prompt(family, p.prompt_question), p.chosen, p.rejected) for p in pairs]


def label_texts(labels: Sequence[Label], family: str) -> list[tuple[str, str]]:
    """(prompt_text, target) for ``pipeline.tokenize_examples``; targets are not reformatted."""
    return [(formatting.format_prompt(family, l.question), l.target) for l in labels]


def pseudo_label_cap(counts: Sequence[int], percentile: float = CAP_PERCENTILE) -> int:
    """``int(np.percentile(counts, percentile))`` (linear interpolation, then truncation, as
    the release), at least 1."""
    if len(counts) == 0:
        return 1
    return max(1, int(np.percentile(np.asarray(counts, dtype=np.float64), percentile)))


def build_pseudo_labels(questions: Sequence[QuestionSamples], family: str, *,
                        dedup_threshold: float = DEDUP_THRESHOLD,
                        cap_percentile: float = CAP_PERCENTILE,
                        tokenize: Tokenize | None = None) -> list[Label]:
    """Pseudo-labels: per question the formatted gold rationale then the distinct correct
    samples (sorted), near-duplicates dropped, at most the ``cap_percentile``-th percentile of
    the per-question counts. Every question keeps its gold rationale."""
    kept_per_question: list[tuple[QuestionSamples, list[str]]] = []
    for q in questions:
        pos, _ = split_samples(q.samples, q.gold)
        gold = formatting.format_target(family, q.gold_rationale)
        kept = _drop_near_duplicates([gold] + sorted(set(pos)), dedup_threshold, tokenize)
        kept_per_question.append((q, kept))
    cap = pseudo_label_cap([len(k) for _, k in kept_per_question], cap_percentile)
    labels = [Label(q.id, q.question, t, q.gold) for q, kept in kept_per_question for t in kept[:cap]]
    log.info("pseudo-labels: %d for %d questions (cap %d per question)", len(labels), len(questions), cap)
    return labels
