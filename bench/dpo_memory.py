"""Where the DPO step's memory goes: XLA's compile-time memory analysis, no step is run.

    python bench/dpo_memory.py [--layers 30] [--optimizer adamw|sgd] [--logits-chunk 0]

Random SmolLM2-135M-shaped Llama (hidden 576, 9 heads / 3 KV heads, MLP 1536, tied 49152-token
vocabulary; `--layers` of them, 30 in SmolLM2), the step of bench/dpo_step.py (4 pairs of 112 prompt
+ 112 completion positions, reference log-probs precomputed, remat). Prints the parameter bytes and
the compiled step's argument, output, aliased (donated) and temporary bytes: with `--layers 4` and
`--layers 8` the per-layer and fixed parts of the temporaries separate, and `--optimizer sgd` shows
how much of them the optimizer owns.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PAIRS, PROMPT, COMPLETION = 4, 112, 112


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw")
    ap.add_argument("--logits-chunk", type=int, default=0)
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    from flax import linen as nn

    from dpost import models, training
    from dpost.models.llama.model import LlamaConfig

    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=args.layers,
                         num_heads=9, num_kv_heads=3, head_dim=64, tie_word_embeddings=True, remat=True)
    family = models.get_family("llama")
    params = jax.eval_shape(lambda: nn.unbox(family.init_params(config, jax.random.key(0))))
    ocfg = training.OptimizerConfig(learning_rate=3e-7, total_steps=10, weight_decay=0.01, warmup_ratio=0.1,
                                    kind=args.optimizer, max_grad_norm=1.0)
    tx = training.make_optimizer(ocfg)
    state = jax.eval_shape(lambda p: training.create_train_state(p, tx), params)
    step = training.make_dpo_step(family.make_module(config), tx, training.DPOConfig(reference="precomputed"),
                                  lr_schedule=training.make_schedule(ocfg), logits_chunk=args.logits_chunk or None)
    ids = lambda n: jax.ShapeDtypeStruct((PAIRS, n), jnp.int32)  # noqa: E731
    batch = {"prompt": ids(PROMPT), "prompt_mask": ids(PROMPT), "chosen": ids(COMPLETION),
             "chosen_mask": ids(COMPLETION), "rejected": ids(COMPLETION), "rejected_mask": ids(COMPLETION),
             "ref_chosen_logps": jax.ShapeDtypeStruct((PAIRS,), jnp.float32),
             "ref_rejected_logps": jax.ShapeDtypeStruct((PAIRS,), jnp.float32)}
    analysis = step.lower(state, batch).compile(compiler_options=step.compiler_options).memory_analysis()
    gb = lambda n: f"{n / 1e9:.3f}"  # noqa: E731
    param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    print(f"layers {args.layers}, optimizer {args.optimizer}, logits_chunk {args.logits_chunk}: "
          f"params {gb(param_bytes)} GB, step arguments {gb(analysis.argument_size_in_bytes)}, "
          f"outputs {gb(analysis.output_size_in_bytes)}, aliased (donated) {gb(analysis.alias_size_in_bytes)}, "
          f"temporaries {gb(analysis.temp_size_in_bytes)} GB")


if __name__ == "__main__":
    main()
