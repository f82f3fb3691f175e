"""Where a Llama decode step's time goes, per XLA operation: a `jax.profiler` trace of the sampler's
decode step, each executed thunk mapped to the HLO instruction it runs and that instruction's source
op (e.g. `mlp/dot_general`, `attn/reduce_sum`).

SmolLM2-135M's shape (random init: timing only), fp32, `Llama.decode_step` on the decode layout the
sampler makes, --rows rows and a cache of --width slots filled to --fill, --steps steps per call in a
`fori_loop` (cache donated, updated in place), as the sampler's while loop runs them. Prints the
wall time per step and, per (result shape, source op), the summed thunk time per step and how many
thunks ran per step. XLA:CPU runs independent thunks concurrently, so the sum exceeds the wall time.

    python bench/decode_profile.py [--rows 32] [--width 416] [--fill 300] [--steps 4] [--top 25]
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import sys
import tempfile
import time

DUMP = tempfile.mkdtemp(prefix="decode_profile_")
# Before JAX starts: the optimized HLO names every thunk the trace shows.
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_dump_to={DUMP} --xla_dump_hlo_as_text".strip()
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from dpost.models.llama import model as llama  # noqa: E402
from trace_summary import hlo_name, hlo_sources  # noqa: E402  (bench/trace_summary.py)
from train_options import model_config  # noqa: E402  (bench/train_options.py: known shapes by name)

MODULE = "jit_decode_steps"


def decode_state(cfg, rows: int, width: int, fill: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    shape = (rows, cfg.num_kv_heads, width, cfg.head_dim)
    cache = tuple({"k": jnp.asarray(rng.standard_normal(shape, np.float32)),
                   "v": jnp.asarray(rng.standard_normal(shape, np.float32))} for _ in range(cfg.num_layers))
    valid = np.zeros((rows, width), bool)
    valid[:, :fill] = True
    return {"cache": cache, "kv_valid": jnp.asarray(valid), "next_position": jnp.full((rows,), fill, jnp.int32),
            "index": jnp.full((rows,), fill, jnp.int32)}


def module_sources(dump: str) -> dict[str, tuple[str, str]]:
    """The decode program's HLO instructions -> (result shape, source op)."""
    return hlo_sources(glob.glob(os.path.join(dump, f"*{MODULE}.cpu_after_optimizations.txt")))


def thunk_times(trace_dir: str) -> tuple[collections.Counter, collections.Counter]:
    """Summed microseconds and executions per HLO instruction of the decode program in the trace."""
    path = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)[0]
    events = json.load(gzip.open(path))
    events = events["traceEvents"] if isinstance(events, dict) else events
    times, runs = collections.Counter(), collections.Counter()
    for event in events:
        args = event.get("args") or {}
        if event.get("ph") == "X" and args.get("hlo_module") == MODULE and args.get("hlo_op"):
            times[args["hlo_op"]] += event.get("dur", 0)
            runs[args["hlo_op"]] += 1
    return times, runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--width", type=int, default=416, help="cache slots (the loop workload: 160 + 256)")
    ap.add_argument("--fill", type=int, default=300, help="slots already filled")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    _, cfg = model_config("smollm2", "float32")
    params = nn.unbox(jax.jit(lambda key: llama.Llama(cfg).init(key, jnp.zeros((1, 2), jnp.int32))["params"])(
        jax.random.key(0)))
    params = jax.jit(llama.Llama.decode_layout, static_argnums=1)(params, cfg.compute_dtype)

    def decode_steps(p, tokens, state):
        def body(_, carry):
            tokens, state, _ = carry
            logits, state = llama.Llama(cfg).apply({"params": p}, tokens, state, method="decode_step")
            return jnp.argmax(logits, -1).astype(jnp.int32), state, logits

        return jax.lax.fori_loop(0, args.steps, body, (tokens, state, jnp.zeros((tokens.shape[0], cfg.vocab_size))))

    run = jax.jit(decode_steps, donate_argnums=2)
    tokens = jnp.arange(args.rows, dtype=jnp.int32) + 5
    jax.block_until_ready(run(params, tokens, decode_state(cfg, args.rows, args.width, args.fill)))  # compile
    walls = []
    for _ in range(3):
        state = jax.block_until_ready(decode_state(cfg, args.rows, args.width, args.fill))
        start = time.perf_counter()
        jax.block_until_ready(run(params, tokens, state))
        walls.append((time.perf_counter() - start) / args.steps)
    trace_dir = tempfile.mkdtemp(prefix="decode_trace_")
    state = jax.block_until_ready(decode_state(cfg, args.rows, args.width, args.fill))
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    jax.block_until_ready(run(params, tokens, state))
    jax.profiler.stop_trace()

    sources = module_sources(DUMP)
    by_source, count = collections.Counter(), collections.Counter()
    times, runs = thunk_times(trace_dir)
    for op, micros in times.items():
        key = sources.get(hlo_name(op), ("?", op))
        by_source[key] += micros
        count[key] += runs[op]
    total = sum(by_source.values()) / 1e3 / args.steps
    print(f"# decode step, SmolLM2-135M shape fp32, {args.rows} rows, cache {args.width} slots filled to "
          f"{args.fill}; jax {jax.__version__}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print(f"# wall {min(walls) * 1e3:.1f} ms / step (best of 3 calls of {args.steps} steps); "
          f"thunks {total:.1f} ms / step summed")
    print(f"| {'ms / step':>9} | {'share':>5} | {'thunks / step':>13} | {'result shape':<28} | source op |")
    print(f"| {'-' * 9} | {'-' * 5} | {'-' * 13} | {'-' * 28} | --- |")
    for (shape, source), micros in by_source.most_common(args.top):
        ms = micros / 1e3 / args.steps
        print(f"| {ms:9.2f} | {ms / total:5.1%} | {count[shape, source] / args.steps:13.1f} | {shape[:28]:<28} | "
              f"{source} |")


if __name__ == "__main__":
    main()
