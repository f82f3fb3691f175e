"""Training-step options side by side: remat policy, scanned or unrolled layers, AdamW moments dtype.

    python bench/train_options.py [--model tiny|smollm2|llama-1b|flan-t5-large] [--step sft|dpo] [--batch 4]
                                  [--prompt 64] [--target 64] [--steps 3] [--dtype float32]
                                  [--variants base,remat=full,remat=dots,scan_layers=0,moments=bfloat16]

Random-init weights of the named shapes (the families' known.py tables; `tiny` is the CPU default's
Llama), one SFT step or DPO step (AdamW, fp32 masters; DPO: --batch pairs in the shared-prompt layout,
reference log-probs precomputed, as the driver runs it) per variant on random tokens whose rows have
random lengths between half and all of --prompt / --target. Prints per variant: the
first call's seconds (compile + one step), median step seconds over the --steps after it (wall and
process CPU; the ratios are of CPU seconds, steadier on a shared machine), the compiled step's
temporaries (XLA's memory_analysis: activations + gradients) and each ratio to the first
variant, and the largest |difference| of the trained params from the first variant's (0: the same
bits). Timings on a shared CPU move with its load; the load average is printed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MODELS = {  # family, known.py hub id (None: the CPU default's tiny Llama)
    "tiny": ("llama", None),
    "smollm2": ("llama", "HuggingFaceTB/SmolLM2-135M-Instruct"),
    "llama-1b": ("llama", "TinyLlama/TinyLlama-1.1B-Chat-v1.0"),
    "flan-t5-large": ("t5", "google/flan-t5-large"),
}


def model_config(name: str, dtype: str):
    from dpost import models
    from dpost.models.shapes import known_hf_config

    family_name, hub_id = MODELS[name]
    family = models.get_family(family_name)
    if hub_id is None:
        from attention import default_model_config  # bench/attention.py: arith_tiny's model.scratch shape

        return family_name, default_model_config().replace(dtype=dtype)
    hf, _ = known_hf_config(hub_id)
    return family_name, family.config_from_hf(hf).replace(dtype=dtype)


def parse_variant(text: str) -> tuple[dict, str]:
    """'remat=dots' -> ({'remat': 'dots'}, 'float32'); 'moments=bfloat16' sets the optimizer's."""
    fields, moments = {}, "float32"
    for part in filter(None, text.split("+")):
        if part == "base":
            continue
        key, _, value = part.partition("=")
        if key == "moments":
            moments = value
        elif key == "scan_layers":
            fields[key] = value not in ("0", "false", "False")
        else:
            fields[key] = value
    return fields, moments


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", choices=sorted(MODELS))
    ap.add_argument("--step", default="sft", choices=("sft", "dpo"))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--target", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--variants", default="base,remat=full,remat=dots,scan_layers=0,scan_layers=0+remat=dots,"
                                          "moments=bfloat16")
    args = ap.parse_args()

    import flax.linen as nn
    import jax
    import numpy as np

    from dpost import models, training

    family_name, cfg = model_config(args.model, args.dtype)
    family = models.get_family(family_name)
    params = jax.jit(lambda key: nn.unbox(family.init_params(cfg, key)))(jax.random.key(0))
    from attention import rows as random_rows  # bench/attention.py: padded rows of random lengths

    rng = np.random.default_rng(0)
    vocab = cfg.vocab_size

    def batch():
        prompt, prompt_mask = random_rows(rng, args.batch, args.prompt, vocab, left=True)
        if args.step == "sft":
            completion, completion_mask = random_rows(rng, args.batch, args.target, vocab, left=False)
            return {"prompt": prompt, "prompt_mask": prompt_mask, "completion": completion,
                    "completion_mask": completion_mask}
        (chosen, chosen_mask), (rejected, rejected_mask) = (random_rows(rng, args.batch, args.target, vocab, left=False)
                                                            for _ in range(2))
        return {"prompt": prompt, "prompt_mask": prompt_mask, "chosen": chosen, "chosen_mask": chosen_mask,
                "rejected": rejected, "rejected_mask": rejected_mask,
                "ref_chosen_logps": -30 * rng.random(args.batch).astype(np.float32),
                "ref_rejected_logps": -30 * rng.random(args.batch).astype(np.float32)}

    batches = [batch() for _ in range(args.steps + 1)]

    rows, trained = [], []
    for variant in args.variants.split(","):
        fields, moments = parse_variant(variant)
        ocfg = training.OptimizerConfig(learning_rate=1e-5, total_steps=args.steps + 1, weight_decay=0.01,
                                        moments_dtype=moments)
        tx = training.make_optimizer(ocfg)
        module = family.make_module(cfg.replace(**fields))
        if args.step == "sft":
            step = training.make_sft_step(module, tx, lr_schedule=training.make_schedule(ocfg))
        else:
            step = training.make_dpo_step(module, tx, training.DPOConfig(reference="precomputed"),
                                          lr_schedule=training.make_schedule(ocfg))
        state = training.create_train_state(jax.tree.map(lambda x: x.copy(), params), tx)
        times, cpu = [], []
        for b in batches:
            t, c = time.perf_counter(), time.process_time()
            state, metrics = step(state, b)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
        temp = next(iter(step.programs.values())).memory_analysis().temp_size_in_bytes
        # the first call compiles (Step compiles ahead of time once per signature) and runs once
        trained.append(state.params)
        gap = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(trained[0])))
        rows.append((variant, times[0], cpu[0], statistics.median(times[1:]), statistics.median(cpu[1:]), temp,
                     float(metrics["loss"]), gap))

    print(f"{args.step.upper()} step, {args.model} ({family_name}, {cfg.num_layers} layers) {args.dtype}, batch {args.batch} x "
          f"({args.prompt} + {args.target}) tokens, {jax.devices()[0].device_kind}; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; median of {args.steps} steps after the first")
    print(f"{'variant':<28} {'1st call s':>10} {'cpu s':>8} {'x cpu':>5} {'step s':>8} {'cpu s':>8} {'x cpu':>5} "
          f"{'temp MiB':>9} {'x':>5} {'loss':>8} {'max |dparam|':>12}")
    _, _, cc0, _, sc0, m0, _, _ = rows[0]
    for variant, c, cc, s, sc, m, loss, gap in rows:
        print(f"{variant:<28} {c:10.2f} {cc:8.2f} {cc / cc0:5.2f} {s:8.3f} {sc:8.3f} {sc / sc0:5.2f} "
              f"{m / 2**20:9.1f} {m / m0:5.2f} {loss:8.4f} {gap:12.2e}")


if __name__ == "__main__":
    main()
