"""Fused (`jax.nn.dot_product_attention`) vs einsum attention on the CPU default's model and shapes.

    python bench/attention.py [--batch 32] [--prompt 64] [--target 96] [--steps 5]

A randomly initialised Llama with configs/arith_tiny.py's `model.scratch` shape (vocab 1024), fp32:
an SFT step and a DPO step (AdamW, reference in the step: the DPO stage's shared-prompt layout),
scoring (`completion_logits`) and prefill on left-padded prompts and right-padded targets of
random lengths. Both implementations run in one process, interleaved, so a shared CPU's load falls
on both alike; the script prints the median warm time of each and the ratio fused / einsum.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from dpost import training  # noqa: E402
from dpost.models import layers  # noqa: E402
from dpost.models.llama import model as llama  # noqa: E402


def default_model_config() -> llama.LlamaConfig:
    spec = importlib.util.spec_from_file_location("arith_tiny", os.path.join(ROOT, "configs", "arith_tiny.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    scratch = dict(module.get_config().model.scratch)
    vocab = scratch.pop("tokenizer_vocab_size")
    return llama.LlamaConfig(vocab_size=vocab, **scratch)


def rows(rng, n, width, vocab, left):
    lengths = rng.integers(width // 2, width + 1, n)
    ids = rng.integers(3, vocab, (n, width)).astype(np.int32)
    cols = np.arange(width)[None]
    mask = (cols >= width - lengths[:, None]) if left else (cols < lengths[:, None])
    return ids * mask, mask.astype(np.int32)


def workloads(cfg, batch, prompt_len, target_len, seed=0):
    """{name: (jitted fn(module-bound), args)} per attention implementation."""
    rng = np.random.default_rng(seed)
    prompt, prompt_mask = rows(rng, batch, prompt_len, cfg.vocab_size, left=True)
    chosen, chosen_mask = rows(rng, batch, target_len, cfg.vocab_size, left=False)
    rejected, rejected_mask = rows(rng, batch, target_len, cfg.vocab_size, left=False)
    sft = {"prompt": prompt, "prompt_mask": prompt_mask, "completion": chosen, "completion_mask": chosen_mask}
    pairs = {"prompt": prompt, "prompt_mask": prompt_mask, "chosen": chosen, "chosen_mask": chosen_mask,
             "rejected": rejected, "rejected_mask": rejected_mask}
    opt = training.OptimizerConfig(learning_rate=1e-4, total_steps=100)
    tx, sched = training.make_optimizer(opt), training.make_schedule(opt)
    out = {}
    for name in layers.ATTENTIONS:
        module = llama.make_module(cfg.replace(attention=name))
        params = nn.unbox(llama.init_params(cfg, jax.random.key(0)))
        copy = lambda: jax.tree.map(lambda x: x.copy(), params)  # noqa: E731  (steps donate their state)
        ref_params = copy()
        sft_step = training.make_sft_step(module, tx, lr_schedule=sched)
        dpo_step = training.make_dpo_step(module, tx, training.DPOConfig(), lr_schedule=sched)
        score = jax.jit(lambda p, b, m=module: m.apply({"params": p}, b["prompt"], b["prompt_mask"], b["completion"],
                                                       b["completion_mask"], method="completion_logits"))
        prefill = jax.jit(lambda p, b, m=module: m.apply({"params": p}, b["prompt"], b["prompt_mask"], target_len, 1,
                                                         method="prefill"))
        states = {kind: training.create_train_state(copy(), tx) for kind in ("sft", "dpo")}

        def train(kind, f, *args, states=states):
            states[kind], metrics = f(states[kind], *args)
            return metrics

        out[name] = {
            "sft step": lambda f=sft_step, t=train: t("sft", f, sft),
            "dpo step": lambda f=dpo_step, p=ref_params, t=train: t("dpo", f, pairs, p),
            "scoring": lambda f=score, p=params: f(p, sft),
            "prefill": lambda f=prefill, p=params: f(p, sft),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--target", type=int, default=96)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    cfg = default_model_config()
    runs = workloads(cfg, args.batch, args.prompt, args.target)
    times = {name: {task: [] for task in fns} for name, fns in runs.items()}
    for name, fns in runs.items():  # compile
        for fn in fns.values():
            jax.block_until_ready(fn())
    for _ in range(args.steps):
        for name, fns in runs.items():
            for task, fn in fns.items():
                start = time.perf_counter()
                jax.block_until_ready(fn())
                times[name][task].append(time.perf_counter() - start)
    print(f"arith_tiny model, batch {args.batch}, prompt {args.prompt} + target {args.target} tokens, "
          f"median of {args.steps} warm runs")
    print(f"{'':10s} {'fused ms':>10s} {'einsum ms':>10s} {'fused/einsum':>13s}")
    for task in times["fused"]:
        f, e = (statistics.median(times[n][task]) * 1e3 for n in ("fused", "einsum"))
        print(f"{task:10s} {f:10.1f} {e:10.1f} {f / e:13.2f}")


if __name__ == "__main__":
    main()
