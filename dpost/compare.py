"""Runs several methods over several seeds and writes one combined table and plot.

    python -m dpost.compare --config configs/arith_tiny.py --methods sft,st,dpo_st --seeds 0,1,2 \
        --workdir runs/compare [--config.a.b=v ...]

Each (method, seed) is an ordinary `dpost.main` run in WORKDIR/<method>/seed_<s> (so it resumes the
same way); WORKDIR/comparison.md, comparison.json and accuracy.png hold mean and spread over seeds.

For each pair of methods (the later on --methods minus the earlier: --methods lists the baseline
first) the final models' accuracy difference, paired by seed and question, gets two 95% intervals
(`dpost.stats`): a hierarchical bootstrap over seeds and questions (primary) and a t interval over
seeds. The ordering to check is the reverse of --methods (sft,st,dpo_st: dpo_st > st > sft).
"""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
from absl import app, flags
from etils import epath
from ml_collections import config_flags

from dpost import config_check, reports, startup, stats
from dpost.workdir import absolute, write_json_atomic, write_text_atomic

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.")
_METHODS = flags.DEFINE_list("methods", ["sft", "st", "dpo_st"], "Methods to compare.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds.")


def summarize(runs: dict[str, list[dict]], split: str) -> dict:
    """{method: {"final": {mean, std, min, max, values}, "per_iteration": {k: mean}}} on `split` (percent)."""
    out = {}
    for method, results in runs.items():
        finals = [100 * r["final"]["eval"][split]["accuracy"] for r in results if split in r["final"]["eval"]]
        per_iter: dict[int, list[float]] = {}
        for r in results:
            for k, acc in reports.accuracy_series(r, split):
                per_iter.setdefault(k, []).append(100 * acc)
        out[method] = {
            "final": {"mean": float(np.mean(finals)), "std": float(np.std(finals)), "min": float(np.min(finals)),
                      "max": float(np.max(finals)), "values": finals},
            "per_iteration": {k: float(np.mean(v)) for k, v in sorted(per_iter.items())},
            "seeds": [r["seed"] for r in results],
        }
    return out


def predictions_path(run_dir: epath.Path, model: str, split: str) -> epath.Path:
    """Where a run's evaluation of `model` ("sft_3": iter_3/eval_sft) wrote its per-question predictions."""
    kind, iteration = model.split("_")
    return run_dir / f"iter_{iteration}" / f"eval_{kind}" / f"predictions_{split}.jsonl"


def read_correctness(path: epath.Path, n: int | None) -> dict[str, bool]:
    """{question id: correct} from a predictions file of `n` questions (None: not checked)."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing (the paired intervals need the final model's predictions)")
    out = {}
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            out[str(row["id"])] = bool(row["correct"])
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{path}:{lineno}: not a prediction row with 'id' and 'correct' ({err})") from None
    if n is not None and n != len(out):
        raise ValueError(f"{path}: {len(out)} questions, but results.json says the final model was evaluated on {n}")
    return out


def correctness_matrices(root: epath.Path, runs: dict[str, list[dict]], split: str) -> tuple[list[int], dict]:
    """(seeds, {method: [seeds, questions] 0/1 array}) paired by seed and by question id."""
    seeds = [r["seed"] for r in next(iter(runs.values()))]
    question_ids, reference, out = None, None, {}  # reference: the file that fixed the question order
    for method, results_list in runs.items():
        by_seed = {r["seed"]: r for r in results_list}
        if sorted(by_seed) != sorted(seeds):
            raise ValueError(f"method {method} ran seeds {sorted(by_seed)}, not {sorted(seeds)}: nothing to pair")
        rows = []
        for seed in seeds:
            final = by_seed[seed]["final"]
            path = predictions_path(root / method / f"seed_{seed}", final["model"], split)
            correct = read_correctness(path, final["eval"].get(split, {}).get("n"))
            if question_ids is None:
                question_ids, reference = list(correct), path
            elif correct.keys() != set(question_ids):
                raise ValueError(f"{path}: its questions differ from those of {reference}")
            rows.append([correct[q] for q in question_ids])
        out[method] = np.asarray(rows, dtype=np.int8)
    return seeds, out


def paired_differences(methods: list[str], seeds: list[int], correct: dict[str, np.ndarray]) -> list[dict]:
    """Each later method minus each earlier one (st-sft, dpo_st-sft, dpo_st-st), in percentage points."""
    out = []
    for j, a in enumerate(methods):
        for b in methods[:j]:
            boot = stats.paired_bootstrap_interval(correct[a], correct[b]).scaled(100)
            t = stats.paired_t_interval(correct[a], correct[b]).scaled(100)
            out.append({"a": a, "b": b, "seeds": seeds, "questions": int(correct[a].shape[1]),
                        "bootstrap": boot.as_dict(), "t": t.as_dict(), "verdict": stats.pair_verdict(a, b, boot)})
    return out


def ordering(methods: list[str], differences: list[dict]) -> dict:
    """The reverse of --methods as the ordering to check, judged by the bootstrap intervals."""
    chain = list(reversed(methods))
    intervals = {(d["a"], d["b"]): stats.Interval(**d["bootstrap"]) for d in differences}
    holds, text = stats.ordering_verdict(chain, intervals)
    return {"chain": chain, "holds": holds, "text": text}


def mean_diagnostics(runs: dict[str, list[dict]]) -> list[dict]:
    """Diagnostics rows (reports.diagnostics_rows) averaged over seeds per method and trained model."""
    out = []
    for method, results_list in runs.items():
        groups: dict[str, list[dict]] = {}
        for results in results_list:
            for row in reports.diagnostics_rows(results):
                groups.setdefault(row["trains"], []).append(row)
        for rows in groups.values():
            mean = {key: _mean(row[key] for row in rows) for key in reports.NUMERIC_DIAGNOSTICS}
            out.append({"method": method, "seeds": len(rows), "iteration": rows[0]["iteration"],
                        "trains": rows[0]["trains"], "sampled_by": rows[0]["sampled_by"], **mean})
    return out


def _mean(values) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


# (diagnostics field, words, scale, unit) compared between dpo_st and st
_MECHANISM_FIELDS = (("pass_at_n", "pass@n", 100, " points"), ("beyond_gold", "pseudo-labels beyond gold", 1, ""))


def mechanism(runs: dict[str, list[dict]]) -> list[str]:
    """Per iteration, dpo_st's pseudo-label samples (from DPO_k) against st's (from SFT_{k-1}),
    paired by seed: the paper's claim is higher pass@n and more pseudo-labels beyond gold."""
    if "dpo_st" not in runs or "st" not in runs:
        return []

    def label_rows(method):  # {(seed, iteration): the SFT stage's diagnostics row}
        return {(r["seed"], row["iteration"]): row for r in runs[method] for row in reports.diagnostics_rows(r)
                if row["trains"].startswith("sft")}

    dpo_st, st = label_rows("dpo_st"), label_rows("st")
    lines = []
    for iteration in sorted({k for _, k in dpo_st.keys() & st.keys()}):
        keys = sorted(key for key in dpo_st.keys() & st.keys() if key[1] == iteration)
        parts = []
        for field, name, scale, unit in _MECHANISM_FIELDS:
            diffs = [scale * (dpo_st[k][field] - st[k][field]) for k in keys
                     if dpo_st[k][field] is not None and st[k][field] is not None]
            if diffs:
                parts.append(f"{name} {np.mean(diffs):+.1f}{unit} (higher in {sum(d > 0 for d in diffs)} of "
                             f"{len(diffs)} seeds)")
        lines.append(f"- iteration {iteration}, dpo_st minus st: "
                     + (", ".join(parts) if parts else "not recorded in results.json (older runs)"))
    return lines


def markdown(summary: dict, split: str, config_path: str, differences: list[dict], order: dict | None,
             diagnostics: list[dict], mechanism_lines: list[str]) -> str:
    iters = sorted({k for s in summary.values() for k in s["per_iteration"]})
    lines = [f"# dpost comparison on {split} ({config_path})", "",
             "| method | final acc % (mean ± std over seeds) | per seed | " + " | ".join(f"iter {k}" for k in iters) + " |",
             "|" + " --- |" * (3 + len(iters))]
    for method, s in summary.items():
        f = s["final"]
        per_seed = ", ".join(f"{v:.1f}" for v in f["values"])
        lines.append(f"| {method} | {f['mean']:.1f} ± {f['std']:.1f} | {per_seed} | "
                     + " | ".join(f"{s['per_iteration'][k]:.1f}" if k in s["per_iteration"] else "-" for k in iters)
                     + " |")
    if differences:
        lines += ["", f"## Paired differences of the final models on {split}", "",
                  f"Percentage points, paired by seed and question. Primary interval: 95% percentile interval "
                  f"of a bootstrap over seeds and questions ({stats.BOOTSTRAP_RESAMPLES:,} resamples, RNG seed "
                  f"{stats.BOOTSTRAP_SEED}); also the 95% paired t interval over seeds (Student t, seeds - 1 "
                  f"degrees of freedom, test set held fixed). A difference whose bootstrap interval contains "
                  f"zero is reported as no difference.", "",
                  "| difference | mean | bootstrap 95% CI | t 95% CI | verdict |", "|" + " --- |" * 5]
        for d in differences:
            boot, t = d["bootstrap"], d["t"]
            lines.append(f"| {d['a']} - {d['b']} | {boot['mean']:+.1f} | {_bounds(boot)} | {_bounds(t)} | "
                         f"{d['verdict']} |")
    if order:
        lines += ["", order["text"]]
    if diagnostics:
        lines += ["", "## Sampling diagnostics per iteration (mean over seeds)", "", reports.DIAGNOSTICS_NOTE, "",
                  reports.diagnostics_table(diagnostics, leading=("method",)).rstrip("\n")]
    if mechanism_lines:
        lines += ["", "Mechanism (pseudo-label samples of DPO_k in dpo_st against SFT_{k-1} in st, same seed):", ""]
        lines += mechanism_lines
    return "\n".join(lines) + "\n"


def _bounds(interval: dict) -> str:
    if interval["low"] is None:
        return "n/a (one seed)"
    return f"[{interval['low']:+.1f}, {interval['high']:+.1f}]"


def share_warmup(source: epath.Path, target: epath.Path) -> None:
    """Copies a finished warm-up (iter_0: SFT_0, its evaluation) and the task data to another
    method's run of the same seed; its stage hashes ignore the method, so the run reuses them."""
    for name in ("iter_0", "data"):
        src, dst = source / name, target / name
        if src.exists() and not dst.exists():
            shutil.copytree(str(src), str(dst))


def main(argv) -> int:
    del argv
    from dpost import driver
    from dpost import console

    console.configure_logging()
    base = _CONFIG.value
    config_path = flags.FLAGS["config"].config_filename
    root = absolute(_WORKDIR.value or "runs/compare")
    runs: dict[str, list[dict]] = {}
    try:
        config_check.check(base)
        config_check.check_values("method", _METHODS.value, "--methods")
        for seed in map(int, _SEEDS.value):
            first = None
            for method in _METHODS.value:
                config = base.copy_and_resolve_references()
                config.unlock()
                config.method, config.seed = method, seed
                config.lock()
                workdir = root / method / f"seed_{seed}"
                if first is not None:
                    share_warmup(first, workdir)
                runs.setdefault(method, []).append(driver.run(config, str(workdir), config_path=config_path))
                first = first or workdir
        split = "test" if "test" in base.data.eval_splits else base.data.eval_splits[0]
        doc = write_comparison(root, runs, list(_METHODS.value), split, config_path)
    except (ValueError, FileNotFoundError) as err:
        print(f"dpost.compare: error: {err}", file=sys.stderr)
        return 2
    print(doc)
    return 0


def write_comparison(root: epath.Path, runs: dict[str, list[dict]], methods: list[str], split: str,
                     config_path: str) -> str:
    """comparison.json, comparison.md and accuracy.png from finished runs; returns the markdown."""
    summary = summarize(runs, split)
    seeds, correct = correctness_matrices(root, runs, split)
    differences = paired_differences(methods, seeds, correct)
    order = ordering(methods, differences) if len(methods) > 1 else None
    diagnostics, mechanism_lines = mean_diagnostics(runs), mechanism(runs)
    doc = markdown(summary, split, config_path, differences, order, diagnostics, mechanism_lines)
    write_json_atomic(root / "comparison.json", {
        "config": config_path, "split": split, "summary": summary, "differences": differences,
        "ordering": order, "diagnostics": diagnostics, "mechanism": mechanism_lines,
        "intervals": {"units": "percentage points", "level": stats.LEVEL,
                      "primary": stats.BOOTSTRAP_METHOD, "resamples": stats.BOOTSTRAP_RESAMPLES,
                      "rng_seed": stats.BOOTSTRAP_SEED, "also": stats.T_METHOD}})
    write_text_atomic(root / "comparison.md", doc)
    seed_list = ", ".join(str(s) for s in seeds)
    reports.plot_accuracy(root / "accuracy.png", runs, split,
                          f"{split} accuracy, mean over seeds {seed_list} (band: 95% t interval over seeds)")
    return doc


if __name__ == "__main__":
    startup.reexec_with_hugepage_malloc("dpost.compare")
    flags.mark_flag_as_required("config")
    app.run(lambda argv: sys.exit(main(argv)))
