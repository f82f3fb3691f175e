"""results.json (design.md schema), report.md and accuracy.png for one run or a comparison."""

from __future__ import annotations

import io
from typing import Sequence

import numpy as np
from etils import epath

from dpost.workdir import write_json_atomic, write_text_atomic


def final_entry(stages: Sequence[dict]) -> dict:
    """The last SFT model of the run and its evaluation (the method's result)."""
    sft = [s for s in stages if s["stage"] == "sft"]
    last = sft[-1] if sft else stages[-1]
    return {"model": last["model"], "eval": last.get("eval", {})}


def results_document(config_path: str, method: str, seed: int, stages: list[dict], pretrain: dict | None = None) -> dict:
    """results.json (design.md schema); `pretrain`: M0's pre-training, reported apart from the stages."""
    results = {"config": config_path, "method": method, "seed": seed, "stages": stages, "final": final_entry(stages)}
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
    out.write(f"\nFinal model: `{final['model']}`: "
              + ", ".join(f"{s} {100 * v['accuracy']:.1f}% (n={v['n']})" for s, v in final["eval"].items()) + "\n")
    return out.getvalue()


def accuracy_series(results: dict, split: str) -> list[tuple[int, float]]:
    """(iteration, accuracy) of each SFT model: iteration 0 is the warm-up (the SFT baseline)."""
    return [(s["iteration"], s["eval"][split]["accuracy"]) for s in results["stages"]
            if s["stage"] == "sft" and split in s.get("eval", {})]


def plot_accuracy(path: epath.Path, runs: dict[str, list[dict]], split: str, title: str) -> None:
    """One line per method (mean over seeds, shaded min-max), iteration on x; SFT baseline dashed."""
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
        ax.plot(iters, mean, marker="o", label=method)
        if len(series) > 1:
            ax.fill_between(iters, values.min(0), values.max(0), alpha=0.2)
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
