"""Runs several methods over several seeds and writes one combined table and plot.

    python -m dpost.compare --config configs/arith_tiny.py --methods sft,st,dpo_st --seeds 0,1,2 \
        --workdir runs/compare [--config.a.b=v ...]

Each (method, seed) is an ordinary `dpost.main` run in WORKDIR/<method>/seed_<s> (so it resumes the
same way); WORKDIR/comparison.md, comparison.json and accuracy.png hold mean and spread over seeds.
"""

from __future__ import annotations

import shutil
import sys

import numpy as np
from absl import app, flags
from etils import epath
from ml_collections import config_flags

from dpost import config_check, reports, startup
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


def markdown(summary: dict, split: str, config_path: str) -> str:
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
    return "\n".join(lines) + "\n"


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
    except (ValueError, FileNotFoundError) as err:
        print(f"dpost.compare: error: {err}", file=sys.stderr)
        return 2
    split = "test" if "test" in base.data.eval_splits else base.data.eval_splits[0]
    summary = summarize(runs, split)
    write_json_atomic(root / "comparison.json", {"config": config_path, "split": split, "summary": summary})
    write_text_atomic(root / "comparison.md", markdown(summary, split, config_path))
    reports.plot_accuracy(root / "accuracy.png", runs, split,
                          f"{split} accuracy, mean over seeds {', '.join(_SEEDS.value)} (band: min-max)")
    print(markdown(summary, split, config_path))
    return 0


if __name__ == "__main__":
    startup.reexec_with_hugepage_malloc("dpost.compare")
    flags.mark_flag_as_required("config")
    app.run(lambda argv: sys.exit(main(argv)))
