"""How each iteration's pooled correct samples became pseudo-labels, recomputed from finished runs.

    python analysis/label_funnel.py RUN [RUN ...]   # st or dpo_st run directories (e.g. WORKDIR/st/seed_3)

Runs whose results.json predates the funnel's fields (`correct_samples`, `distinct_samples`,
`after_dedup`, `cap`) can be read here: per iteration, the run's stored label samples are pooled as
the driver pools them and passed to `builders.build_pseudo_labels` with the run's own settings and
model tokenizer (the count must equal the stored labels', else the run is refused). Also: of the
distinct correct samples, how many were dropped as near-duplicates of the gold rationale and how many
as near-duplicates of another kept sample. Prints one markdown table of means per method and iteration.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys

import ml_collections
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from etils import epath  # noqa: E402

from dpost import stages  # noqa: E402
from dpost.driver import LABEL_SAMPLING  # noqa: E402
from dpost.data import builders, formatting  # noqa: E402
from dpost.data.task import load_task  # noqa: E402
from dpost.models import sources  # noqa: E402
from dpost.workdir import CONFIG_FILE, StageDir  # noqa: E402

COLUMNS = ("correct", "distinct", "after de-dup", "beyond gold", "cap", "dropped near gold", "dropped near a sample")


def run_config(run: epath.Path) -> ml_collections.ConfigDict:
    """The run's config.json (flat keys) as the nested ConfigDict the driver used."""
    nested: dict = {}
    for key, value in json.loads((run / CONFIG_FILE).read_text())["config"].items():
        *parents, leaf = key.split(".")
        node = nested
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = tuple(value) if isinstance(value, list) else value
    return ml_collections.ConfigDict(nested)


def drop_reasons(q: builders.QuestionSamples, family: str, threshold: float, tokenize) -> tuple[int, int]:
    """(near the gold, near another kept sample) among q's distinct correct samples that de-duplication
    drops, in `build_pseudo_labels`' order (gold first, then the sorted samples)."""
    correct, _ = builders.split_samples(q.samples, q.gold)
    gold = builders.token_set(formatting.format_target(family, q.gold_rationale), tokenize) if q.gold_rationale else None
    kept, near_gold, near_sample = [], 0, 0
    for text in sorted(set(correct)):
        s = builders.token_set(text, tokenize)
        if gold is not None and builders.jaccard(s, gold) > threshold:
            near_gold += 1
        elif any(builders.jaccard(s, k) > threshold for k in kept):
            near_sample += 1
        else:
            kept.append(s)
    return near_gold, near_sample


def funnel(run: epath.Path) -> tuple[str, dict[int, tuple]]:
    """(method, {iteration: the COLUMNS' values}) of one run."""
    config = run_config(run)
    family = config.model.family
    examples = load_task(config, str(run)).train
    tokenizer = sources._load_tokenizer(str(run / "iter_0" / "sft" / stages.MODEL_DIR / sources.TOKENIZER_DIR), str(run))
    tokenize = stages.similarity_tokens(config.pseudo_labels.similarity, tokenizer)
    threshold = config.pseudo_labels.dedup_threshold
    rounds, out = [], {}
    for k in range(1, config.iterations + 1):
        if not (run / f"iter_{k}" / "pseudo_labels").exists():
            break
        rounds.append(stages.read_samples(StageDir(run / f"iter_{k}" / LABEL_SAMPLING.stage, "")))
        questions = stages.question_samples(examples, rounds)
        built = builders.build_pseudo_labels(questions, family, dedup_threshold=threshold,
                                             cap_percentile=config.pseudo_labels.cap_percentile, tokenize=tokenize)
        stored = len(stages.read_labels(StageDir(run / f"iter_{k}" / "pseudo_labels", "")))
        if stored != len(built.labels):
            raise SystemExit(f"{run}: iteration {k}: recomputed {len(built.labels)} pseudo-labels, stored {stored}")
        reasons = np.sum([drop_reasons(q, family, threshold, tokenize) for q in questions], axis=0)
        out[k] = (built.correct, built.distinct, built.after_dedup, built.beyond_gold, built.cap, *reasons)
    return config.method, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+")
    args = ap.parse_args()
    per = collections.defaultdict(list)
    for run in args.runs:
        method, rows = funnel(epath.Path(run))
        for k, values in rows.items():
            per[method, k].append(values)
    print("| method | iteration | runs | " + " | ".join(COLUMNS) + " |")
    print("|" + " --- |" * (len(COLUMNS) + 3))
    for (method, k), values in sorted(per.items(), key=lambda item: (item[0][1], item[0][0])):
        mean = np.mean(values, axis=0)
        print(f"| {method} | {k} | {len(values)} | " + " | ".join(f"{v:.1f}" for v in mean) + " |")


if __name__ == "__main__":
    main()
