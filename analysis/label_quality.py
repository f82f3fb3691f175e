"""What the pseudo-labels beyond gold say, on the synthetic task, recomputed from finished runs.

    python analysis/label_quality.py RUN [RUN ...]   # st or dpo_st run directories (e.g. WORKDIR/st/seed_80)

A pseudo-label is a correct sample: its final answer is right, its text is the model's. Per label
beyond gold (every stored label whose text is not its question's gold rationale; answer-only
questions' gold rationales included, from the run's data/train.jsonl): whether its calculator
results are the gold rationale's, in order (the same chain of steps: "same steps"), whether it has
fewer or more of them, and whether it names a person or an item other than its question's (a wrong
entity: the sample copied another problem's wording). Prints one markdown table of means per method
and iteration, and per iteration the paired difference dpo_st - st over the seeds both methods ran.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from etils import epath  # noqa: E402

from dpost import calculator, stages  # noqa: E402
from dpost.data import gsm8k, synthetic  # noqa: E402
from dpost.workdir import StageDir  # noqa: E402
from label_funnel import run_config  # noqa: E402

COLUMNS = ("beyond gold", "questions", "same steps %", "fewer steps %", "more steps %", "wrong entity %")
# labels keep the dataset's GSM8K annotations (``<<12+5=17>>``) whatever the model family
_OPEN, _CLOSE = re.escape(calculator.LLAMA_OPEN), re.escape(calculator.LLAMA_CLOSE)
CALCULATOR_RESULT = re.compile(_OPEN + r"[^<>=]*=([^<>]*)" + _CLOSE)
ENTITIES = synthetic.NAMES + synthetic.CORPUS_NAMES + tuple(w for i in synthetic.ITEMS for w in (i, i + "s"))
_WORD = re.compile(r"[A-Za-z]+")


def question_entities(question: str) -> set[str]:
    """The names and items (both numbers) a question mentions."""
    found = set(_WORD.findall(question)) & set(ENTITIES)
    items = {i for i in synthetic.ITEMS if i in found or i + "s" in found}
    return found | items | {i + "s" for i in items}


def label_flags(target: str, gold_rationale: str, question: str) -> tuple[bool, bool, bool, bool]:
    """(same steps, fewer steps, more steps, wrong entity) of one label against its gold rationale."""
    got, gold = CALCULATOR_RESULT.findall(target), CALCULATOR_RESULT.findall(gold_rationale)
    foreign = set(_WORD.findall(target)) & set(ENTITIES) - question_entities(question)
    return got == gold, len(got) < len(gold), len(got) > len(gold), bool(foreign)


def run_quality(run: epath.Path) -> tuple[str, dict[int, np.ndarray]]:
    """(method, {iteration: the COLUMNS' values}) of one run."""
    config = run_config(run)
    gold = {ex.id: ex for ex in gsm8k.load_jsonl(str(run / "data" / "train.jsonl"), "train")}
    out = {}
    for k in range(1, config.iterations + 1):
        stage = run / f"iter_{k}" / "pseudo_labels"
        if not stage.exists():
            break
        labels = [r for r in stages.read_labels(StageDir(stage, "")) if r["target"] != gold[r["id"]].answer]
        flags = np.array([label_flags(r["target"], gold[r["id"]].answer, r["question"]) for r in labels],
                         dtype=float).reshape(-1, 4)
        percent = 100 * flags.mean(axis=0) if len(labels) else np.zeros(4)
        out[k] = np.array([len(labels), len({r["id"] for r in labels}), *percent])
    return config.method, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+")
    args = ap.parse_args()
    per = collections.defaultdict(dict)  # (method, iteration) -> {seed folder: values}
    for run in args.runs:
        method, rows = run_quality(epath.Path(run))
        for k, values in rows.items():
            per[method, k][epath.Path(run).name] = values
    print("| method | iteration | runs | " + " | ".join(COLUMNS) + " |")
    print("|" + " --- |" * (len(COLUMNS) + 3))
    for (method, k), runs in sorted(per.items(), key=lambda item: (item[0][1], item[0][0] != "st")):
        mean = np.mean(list(runs.values()), axis=0)
        print(f"| {method} | {k} | {len(runs)} | " + " | ".join(f"{v:.1f}" for v in mean) + " |")
    for k in sorted({k for _, k in per}):
        st, dpo = per.get(("st", k), {}), per.get(("dpo_st", k), {})
        seeds = sorted(st.keys() & dpo.keys())
        if len(seeds) > 1:
            diff = np.array([dpo[s] - st[s] for s in seeds])
            print(f"- iteration {k}, dpo_st - st over {len(seeds)} seeds: " + ", ".join(
                f"{c} {m:+.1f} (sd {s:.1f})" for c, m, s in zip(COLUMNS, diff.mean(0), diff.std(0, ddof=1))))


if __name__ == "__main__":
    main()
