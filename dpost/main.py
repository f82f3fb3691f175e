"""dpost's one command.

    python -m dpost.main --config configs/arith_tiny.py [--config.a.b=v ...] [--workdir DIR]

Runs DPO-ST (or `method=sft|st`) end to end and writes WORKDIR/results.json, report.md and
accuracy.png; rerunning with the same workdir resumes. `--config.mode=eval
--config.eval.checkpoint=orbax:<dir>` evaluates one model and writes WORKDIR/eval.json.
Multi-host: `jax.distributed.initialize()` runs when the environment is multi-process (Cloud TPU
pod, SLURM) or when --coordinator/--num_processes/--process_id are given; when one process dies
the others exit non-zero (within --heartbeat_timeout seconds at most) and rerunning every process
with the same workdir resumes.
"""

from __future__ import annotations

import os
import re
import sys
import traceback

from absl import app, flags
from ml_collections import config_flags

from dpost import startup

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (local or gs://); default runs/<config name>.")
_COORDINATOR = flags.DEFINE_string("coordinator", None, "host:port of process 0 (multi-host without auto-detection).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
_HEARTBEAT = flags.DEFINE_integer(
    "heartbeat_timeout", None,
    "Multi-host: seconds without a heartbeat after which a process counts as dead and all others exit "
    "(JAX's default, 100, when unset).")


def default_workdir(config_path: str) -> str:
    name = os.path.splitext(os.path.basename(config_path))[0]
    return os.path.join("runs", name)


def main(argv) -> int:
    del argv
    from dpost import config_check, console, distributed

    console.configure_logging()

    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, _HEARTBEAT.value)
    from dpost import driver, eval_only

    config_path = flags.FLAGS["config"].config_filename
    if not os.path.isfile(config_path):  # config_flags would defer this error to first use
        print(f"dpost: error: config file {config_path} does not exist", file=sys.stderr)
        return 2
    config = _CONFIG.value
    workdir = _WORKDIR.value or default_workdir(config_path)
    try:
        config_check.check(config)  # every field, before anything is loaded or written
        if config.mode == "eval":
            eval_only.evaluate_checkpoint(config, workdir, config_path=config_path)
        elif config.mode == "train":
            driver.run(config, workdir, config_path=config_path)
        else:
            raise ValueError(f"config field 'mode' must be 'train' or 'eval', got {config.mode!r}")
    except (ValueError, FileNotFoundError) as err:  # user errors: one clear line, non-zero exit
        print(f"dpost: error: {err}", file=sys.stderr)
        distributed.exit_now_if_multi_process(2)
        return 2
    except Exception as err:
        if distributed.is_multi_process():
            traceback.print_exc()
            print(f"dpost: error: process {distributed.describe()} failed: {type(err).__name__}: {err}\n"
                  "dpost: in a multi-process run this often means that another process stopped (see its log); "
                  "rerun every process with the same --workdir to resume.", file=sys.stderr)
            distributed.exit_now_if_multi_process(1)
        raise
    return 0


def parse_flags(argv):
    """absl flag parsing; a bad --config.field override is one clear line and exit status 2."""
    try:
        return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as err:
        message = " ".join(str(err).replace("\\n", " ").replace("\\", "").split()).strip("'\"")
        if isinstance(err, (AttributeError, KeyError)):  # ConfigDict's "no such field" (with its suggestion)
            field = re.match(r"\w+", message)
            overrides = [a[len("--config."):].split("=")[0] for a in argv if a.startswith("--config.")]
            named = [o for o in overrides if field and o.split(".")[-1] == field.group(0)]
            suggestion = message[field.end():].strip(" '\"") if field else message
            message = f"unknown config field '{named[0] if named else message}'" + (f" ({suggestion})" if suggestion else "")
        print(f"dpost: error: bad command line: {message}", file=sys.stderr)
        sys.exit(2)


def run() -> None:
    startup.reexec_with_hugepage_malloc("dpost.main")
    flags.mark_flag_as_required("config")
    app.run(lambda argv: sys.exit(main(argv)), flags_parser=parse_flags)


if __name__ == "__main__":
    run()
