"""The run's data: training questions and evaluation sets, as the config selects them.

`data.source`: `local` (the release's GSM8K split files in `data.dir` or $DPOST_DATA_DIR), `hub`
(`openai/gsm8k` through `datasets`), or `synthetic` (the CPU default's arithmetic task, generated
once into WORKDIR/data together with its tokenizer). OOD sets are evaluation-only.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from etils import epath

from dpost.data import gsm8k, ood, synthetic
from dpost.data.gsm8k import Example

SOURCES = ("local", "hub", "synthetic")
SYNTHETIC_DATA_SEED = 1234  # fixed: every method and seed sees the same task and held-out sets


@dataclasses.dataclass
class Task:
    train: list[Example]
    eval_sets: dict[str, list[Example]]  # name -> examples ("dev", "test", "svamp", ...)
    tokenizer_dir: str | None = None  # synthetic: the tokenizer trained on the task text


def answer_only_after(examples: list[Example], labeled: int) -> list[Example]:
    """`data.labeled`: the first `labeled` questions keep their gold rationale, the others keep
    only the final answer (`answer` ""); 0 keeps every rationale."""
    if labeled < 0:
        raise ValueError(f"config field 'data.labeled' must be >= 0, got {labeled}")
    if not labeled:
        return examples
    return examples[:labeled] + [dataclasses.replace(ex, answer="") for ex in examples[labeled:]]


def _take(examples: list[Example], n: int) -> list[Example]:
    return examples[:n] if n and n > 0 else examples


def _synthetic(config, workdir: str) -> Task:
    vocab_size = int(config.model.scratch.get("tokenizer_vocab_size", 512)) if config.model.scratch else 512
    folder = epath.Path(workdir) / "data"
    files = {split: folder / f"{split}.jsonl" for split in ("train", "dev", "test")}
    tok_dir = folder / "tokenizer"
    if not all(f.exists() for f in files.values()) or not (tok_dir / synthetic.TOKENIZER_FILE).exists():
        import jax

        if jax.process_index() == 0:
            splits = synthetic.splits_from_fields(SYNTHETIC_DATA_SEED, dict(config.data.synthetic))
            synthetic.train_tokenizer(synthetic.tokenizer_corpus(splits["train"]), str(tok_dir), vocab_size)
            synthetic.write_splits(str(folder), splits)
        from dpost import distributed

        distributed.barrier("synthetic data")
    loaded = {split: gsm8k.load_jsonl(str(path), split) for split, path in files.items()}
    return Task(loaded["train"], {k: loaded[k] for k in ("dev", "test")}, str(tok_dir))


def load_task(config, workdir: str) -> Task:
    source = config.data.source
    if source == "synthetic":
        task = _synthetic(config, workdir)
    elif source in ("local", "hub"):
        where: Any = "hub" if source == "hub" else (config.data.dir or None)
        task = Task(
            gsm8k.load_split("train", where),
            {split: gsm8k.load_split(split, where) for split in ("dev", "test")},
        )
    else:
        raise ValueError(f"config field 'data.source' must be one of {SOURCES}, got {source!r}")
    unknown = [s for s in config.data.eval_splits if s not in task.eval_sets]
    if unknown:
        raise ValueError(f"config field 'data.eval_splits': unknown splits {unknown}; have {sorted(task.eval_sets)}")
    eval_sets = {s: task.eval_sets[s] for s in config.data.eval_splits}
    for name in config.data.ood:  # OOD files sit beside gsm8k/ in data.dir (default $DPOST_DATA_DIR)
        path = str(epath.Path(config.data.dir) / ood.FILES[name]) if config.data.dir else None
        eval_sets[name] = ood.load_ood(name, path)
    n = config.data.max_eval
    return Task(
        answer_only_after(_take(task.train, config.data.max_train), config.data.labeled),
        {k: _take(v, n) for k, v in eval_sets.items()},
        task.tokenizer_dir,
    )
