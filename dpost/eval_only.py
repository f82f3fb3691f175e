"""`mode=eval`: one model evaluated alone, no training.

    python -m dpost.main --config configs/X.py --workdir DIR --config.mode=eval \
        --config.eval.checkpoint=orbax:<dir> | hf:<dir or hub id> | gguf:<file>

writes DIR/eval.json (results.json's schema with one `eval` entry) and DIR/predictions_<set>.jsonl.
"""

from __future__ import annotations

import jax

from dpost import compile_cache, config_check, evaluation, models, reports, sharding
from dpost.data.task import load_task
from dpost.workdir import absolute

EVAL_FILE = "eval.json"


def evaluate_checkpoint(config, workdir: str, config_path: str = "") -> dict:
    """Evaluates `config.eval.checkpoint` on the task's eval sets; returns eval.json's document
    (the same on every process; process 0 writes it)."""
    config_check.check(config)
    compile_cache.enable(config)
    source = config.eval.checkpoint
    layout = sharding.Layout.from_config(config)
    task = load_task(config, workdir)
    model = models.load(source, dtype=config.model.dtype, layout=layout)
    if model.tokenizer is None:
        raise ValueError(f"{source}: no tokenizer found beside the weights")
    out = absolute(workdir)
    results = evaluation.evaluate_with_config(model, task.eval_sets, config, layout=layout, out_dir=out,
                                              seed=config.seed)
    doc = reports.results_document(config_path, "eval", config.seed, [reports.eval_entry(source, results)])
    if jax.process_index() == 0:
        reports.write_json(out / EVAL_FILE, doc)
    return doc
