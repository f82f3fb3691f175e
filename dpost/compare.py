"""Runs several methods over several seeds and writes one combined table and plot.

    python -m dpost.compare --config configs/arith_tiny.py --methods sft,st,dpo_st --seeds 0,1,2 \
        --workdir runs/compare [--config.a.b=v ...]

Each (method, seed) is an ordinary `dpost.main` run in WORKDIR/<method>/seed_<s> (so it resumes the
same way); WORKDIR/comparison.md, comparison.json and accuracy.png hold mean and spread over seeds.
The methods of one seed share its warm-up (SFT_0): it is trained once and copied to the others.

`--jobs N` (N > 1) runs up to N runs at a time, each in its own process, its output in
WORKDIR/<method>/seed_<s>/compare.log: each seed's warm-up first (as the `sft` method's run, whose
workdir then exists even if sft is not compared), then that seed's methods side by side. On a CPU
host one run leaves cores idle (XLA:CPU on small matrices), so two runs on two cores finish sooner
together; on an accelerator keep 1 (each run would claim the whole device). Results are the same.

For each pair of methods (the later on --methods minus the earlier: --methods lists the baseline
first) the final models' accuracy difference, paired by seed and question, gets two intervals
(`dpost.stats`; 95%, or `--level`): a hierarchical bootstrap over seeds and questions (primary) and a
t interval over seeds. The ordering to check is the reverse of --methods (sft,st,dpo_st: dpo_st > st >
sft). A higher level is for a repeated look at test, e.g. 0.975 when a second final is pooled with a
first (Bonferroni).

`--report_only` trains nothing: it writes the tables from runs that have finished (each run's
results.json and its final model's predictions), e.g. to pool two comparisons' runs: link their
<method>/seed_<s> folders under one WORKDIR and list all their seeds.

`--protocol_models`: runs with `eval.final_replicates` > 1 are judged by the protocol's own last
model alone (replicate 0), as runs without replicates are, e.g. to pool comparisons made with and
without replicates.
"""

from __future__ import annotations

import heapq
import json
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import sys
import time

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
_JOBS = flags.DEFINE_integer("jobs", 1, "Runs at a time, each in its own process (CPU hosts; see above).",
                             lower_bound=1)
_LEVEL = flags.DEFINE_float("level", stats.LEVEL, "Level of the paired intervals, between 0 and 1 (see above).")
_REPORT_ONLY = flags.DEFINE_bool("report_only", False, "Write the tables from finished runs; train nothing.")
_PROTOCOL_MODELS = flags.DEFINE_bool(
    "protocol_models", False, "Each run's own last SFT model alone (replicate 0): the retrainings of "
    "eval.final_replicates left out of the tables and intervals (see above).")
flags.register_validator("level", lambda level: 0 < level < 1, message="--level must lie between 0 and 1")


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
            "trainings_of_final": sorted({1 + len(r["final"].get("replicates", [])) for r in results}),
            "replicates_left_out": sum(r["final"].get("replicates_left_out", 0) for r in results),
        }
    return out


def predictions_path(run_dir: epath.Path, model: str, split: str) -> epath.Path:
    """Where a run's evaluation of `model` ("sft_3": iter_3/eval_sft; a replicate "sft_3_r1":
    iter_3/eval_sft_r1) wrote its per-question predictions."""
    kind, iteration, *replicate = model.split("_")
    return run_dir / f"iter_{iteration}" / "_".join([f"eval_{kind}", *replicate]) / f"predictions_{split}.jsonl"


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
    """(seeds, {method: [seeds, questions] array}) paired by seed and by question id: 1 where the final
    model answered correctly; with replicates of the final stage, the fraction of them that did."""
    seeds = [r["seed"] for r in next(iter(runs.values()))]
    question_ids, reference, out = None, None, {}  # reference: the file that fixed the question order
    for method, results_list in runs.items():
        by_seed = {r["seed"]: r for r in results_list}
        if sorted(by_seed) != sorted(seeds):
            raise ValueError(f"method {method} ran seeds {sorted(by_seed)}, not {sorted(seeds)}: nothing to pair")
        rows = []
        for seed in seeds:
            final = by_seed[seed]["final"]
            models = [final["model"]] + [rep["model"] for rep in final.get("replicates", [])]
            row = np.zeros(len(question_ids or ()))
            for model in models:
                path = predictions_path(run_dir(root, method, seed), model, split)
                correct = read_correctness(path, final["eval"].get(split, {}).get("n"))
                if question_ids is None:
                    question_ids, reference, row = list(correct), path, np.zeros(len(correct))
                elif correct.keys() != set(question_ids):
                    raise ValueError(f"{path}: its questions differ from those of {reference}")
                row += np.asarray([correct[q] for q in question_ids], dtype=np.float64)
            rows.append(row / len(models))
        out[method] = np.asarray(rows, dtype=np.float64)
    return seeds, out


def paired_differences(methods: list[str], seeds: list[int], correct: dict[str, np.ndarray],
                       level: float = stats.LEVEL) -> list[dict]:
    """Each later method minus each earlier one (st-sft, dpo_st-sft, dpo_st-st), in percentage points."""
    out = []
    for j, a in enumerate(methods):
        for b in methods[:j]:
            boot = stats.paired_bootstrap_interval(correct[a], correct[b], level=level).scaled(100)
            t = stats.paired_t_interval(correct[a], correct[b], level).scaled(100)
            detectable = stats.paired_detectable_difference(correct[a], correct[b], level)
            out.append({"a": a, "b": b, "seeds": seeds, "questions": int(correct[a].shape[1]),
                        "bootstrap": boot.as_dict(), "t": t.as_dict(), "verdict": stats.pair_verdict(a, b, boot),
                        "detectable": None if detectable is None else 100 * detectable})
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
_MECHANISM_FIELDS = (("pass_at_n", "pass@n", 100, " points"), ("correct_samples", "correct samples (pooled)", 1, ""),
                     ("beyond_gold", "pseudo-labels beyond gold", 1, ""))


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
    trainings = sorted({n for s in summary.values() for n in s.get("trainings_of_final", [1])})
    if trainings != [1]:
        lines += ["", f"Final accuracy of a run: the mean over {' or '.join(map(str, trainings))} trainings of its "
                  "last SFT stage on the same data (`eval.final_replicates`; replicate 0 is the protocol's model, "
                  "the iteration columns show it alone); the paired intervals below pair those means."]
    left_out = sum(s.get("replicates_left_out", 0) for s in summary.values())
    if left_out:
        lines += ["", f"Final accuracy of a run: the protocol's own last SFT model alone (replicate 0); the "
                  f"{left_out} retrainings of last stages (`eval.final_replicates`) are left out (--protocol_models)."]
    if differences:
        level = stats.level_name(differences[0]["bootstrap"]["level"])
        lines += ["", f"## Paired differences of the final models on {split}", "",
                  f"Percentage points, paired by seed and question. Primary interval: {level} percentile interval "
                  f"of a bootstrap over seeds and questions ({stats.BOOTSTRAP_RESAMPLES:,} resamples, RNG seed "
                  f"{stats.BOOTSTRAP_SEED}); also the {level} paired t interval over seeds (Student t, seeds - 1 "
                  f"degrees of freedom, test set held fixed). A difference whose bootstrap interval contains "
                  f"zero is reported as no difference. Detectable: the smallest true difference the t test "
                  f"would find with {100 * stats.POWER:.0f}% probability given the seeds' spread "
                  f"((t quantile at the level + t quantile at the power) x sd / sqrt(seeds)): a \"no "
                  f"difference\" rules out differences of about that size, not smaller ones.", "",
                  f"| difference | mean | bootstrap {level} CI | t {level} CI | detectable | verdict |",
                  "|" + " --- |" * 6]
        for d in differences:
            boot, t = d["bootstrap"], d["t"]
            detectable = "n/a (one seed)" if d["detectable"] is None else f"{d['detectable']:.1f}"
            lines.append(f"| {d['a']} - {d['b']} | {boot['mean']:+.1f} | {_bounds(boot)} | {_bounds(t)} | "
                         f"{detectable} | {d['verdict']} |")
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


def run_dir(root: epath.Path, method: str, seed: int) -> epath.Path:
    return root / method / f"seed_{seed}"


def read_finished_runs(root: epath.Path, methods: list[str], seeds: list[int]) -> dict[str, list[dict]]:
    """{method: [results.json of each seed]} of runs that have finished (--report_only)."""
    runs: dict[str, list[dict]] = {}
    for method in methods:
        for seed in seeds:
            path = run_dir(root, method, seed) / "results.json"
            if not path.exists():
                raise FileNotFoundError(f"{path}: missing (that run has not finished; --report_only trains nothing)")
            try:
                results = json.loads(path.read_text())
                ran = (results["method"], results["seed"])
            except (ValueError, KeyError, TypeError) as err:
                raise ValueError(f"{path}: not a run's results document ({err})") from None
            if ran != (method, seed):
                raise ValueError(f"{path}: a run of {ran[0]} seed {ran[1]}, not of {method} seed {seed}")
            runs.setdefault(method, []).append(results)
    return runs


def share_warmup(source: epath.Path, target: epath.Path) -> None:
    """Copies a finished warm-up (iter_0: SFT_0, its evaluation) and the task data to another
    method's run of the same seed; its stage hashes ignore the method, so the run reuses them."""
    for name in ("iter_0", "data"):
        src, dst = source / name, target / name
        if src.exists() and not dst.exists():
            shutil.copytree(str(src), str(dst))


class RunFailed(Exception):
    """A worker's run ended without results: its error, or its process died (see its compare.log)."""


class Stopped(Exception):
    """The comparison was stopped by a SIGTERM; its finished stages stay, and a rerun resumes."""


def _stop_on_sigterm(signum, frame):
    raise Stopped("stopped by SIGTERM; the workers were stopped too, and a rerun resumes the runs")


def run_config(base, **fields):
    """A copy of `base` with `fields` (method, seed, ...) set."""
    config = base.copy_and_resolve_references()
    config.unlock()
    for name, value in fields.items():
        setattr(config, name, value)
    config.lock()
    return config


def run_sequentially(base, root: epath.Path, methods: list[str], seeds: list[int],
                     config_path: str) -> dict[str, list[dict]]:
    """Every (method, seed) in this process, seed by seed; a seed's first method trains the warm-up."""
    from dpost import driver

    runs: dict[str, list[dict]] = {}
    for seed in seeds:
        first = None
        for method in methods:
            workdir = run_dir(root, method, seed)
            if first is not None:
                share_warmup(first, workdir)
            runs.setdefault(method, []).append(driver.run(run_config(base, method=method, seed=seed), str(workdir),
                                                          config_path=config_path))
            first = first or workdir
    return runs


def _run_in_worker(config, workdir: str, config_path: str, report) -> None:
    """One run in a worker process, its stdout and stderr appended to WORKDIR/compare.log; sends
    `report` None on success, else the one-line error (the parent reads results.json)."""
    os.makedirs(workdir, exist_ok=True)
    log = os.open(os.path.join(workdir, "compare.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    from dpost import console, driver

    console.configure_logging()
    try:
        driver.run(config, workdir, config_path=config_path)
    except (ValueError, FileNotFoundError) as err:  # bad input: the message says which
        report.send(str(err))
        return
    except Exception as err:  # a bug: multiprocessing prints the traceback to the log (SystemExit passes)
        report.send(f"{type(err).__name__}: {err} (traceback in {os.path.join(workdir, 'compare.log')})")
        raise
    report.send(None)


def run_in_parallel(base, root: epath.Path, methods: list[str], seeds: list[int], config_path: str,
                    jobs: int) -> dict[str, list[dict]]:
    """Up to `jobs` runs at a time, each in a fresh worker process: each seed's warm-up (the `sft`
    run) first, then its methods. Ready runs start in (seed, method) order, so seeds finish in turn.
    A failed run stops the others."""
    warmup = "sft"
    ready = [(i, -1, seed, warmup) for i, seed in enumerate(seeds)]  # (seed index, method index, ...)
    total = len(seeds) * len({warmup, *methods})
    context = multiprocessing.get_context("spawn")  # a fresh interpreter per run: no inherited JAX state
    # A worker killed mid-run leaves its semaphores (tqdm's lock) to multiprocessing's resource tracker,
    # which frees them and warns at exit; the error line below already says that the run died.
    sys.warnoptions.append("ignore:resource_tracker:UserWarning")
    running: dict = {}  # the parent's end of a run's pipe -> (process, method, seed, start time)
    results: dict[tuple[str, int], dict] = {}
    # A SIGTERM to this process alone (`kill PID`) would otherwise leave its workers running on: exit
    # through `finally`, which passes the SIGTERM on (a worker in training saves its step first).
    previous = signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        while ready or running:
            while ready and len(running) < jobs:
                *_, seed, method = heapq.heappop(ready)
                workdir = run_dir(root, method, seed)
                if method != warmup:
                    share_warmup(run_dir(root, warmup, seed), workdir)
                # progress off: the worker's output goes to a log file
                config = run_config(base, method=method, seed=seed, progress=False)
                receive, send = context.Pipe(duplex=False)
                process = context.Process(target=_run_in_worker, args=(config, str(workdir), config_path, send))
                process.start()
                send.close()  # the child holds its copy: EOF here once it exits
                running[receive] = (process, method, seed, time.time())
                print(f"dpost.compare: {method} seed {seed}: started, log {workdir / 'compare.log'}", flush=True)
            for receive in multiprocessing.connection.wait(list(running)):
                process, method, seed, start = running.pop(receive)
                workdir = run_dir(root, method, seed)
                try:
                    error = receive.recv()
                    process.join()
                except EOFError:  # ended without a word: killed, out of memory, preempted
                    process.join()
                    error = f"its process died (exit code {process.exitcode}); see {workdir / 'compare.log'}"
                if error is not None:
                    raise RunFailed(f"{method} seed {seed}: {error}")
                results[method, seed] = json.loads((workdir / "results.json").read_text())
                print(f"dpost.compare: {method} seed {seed}: done in {time.time() - start:.0f} s "
                      f"({len(results)}/{total} runs)", flush=True)
                if method == warmup:
                    for j, other in enumerate(methods):
                        if other != warmup:
                            heapq.heappush(ready, (seeds.index(seed), j, seed, other))
    finally:
        signal.signal(signal.SIGTERM, previous)
        for process, *_ in running.values():
            process.terminate()
            process.join()
    return {method: [results[method, seed] for seed in seeds] for method in methods}


def main(argv) -> int:
    del argv
    from dpost import console

    console.configure_logging()
    base = _CONFIG.value
    config_path = flags.FLAGS["config"].config_filename
    root = absolute(_WORKDIR.value or "runs/compare")
    methods, seeds = list(_METHODS.value), list(map(int, _SEEDS.value))
    try:
        config_check.check(base)
        config_check.check_values("method", methods, "--methods")
        if _REPORT_ONLY.value:
            runs = read_finished_runs(root, methods, seeds)
        elif _JOBS.value > 1:
            runs = run_in_parallel(base, root, methods, seeds, config_path, _JOBS.value)
        else:
            runs = run_sequentially(base, root, methods, seeds, config_path)
        if _PROTOCOL_MODELS.value:
            runs = {method: [reports.protocol_final(r) for r in results] for method, results in runs.items()}
        split = "test" if "test" in base.data.eval_splits else base.data.eval_splits[0]
        doc = write_comparison(root, runs, methods, split, config_path, _LEVEL.value)
    except Stopped as err:
        print(f"dpost.compare: {err}", file=sys.stderr)
        return 128 + signal.SIGTERM
    except (ValueError, FileNotFoundError, RunFailed) as err:
        print(f"dpost.compare: error: {err}", file=sys.stderr)
        return 2
    print(doc)
    return 0


def write_comparison(root: epath.Path, runs: dict[str, list[dict]], methods: list[str], split: str,
                     config_path: str, level: float = stats.LEVEL) -> str:
    """comparison.json, comparison.md and accuracy.png from finished runs; returns the markdown."""
    summary = summarize(runs, split)
    seeds, correct = correctness_matrices(root, runs, split)
    differences = paired_differences(methods, seeds, correct, level)
    order = ordering(methods, differences) if len(methods) > 1 else None
    diagnostics, mechanism_lines = mean_diagnostics(runs), mechanism(runs)
    doc = markdown(summary, split, config_path, differences, order, diagnostics, mechanism_lines)
    write_json_atomic(root / "comparison.json", {
        "config": config_path, "split": split, "summary": summary, "differences": differences,
        "ordering": order, "diagnostics": diagnostics, "mechanism": mechanism_lines,
        "intervals": {"units": "percentage points", "level": level,
                      "primary": stats.BOOTSTRAP_METHOD, "resamples": stats.BOOTSTRAP_RESAMPLES,
                      "rng_seed": stats.BOOTSTRAP_SEED, "also": stats.T_METHOD,
                      "detectable_power": stats.POWER}})
    write_text_atomic(root / "comparison.md", doc)
    seed_list = ", ".join(str(s) for s in seeds)
    reports.plot_accuracy(root / "accuracy.png", runs, split,
                          f"{split} accuracy, mean over seeds {seed_list} (band: 95% t interval over seeds)")
    return doc


if __name__ == "__main__":
    startup.reexec_with_hugepage_malloc("dpost.compare")
    flags.mark_flag_as_required("config")
    app.run(lambda argv: sys.exit(main(argv)))
