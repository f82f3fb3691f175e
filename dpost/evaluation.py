"""Accuracy of a model on evaluation sets: greedy decoding with the calculator, plus pass@k / maj@k."""

from __future__ import annotations

import collections
from typing import Sequence

import jax
import numpy as np
from etils import epath

from dpost import sampling
from dpost.stages import bundle_on, prompt_ids, prompts_per_batch, sampling_layout
from dpost.data.gsm8k import Example, extract_answer, is_correct
from dpost.models.bundle import ModelBundle
from dpost.sharding import Layout
from dpost.workdir import write_jsonl_atomic


def majority_answer(answers: Sequence[float | None]) -> float | None:
    """Most frequent valid answer (ties: the one seen first); None when no answer is valid."""
    valid = [round(a, 4) for a in answers if a is not None]
    if not valid:
        return None
    counts = collections.Counter(valid)
    best = max(counts.values())
    return next(a for a in valid if counts[a] == best)


def score(examples: Sequence[Example], completions: Sequence[Sequence[str]]) -> dict:
    """accuracy (first completion), invalid rate; with k > 1 completions also pass@k and maj@k."""
    first = [extract_answer(c[0]) for c in completions]
    out = {
        "accuracy": float(np.mean([is_correct(a, ex.gold) for a, ex in zip(first, examples)])) if examples else 0.0,
        "invalid": float(np.mean([a is None for a in first])) if examples else 0.0,
        "n": len(examples),
    }
    k = min((len(c) for c in completions), default=1)
    if k > 1:
        answers = [[extract_answer(t) for t in c] for c in completions]
        out[f"pass@{k}"] = float(np.mean([any(is_correct(a, ex.gold) for a in ans) for ans, ex in zip(answers, examples)]))
        out[f"maj@{k}"] = float(np.mean([is_correct(majority_answer(ans), ex.gold) for ans, ex in zip(answers, examples)]))
    return out


def evaluate(bundle: ModelBundle, eval_sets: dict[str, list[Example]], scfg, *, prompt_fn, layout: Layout | None = None,
             progress: bool = True, out_dir: epath.Path | None = None, pass_at_k: int = 0,
             pass_at_k_temperature: float = 0.7, seed: int = 0) -> dict[str, dict]:
    """{set name: {"accuracy", "invalid", "n"[, "pass@k", "maj@k"]}}; predictions saved per set."""
    results = {}
    for name, examples in eval_sets.items():
        prompts = [prompt_fn(ex.question) for ex in examples]
        greedy = sampling.generate(
            bundle, prompts, num_samples=1, max_new_tokens=scfg.max_new_tokens, temperature=0.0,
            calculator=scfg.calculator, layout=layout, batch_size=prompts_per_batch(scfg), progress=progress,
            length_buckets=scfg.length_buckets or None, batching=scfg.batching,
        )
        texts = [[s.text for s in outs] for outs in greedy]
        results[name] = score(examples, texts)
        if pass_at_k > 1:
            sampled = sampling.generate(
                bundle, prompts, num_samples=pass_at_k, max_new_tokens=scfg.max_new_tokens,
                temperature=pass_at_k_temperature, calculator=scfg.calculator, layout=layout,
                batch_size=prompts_per_batch(scfg), progress=progress, seed=seed,
                length_buckets=scfg.length_buckets or None, batching=scfg.batching,
            )
            k_scores = score(examples, [[s.text for s in outs] for outs in sampled])
            results[name].update({k: v for k, v in k_scores.items() if "@" in k})
        if out_dir is not None and jax.process_index() == 0:
            write_jsonl_atomic(out_dir / f"predictions_{name}.jsonl", [
                {"id": ex.id, "gold": ex.gold, "prediction": extract_answer(t[0]), "correct": is_correct(extract_answer(t[0]), ex.gold),
                 "text": t[0]}
                for ex, t in zip(examples, texts)
            ])
    return results


def evaluate_with_config(bundle: ModelBundle, eval_sets: dict[str, list[Example]], config, *, layout: Layout,
                         out_dir: epath.Path, seed: int) -> dict[str, dict]:
    """`evaluate` as a run's config sets it up (`sampling.eval`, `eval.pass_at_k`, ...). Multi-host:
    every host evaluates on its own devices (outputs of the global mesh are not fetchable by one
    host); the results are the same on every host, process 0 writes the predictions."""
    layout = sampling_layout(layout)
    bundle = bundle_on(bundle, layout)
    return evaluate(
        bundle, eval_sets, config.sampling.eval, prompt_fn=lambda q: prompt_ids(bundle, q), layout=layout,
        progress=config.progress, out_dir=out_dir, pass_at_k=config.eval.pass_at_k,
        pass_at_k_temperature=config.eval.pass_at_k_temperature, seed=seed,
    )
