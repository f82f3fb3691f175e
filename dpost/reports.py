"""results.json (design.md schema), report.md and accuracy.png for one run or a comparison."""

from __future__ import annotations

import io
from typing import Sequence

import numpy as np
from etils import epath

from dpost import stats
from dpost.workdir import write_json_atomic, write_text_atomic


# -- results.json stage entries ---------------------------------------------------------------------
# An entry names the model a training stage made, what it cost (that stage plus the sampling and the
# pairs or pseudo-labels that made its training data; evaluation not counted) and how it scored.

SAMPLED_FIELDS = ("num_samples", "questions", "pass_at_1", "pass_at_n", "questions_with_correct")
# What SFT_k's entry keeps of its pseudo-label manifest: the labels, and how the pooled correct samples
# thinned out into them (correct -> distinct -> not near-duplicates -> under the cap = beyond gold).
LABEL_FIELDS = ("pseudo_labels", "beyond_gold", "correct_samples", "distinct_samples", "after_dedup", "cap")


def model_name(stage: str, iteration: int, replicate: int = 0) -> str:
    """How results.json names the model of a training stage: sft_0, dpo_1, sft_1, ...; replicate j > 0
    of the last SFT stage (`eval.final_replicates`): sft_3_r1, ..."""
    return f"{stage}_{iteration}" + replicate_suffix(replicate)


def replicate_suffix(replicate: int) -> str:
    """What names a replicate's model and stage directories apart from the protocol's own (replicate 0)."""
    return f"_r{replicate}" if replicate else ""


def sampled(samples: dict, model: str) -> dict:
    """What a sampling stage's manifest says of `model`'s samples on the training questions (pass@1,
    pass@n, questions with a correct sample): the paper's mechanism is DPO raising these."""
    return dict(model=model, **{k: samples[k] for k in SAMPLED_FIELDS if k in samples})


def _cost(*manifests: dict | None) -> dict:
    manifests = [m for m in manifests if m]
    return {"seconds": round(sum(m.get("seconds", 0.0) for m in manifests), 3),
            "flops": float(sum(m.get("flops", 0.0) for m in manifests))}


def sft_entry(iteration: int, trained: dict, evaluation: dict, *, samples: dict | None = None,
              sampled_by: str | None = None, labels: dict | None = None) -> dict:
    """SFT_k's entry from the manifests of its training stage and, after the warm-up, of the
    sampling stage (its samples from model `sampled_by`) and the pseudo-label stage before it."""
    entry = {"iteration": iteration, "stage": "sft", "model": model_name("sft", iteration),
             **_cost(trained, samples, labels), "eval": evaluation}
    if samples is not None:
        entry["sampled"] = sampled(samples, sampled_by)
    if labels is not None:
        entry.update({k: labels[k] for k in LABEL_FIELDS if k in labels})
    return entry


def dpo_entry(iteration: int, trained: dict, evaluation: dict, *, samples: dict, pairs: dict) -> dict:
    """DPO_k's entry from the manifests of its training stage, of SFT_{k-1}'s sampling and of the
    pair stage; `pairs` counts the pairs it trained on, `dpo_eval` its reward metrics on its eval pairs."""
    return {"iteration": iteration, "stage": "dpo", "model": model_name("dpo", iteration),
            **_cost(trained, samples, pairs), "pairs": trained["pairs"], "dpo_eval": trained.get("eval", {}),
            "eval": evaluation, "sampled": sampled(samples, model_name("sft", iteration - 1))}


def replicate_entry(model: str, trained: dict, evaluation: dict) -> dict:
    """A replicate of the last SFT stage: the same data, another seed (`eval.final_replicates`)."""
    return {"model": model, **_cost(trained), "eval": evaluation}


def eval_entry(model: str, evaluation: dict) -> dict:
    """mode=eval's one entry: a model evaluated alone, nothing trained."""
    return {"iteration": 0, "stage": "eval", "model": model, "eval": evaluation, "seconds": 0.0, "flops": 0.0}


# -- documents -------------------------------------------------------------------------------------

def final_entry(stages: Sequence[dict], replicates: Sequence[dict] = ()) -> dict:
    """The last SFT model of the run and its evaluation (the method's result). With replicates of
    that stage, `eval` is the mean over it and them (per split: accuracy and invalid averaged, n
    the questions each saw) and `replicates` lists theirs."""
    sft = [s for s in stages if s["stage"] == "sft"]
    last = sft[-1] if sft else stages[-1]
    final = {"model": last["model"], "eval": last.get("eval", {})}
    if replicates:
        final["eval"] = mean_eval([final["eval"]] + [r["eval"] for r in replicates])
        final["replicates"] = list(replicates)
    return final


def protocol_final(results: dict) -> dict:
    """`results` with its final entry as the protocol's own last SFT model alone (replicate 0): the
    retrainings of `eval.final_replicates` left out, counted in `final["replicates_left_out"]`."""
    final = final_entry(results["stages"])
    final["replicates_left_out"] = len(results["final"].get("replicates", []))
    return {**results, "final": final}


def mean_eval(evaluations: Sequence[dict]) -> dict:
    """Per split, the mean accuracy and invalid rate of several models' evaluations on it."""
    out = {}
    for split in evaluations[0]:
        runs = [e[split] for e in evaluations]
        if len({r["n"] for r in runs}) != 1:
            raise ValueError(f"replicates evaluated on different numbers of {split} questions: {[r['n'] for r in runs]}")
        out[split] = {"accuracy": float(np.mean([r["accuracy"] for r in runs])),
                      "invalid": float(np.mean([r.get("invalid", 0.0) for r in runs])), "n": runs[0]["n"]}
    return out


def results_document(config_path: str, method: str, seed: int, stages: list[dict], pretrain: dict | None = None,
                     replicates: Sequence[dict] = ()) -> dict:
    """results.json (design.md schema); `pretrain`: M0's pre-training, reported apart from the stages;
    `replicates`: the last SFT stage's replicates (`eval.final_replicates`)."""
    results = {"config": config_path, "method": method, "seed": seed, "stages": stages,
               "final": final_entry(stages, replicates)}
    if pretrain is not None:
        results["pretrain"] = pretrain
    return results


def _fmt_acc(entry: dict, split: str) -> str:
    e = entry.get("eval", {}).get(split)
    return "" if not e else f"{100 * e['accuracy']:.1f}"


def markdown_report(results: dict) -> str:
    stages = results["stages"]
    splits = sorted({s for st in stages for s in st.get("eval", {})})
    out = io.StringIO()
    out.write(f"# dpost report: {results['method']} (seed {results['seed']}, config {results['config']})\n\n")
    out.write("| iteration | stage | model | " + " | ".join(f"{s} acc %" for s in splits)
              + " | pairs | pseudo-labels | seconds | FLOPs |\n")
    out.write("|" + " --- |" * (7 + len(splits)) + "\n")
    for st in stages:
        cells = [str(st["iteration"]), st["stage"], st["model"]] + [_fmt_acc(st, s) for s in splits]
        cells += [str(st.get("pairs", "")), str(st.get("pseudo_labels", "")), f"{st.get('seconds', 0):.1f}",
                  f"{st.get('flops', 0):.3g}"]
        out.write("| " + " | ".join(cells) + " |\n")
    final = results["final"]
    replicates = final.get("replicates", [])
    out.write(f"\nFinal model: `{final['model']}`: "
              + ", ".join(f"{s} {100 * v['accuracy']:.1f}% (n={v['n']})" for s, v in final["eval"].items())
              + (f" (mean over it and its {len(replicates)} replicates: "
                 + "; ".join(f"`{r['model']}` " + ", ".join(f"{s} {_fmt_acc(r, s)}%" for s in r["eval"])
                             for r in replicates) + ")" if replicates else "") + "\n")
    rows = diagnostics_rows(results)
    if rows:
        out.write("\n## Sampling diagnostics per iteration\n\n" + DIAGNOSTICS_NOTE + "\n\n" + diagnostics_table(rows))
    return out.getvalue()


# -- per-iteration sampling diagnostics (the mechanism DPO-ST relies on) ----------------------------

DIAGNOSTICS_NOTE = (
    "Each row is a stage trained on samples: who sampled them (`samples from`, n per training question), "
    "pass@1 (mean fraction of correct samples per question) and pass@n (questions with at least one "
    "correct sample) on the training questions, the pairs or pseudo-labels built from them, and DPO's "
    "reward accuracy and margin on its eval pairs. Pseudo-labels pool the samples of this and earlier "
    "rounds; their correct samples thin out into labels: distinct texts, then those left after "
    "near-duplicate removal (Jaccard > 0.7 with the gold or a kept one), then those under the "
    "per-question cap (beyond gold: the pseudo-labels besides the gold rationales). "
    "DPO-ST works if DPO_k's samples beat SFT_{k-1}'s: higher pass@n and more "
    "pseudo-labels beyond gold than ST's at the same iteration. Blank: not recorded (older run) or not "
    "applicable.")


def _count(x) -> str:
    return f"{x:.1f}" if x != int(x) else str(int(x))  # means over seeds may be fractional


def _percent(x) -> str:
    return f"{100 * x:.1f}"


# (column header, row key, format) of the diagnostics table after its leading columns
_DIAGNOSTIC_COLUMNS = (
    ("samples from", "sampled_by", str), ("n", "num_samples", _count), ("pass@1 %", "pass_at_1", _percent),
    ("pass@n %", "pass_at_n", _percent), ("questions with a correct sample", "questions_with_correct", _count),
    ("pairs", "pairs", _count), ("correct samples", "correct_samples", _count),
    ("distinct", "distinct_samples", _count), ("after de-dup", "after_dedup", _count), ("cap", "cap", _count),
    ("pseudo-labels", "pseudo_labels", _count), ("beyond gold", "beyond_gold", _count),
    ("DPO reward acc %", "reward_accuracy", _percent), ("DPO reward margin", "reward_margin", "{:.3f}".format),
)
NUMERIC_DIAGNOSTICS = tuple(key for _, key, _ in _DIAGNOSTIC_COLUMNS if key != "sampled_by")


def diagnostics_rows(results: dict) -> list[dict]:
    """One row per DPO or SFT stage after the warm-up; fields absent from results.json are None."""
    rows = []
    for st in results["stages"]:
        if st["iteration"] < 1 or st["stage"] not in ("dpo", "sft"):
            continue
        sampled, dpo_eval = st.get("sampled") or {}, st.get("dpo_eval") or {}
        rows.append({
            "iteration": st["iteration"], "trains": st["model"], "sampled_by": sampled.get("model"),
            "num_samples": sampled.get("num_samples"), "questions": sampled.get("questions"),
            "pass_at_1": sampled.get("pass_at_1"), "pass_at_n": sampled.get("pass_at_n"),
            "questions_with_correct": sampled.get("questions_with_correct"), "pairs": st.get("pairs"),
            **{key: st.get(key) for key in LABEL_FIELDS},
            "reward_accuracy": dpo_eval.get("rewards/accuracies"), "reward_margin": dpo_eval.get("rewards/margins"),
        })
    return rows


def diagnostics_table(rows: Sequence[dict], leading: Sequence[str] = ()) -> str:
    """Markdown table of `diagnostics_rows` (or their means over seeds), `leading` keys first."""
    headers = list(leading) + ["iteration", "trains"] + [h for h, _, _ in _DIAGNOSTIC_COLUMNS]
    lines = ["| " + " | ".join(headers) + " |", "|" + " --- |" * len(headers)]
    for row in rows:
        cells = [str(row[k]) for k in (*leading, "iteration", "trains")]
        cells += ["" if row.get(key) is None else fmt(row[key]) for _, key, fmt in _DIAGNOSTIC_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def accuracy_series(results: dict, split: str) -> list[tuple[int, float]]:
    """(iteration, accuracy) of each SFT model: iteration 0 is the warm-up (the SFT baseline)."""
    return [(s["iteration"], s["eval"][split]["accuracy"]) for s in results["stages"]
            if s["stage"] == "sft" and split in s.get("eval", {})]


def plot_accuracy(path: epath.Path, runs: dict[str, list[dict]], split: str, title: str) -> None:
    """One line per method (mean over seeds, shaded: 95% t interval over seeds), iteration on x; the
    SFT baseline dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, results_list in sorted(runs.items()):
        series = [dict(accuracy_series(r, split)) for r in results_list]
        iters = sorted(set.intersection(*(set(s) for s in series))) if series else []
        if not iters:
            continue
        values = np.array([[100 * s[i] for i in iters] for s in series])
        mean = values.mean(0)
        if method == "sft":
            ax.axhline(mean[0], linestyle="--", color="gray", label="sft (warm-up baseline)")
            continue
        (line,) = ax.plot(iters, mean, marker="o", label=method)
        if len(series) > 1:
            bands = [stats.t_interval(values[:, j]) for j in range(len(iters))]
            ax.fill_between(iters, [b.low for b in bands], [b.high for b in bands], color=line.get_color(), alpha=0.2)
    ax.xaxis.get_major_locator().set_params(integer=True)  # iterations are whole numbers
    ax.set_xlabel("iteration (0 = warm-up SFT)")
    ax.set_ylabel(f"{split} accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp"
    tmp.write_bytes(buf.getvalue())
    tmp.replace(path)  # overwrites the plot of an earlier (rerun) report


def write_run_reports(workdir: epath.Path, results: dict, split: str) -> None:
    write_text_atomic(workdir / "report.md", markdown_report(results))
    plot_accuracy(workdir / "accuracy.png", {results["method"]: [results]}, split,
                  f"{results['method']} on {split}")


def write_json(path: epath.Path, obj) -> None:
    write_json_atomic(path, obj)
