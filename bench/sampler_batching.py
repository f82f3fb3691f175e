"""Static vs continuous batching on the CPU default's own sampling workload.

    DPOST_CACHE_DIR=... python bench/sampler_batching.py [--questions 96] [--samples 3]

The arith_tiny M0 (pre-trained once, from the cache), its synthetic training questions, T = 0.7,
top-k 50, the calculator on, the config's sequences in flight; each path runs twice (the first call
compiles) and the script prints the warm times, the ratio, and checks that both sampled the same
tokens.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # this checkout's dpost, whatever the installed one

from dpost import pretrain, sampling, stages  # noqa: E402
from dpost.data.task import load_task  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--questions", type=int, default=96)
    parser.add_argument("--samples", type=int, default=3)
    args = parser.parse_args()
    spec = importlib.util.spec_from_file_location("arith_tiny", os.path.join(ROOT, "configs", "arith_tiny.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    model, _ = pretrain.pretrained_m0(config)
    task = load_task(config, tempfile.mkdtemp(prefix="dpost_bench_"))
    prompts = [stages.prompt_ids(model, ex.question) for ex in task.train[: args.questions]]
    scfg = config.sampling.labels
    warm, outputs = {}, {}
    for batching in ("static", "continuous") * 2:
        start = time.perf_counter()
        outputs[batching] = sampling.generate(
            model, prompts, num_samples=args.samples, max_new_tokens=scfg.max_new_tokens, temperature=0.7,
            top_k=scfg.top_k, seed=1, calculator=True, batch_size=scfg.batch_size // args.samples,
            progress=False, batching=batching)
        warm[batching] = time.perf_counter() - start
    same = all(list(a.token_ids) == list(b.token_ids) for x, y in zip(outputs["static"], outputs["continuous"]) for a, b in zip(x, y))
    tokens = sum(len(s.token_ids) for o in outputs["static"] for s in o)
    print(f"{len(prompts)} questions x {args.samples} samples, {tokens} tokens, same tokens: {same}")
    for name, seconds in warm.items():
        print(f"{name:10s} {seconds:6.2f} s  {tokens / seconds:8.0f} tok/s")
    print(f"continuous / static time: {warm['continuous'] / warm['static']:.2f}x")


if __name__ == "__main__":
    main()
