"""Child process of test_checkpoints.py: one small DPO stage through `training.run`.

    python resume_run.py CKPT_DIR OUT_NPZ [WORKDIR]

AdamW with warm-up + cosine, grad accumulation 2, reference in the step, data from a checkpointable
grain loader (`pipeline.make_array_loader`) that crosses an epoch boundary. Saves every 2 steps. The test hooks
DPOST_TEST_KILL_AFTER_STEP / DPOST_TEST_SIGTERM_AFTER_STEP (see dpost/faults.py) interrupt
it; a rerun with the same CKPT_DIR resumes. Writes the final params to OUT_NPZ and prints a JSON
line {"resumed_from", "final_step", "steps"}.
"""

from __future__ import annotations

import json
import os
import sys

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util

sys.path.insert(0, os.path.dirname(__file__))
import training_helpers as th  # noqa: E402

from dpost import training  # noqa: E402
from dpost.data import pipeline  # noqa: E402
from dpost.models.llama import model as lm  # noqa: E402
from dpost.models.llama.model import LlamaConfig  # noqa: E402

NUM_STEPS = 6


def main(ckpt_dir: str, out: str, workdir: str | None = None):
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=8)
    module = lm.make_module(cfg)
    params = nn.unbox(lm.init_params(cfg, jax.random.key(1)))
    ref_params = jax.tree.map(np.asarray, params)
    ocfg = training.OptimizerConfig(learning_rate=1e-2, total_steps=NUM_STEPS, weight_decay=0.01, warmup_ratio=0.2,
                                    min_lr_rate=0.1)
    tx = training.make_optimizer(ocfg)
    step = training.make_dpo_step(module, tx, training.DPOConfig(), lr_schedule=training.make_schedule(ocfg),
                                  grad_accum=2)
    data = pipeline.make_array_loader(th.pair_dataset(3, 16, prompt_len=8, chosen_len=8, rejected_len=8),
                                      batch_size=4, seed=5)
    state = training.create_train_state(params, tx, rng=7)
    ref = jax.device_put(ref_params)
    result = training.run(
        lambda s, b: step(s, b, ref), state, data,
        training.LoopConfig(num_steps=NUM_STEPS, save_every=2, keep=3, log_every=1, progress=False, name="dpo"),
        checkpoint_dir=ckpt_dir, workdir=workdir,
    )
    flat = traverse_util.flatten_dict(jax.device_get(result.state.params), sep="/")
    np.savez(out, **flat)
    print(json.dumps({"resumed_from": result.resumed_from, "final_step": result.final_step, "steps": result.steps}))


if __name__ == "__main__":
    main(*sys.argv[1:])
