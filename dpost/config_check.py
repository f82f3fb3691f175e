"""Config validation in one place, at start: one table, field path -> what the field accepts.

`check(config)` runs before anything is loaded or written (`python -m dpost.main`, `python -m
dpost.compare`) and raises one ValueError whose one line names every offending field by its full
path, its value and what is allowed. Nothing is mapped silently: a misspelled enumerated value is an
error, never a fallback. Enumerations come from the code that implements them (loss types from
dpost.training, families from the model registry, OOD sets from dpost.data.ood, weight-source
schemes from dpost.models.sources), so the table and the code cannot drift. To validate a new
field, add one row to `rules()` (or a cross-field rule to `cross_field_rules()`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

METHODS = ("sft", "st", "dpo_st")  # warm-up only | self-training without DPO | DPO-ST
MODES = ("train", "eval")
DTYPES = ("float32", "bfloat16")
SCRATCH = "scratch"
PRETRAIN = "pretrain"
GENERATED = (SCRATCH, PRETRAIN)  # model sources built from model.scratch rather than read from weights


@dataclasses.dataclass(frozen=True)
class Rule:
    allowed: str  # what the error message says the field accepts
    accepts: Callable[[Any], bool]


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def one_of(values) -> Rule:
    values = tuple(values)
    return Rule("one of " + ", ".join(repr(v) for v in values), lambda v: v in values)


def each_one_of(values) -> Rule:
    values = tuple(values)
    return Rule("a tuple of " + ", ".join(repr(v) for v in values),
                lambda v: isinstance(v, (tuple, list)) and all(x in values for x in v))


def integer(low: int = 0) -> Rule:
    return Rule(f"an integer >= {low}", lambda v: _is_int(v) and v >= low)


def number(low: float, high: float | None = None, low_open: bool = False, high_open: bool = False) -> Rule:
    left, right = "(" if low_open else "[", ")" if high_open or high is None else "]"
    text = f"a number in {left}{low}, {'inf' if high is None else high}{right}"

    def accepts(v):
        if not _is_number(v):
            return False
        above = v > low if low_open else v >= low
        below = high is None or (v < high if high_open else v <= high)
        return above and below

    return Rule(text, accepts)


BOOLEAN = Rule("True or False", lambda v: isinstance(v, bool))
MESH_SIZE = Rule("an integer >= 1, or -1 (all remaining devices)", lambda v: _is_int(v) and (v >= 1 or v == -1))
POSITIVE_INTS = Rule("a tuple of integers >= 1", lambda v: isinstance(v, (tuple, list)) and all(_is_int(x) and x >= 1 for x in v))


def _weight_schemes() -> tuple[str, ...]:
    from dpost.models.sources import SCHEMES  # <scheme>:<location>, as models.load reads them

    return SCHEMES


def _weights_forms(allow_scratch: bool) -> str:
    return ", ".join([f"{s}:<location>" for s in _weight_schemes()] + (list(GENERATED) if allow_scratch else []))


def _weights_source(allow_scratch: bool, allow_empty: bool) -> Rule:

    def accepts(v):
        if not isinstance(v, str):
            return False
        if v == "":
            return allow_empty
        if v in GENERATED:
            return allow_scratch
        scheme, sep, location = v.partition(":")
        return bool(sep) and scheme in _weight_schemes() and bool(location)

    return Rule("one of " + _weights_forms(allow_scratch) + (", ''" if allow_empty else ""), accepts)


def _optimizer_rules(prefix: str) -> dict[str, Rule]:
    from dpost.training.optimizer import MOMENTS_DTYPES

    return {
        f"{prefix}.learning_rate": number(0, low_open=True),
        f"{prefix}.weight_decay": number(0),
        f"{prefix}.warmup_ratio": number(0, 1),
        f"{prefix}.min_lr_rate": number(0, 1),
        f"{prefix}.max_grad_norm": number(0),  # 0: no clipping
        f"{prefix}.b1": number(0, 1, high_open=True),
        f"{prefix}.b2": number(0, 1, high_open=True),
        f"{prefix}.eps": number(0, low_open=True),
        f"{prefix}.moments_dtype": one_of(MOMENTS_DTYPES),
        f"{prefix}.average_last": number(0, 1),
    }


def _sampling_rules(prefix: str) -> dict[str, Rule]:
    from dpost.sampling import BATCHING

    return {
        f"{prefix}.num_samples": integer(1),
        f"{prefix}.temperature": number(0),
        f"{prefix}.top_p": number(0, 1, low_open=True),
        f"{prefix}.top_k": integer(0),
        f"{prefix}.max_new_tokens": integer(1),
        f"{prefix}.batch_size": integer(1),
        f"{prefix}.calculator": BOOLEAN,
        f"{prefix}.shard_questions": integer(1),
        f"{prefix}.length_buckets": POSITIVE_INTS,
        f"{prefix}.batching": one_of(BATCHING),
    }


def rules() -> dict[str, Rule]:
    """The table (built on call: the enumerations are imported from the modules that own them)."""
    from dpost.data import gsm8k, ood
    from dpost.data.builders import PAIR_REJECTED, PAIR_SELECTIONS, SIMILARITIES
    from dpost.data.task import SOURCES as DATA_SOURCES
    from dpost.models.layers import ATTENTIONS, REMATS
    from dpost.models.registry import FAMILIES
    from dpost.stages import DPO_COUNTS
    from dpost.training.losses import LOSS_TYPES
    from dpost.training.steps import DPO_REFERENCES

    return {
        "method": one_of(METHODS),
        "mode": one_of(MODES),
        "seed": integer(0),
        "iterations": integer(0),
        "progress": BOOLEAN,
        "model.source": _weights_source(allow_scratch=True, allow_empty=True),  # '' only in mode=eval: below
        "model.family": one_of(("",) + tuple(FAMILIES)),
        "model.dtype": one_of(DTYPES),
        "model.dropout": number(0, 1, high_open=True),
        "model.remat": Rule("one of " + ", ".join(map(repr, REMATS)) + " (or True / False: full / none)",
                            lambda v: isinstance(v, bool) or v in REMATS),
        "model.scan_layers": BOOLEAN,
        "model.attention": one_of(ATTENTIONS),
        "model.logits_chunk": integer(0),
        "data.source": one_of(DATA_SOURCES),
        "data.max_train": integer(0),
        "data.labeled": integer(0),
        "data.max_eval": integer(0),
        "data.eval_splits": each_one_of(s for s in gsm8k.SPLITS if s != "train"),
        "data.ood": each_one_of(sorted(ood.LOADERS)),
        "data.max_prompt_len": integer(1),
        "data.max_target_len": integer(1),
        "mesh.data": MESH_SIZE,
        "mesh.fsdp": MESH_SIZE,
        "mesh.tensor": MESH_SIZE,
        "sft.epochs": integer(1),
        "sft.max_steps": integer(0),
        "sft.batch_size": integer(1),
        "sft.grad_accum": integer(1),
        **_optimizer_rules("sft.optimizer"),
        "dpo.beta": number(0, low_open=True),
        "dpo.loss_type": one_of(LOSS_TYPES),
        "dpo.label_smoothing": number(0, 0.5, high_open=True),  # robust DPO divides by 1 - 2 e
        "dpo.rpo_alpha": number(0),
        "dpo.steps": integer(1),
        "dpo.batch_size": integer(1),
        "dpo.grad_accum": integer(1),
        **_optimizer_rules("dpo.optimizer"),
        "dpo.reference": one_of(DPO_REFERENCES),
        "dpo.eval_pairs": integer(0),
        "dpo.mask_calculator": BOOLEAN,
        "dpo.count": one_of(DPO_COUNTS),
        "pairs.max_per_question": integer(1),
        "pairs.dedup_threshold": number(0, 1),
        "pairs.similarity": one_of(SIMILARITIES),
        "pairs.select": one_of(PAIR_SELECTIONS),
        "pairs.rejected": one_of(PAIR_REJECTED),
        "pseudo_labels.similarity": one_of(SIMILARITIES),
        "pseudo_labels.dedup_threshold": number(0, 1),
        "pseudo_labels.cap_percentile": number(0, 100, low_open=True),
        **_sampling_rules("sampling.pairs"),
        **_sampling_rules("sampling.labels"),
        **_sampling_rules("sampling.eval"),
        "eval.checkpoint": _weights_source(allow_scratch=False, allow_empty=True),  # required in mode=eval: below
        "eval.every_stage": BOOLEAN,
        "eval.pass_at_k": integer(0),
        "eval.final_replicates": integer(1),
        "eval.pass_at_k_temperature": number(0),
        "pretrain.corpus.n": integer(1),
        "pretrain.corpus.seed": integer(0),
        "pretrain.seed": integer(0),
        "pretrain.epochs": integer(1),
        "pretrain.max_steps": integer(0),
        "pretrain.batch_size": integer(1),
        **_optimizer_rules("pretrain.optimizer"),
        "pretrain.checkpoint_every": integer(1),
        "checkpoint.every_steps": integer(1),
        "checkpoint.keep": integer(1),
        "log_every": integer(1),
        "compilation_cache": Rule("'auto', 'off' or a directory", lambda v: isinstance(v, str) and v != ""),
    }


def cross_field_rules() -> tuple[tuple[Callable[[Any], bool], str], ...]:
    """(applies to config, message) pairs; checked only when every field is valid alone."""
    return (
        (lambda c: c.mode == "train" and c.model.source == "",
         "config field 'model.source' is empty; mode 'train' needs one of " + _weights_forms(allow_scratch=True)),
        (lambda c: c.mode == "eval" and c.eval.checkpoint == "",
         "config field 'eval.checkpoint' is empty; mode 'eval' needs one of " + _weights_forms(allow_scratch=False)),
        (lambda c: c.mode == "train" and c.model.source in GENERATED and c.model.family == "",
         "config field 'model.family' is empty; model.source 'scratch' or 'pretrain' needs a family"),
        (lambda c: c.dpo.mask_calculator and c.dpo.reference != "in_step",
         "config field 'dpo.mask_calculator' = True needs dpo.reference 'in_step' (the precomputed reference "
         "log-probs are sums over every token)"),
        (lambda c: c.dpo.count == "through_wrong_step" and c.dpo.reference != "in_step",
         "config field 'dpo.count' = 'through_wrong_step' needs dpo.reference 'in_step' (the precomputed "
         "reference log-probs are sums over every token)"),
        (lambda c: c.dpo.count == "through_wrong_step" and c.pairs.rejected != "wrong_step",
         "config field 'dpo.count' = 'through_wrong_step' needs pairs.rejected 'wrong_step' (the pairs "
         "then record where their first differing steps end)"),
    )


def _lookup(config, path: str):
    node = config
    for part in path.split("."):
        node = node[part]  # ConfigDict and dict both index by name
    return node


def problems(config) -> list[str]:
    """One message per invalid field (full path, value, what is allowed); [] when the config is valid."""
    found = []
    for path, rule in rules().items():
        try:
            value = _lookup(config, path)
        except (KeyError, AttributeError, TypeError):
            found.append(f"config field '{path}' is missing (dpost.config_check lists it)")
            continue
        if not rule.accepts(value):
            found.append(f"config field '{path}' = {value!r}: expected {rule.allowed}")
    if not found:
        found = [message for applies, message in cross_field_rules() if applies(config)]
    return found


def check(config) -> None:
    """Raises ValueError (one line, every problem) when the config is invalid."""
    found = problems(config)
    if found:
        raise ValueError("; ".join(found))


def check_values(path: str, values, flag: str) -> None:
    """Raises ValueError naming `flag` when a command-line list gives `path` a value `rules()` refuses."""
    rule = rules()[path]
    bad = [v for v in values if not rule.accepts(v)]
    if bad:
        raise ValueError(f"{flag}: {', '.join(map(repr, bad))} not allowed for config field '{path}': expected {rule.allowed}")
