"""Child process of test_training_sharded.py: 8 simulated CPU devices, mesh data=2, fsdp=2, tensor=2.

Runs one SFT step and one DPO step (AdamW) sharded with gradient accumulation 2 and on a single
device without accumulation, from the same params and batch (so this also checks that accumulation
over micro-batches equals the full batch), then an SFT step with dropout both ways (same accumulation),
and prints a JSON report (differences, shardings) on the last line.
XLA_FLAGS must be set by the parent before this interpreter starts.
"""

from __future__ import annotations

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import training_helpers as th  # noqa: E402

from dpost import sharding as sharding_lib  # noqa: E402
from dpost import training  # noqa: E402
from dpost.models.llama import model as lm  # noqa: E402
from dpost.models.llama.model import LlamaConfig  # noqa: E402


def main():
    assert jax.device_count() == 8, jax.devices()
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=8)
    module = lm.make_module(cfg)
    boxed = jax.eval_shape(lambda: lm.init_params(cfg, jax.random.key(0)))
    import flax.linen as nn

    params = nn.unbox(lm.init_params(cfg, jax.random.key(1)))
    params = jax.tree.map(lambda x: x * 2.0 if x.ndim > 1 else x, params)  # livelier logits
    abstract = nn.unbox(boxed)
    ocfg = training.OptimizerConfig(learning_rate=1e-3, total_steps=10, weight_decay=0.01, warmup_ratio=0.0,
                                    max_grad_norm=1.0)
    tx, sched = training.make_optimizer(ocfg), training.make_schedule(ocfg)
    mesh = sharding_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    psh = sharding_lib.param_shardings(boxed, mesh)
    layout = sharding_lib.Layout(mesh)
    ssh = training.state_shardings(psh, tx, abstract, layout)

    sft_batch = th.sft_batch(1, batch=8)
    pair_batch = th.pair_batch(2, batch=8)
    ref_params = jax.tree.map(lambda x: x * 1.01, params)

    report = {}
    for kind in ("sft", "dpo"):
        # single device
        if kind == "sft":
            single = training.make_sft_step(module, tx, lr_schedule=sched, grad_accum=1)
            s1, m1 = single(training.create_train_state(params, tx), sft_batch)
        else:
            single = training.make_dpo_step(module, tx, training.DPOConfig(), lr_schedule=sched, grad_accum=1)
            s1, m1 = single(training.create_train_state(params, tx), pair_batch, ref_params)
        # sharded
        sharded_params = jax.device_put(params, psh)
        state = training.create_train_state(sharded_params, tx, shardings=ssh)
        kw = dict(lr_schedule=sched, grad_accum=2, layout=layout, state_shardings=ssh)
        if kind == "sft":
            step = training.make_sft_step(module, tx, **kw)
            s2, m2 = step(state, training.put_batch(sft_batch, layout))
        else:
            step = training.make_dpo_step(module, tx, training.DPOConfig(), **kw)
            s2, m2 = step(state, training.put_batch(pair_batch, layout), jax.device_put(ref_params, psh))
        mu1 = s1.opt_state[1][0].mu
        mu2 = s2.opt_state[1][0].mu
        rel = lambda a, b: float(jnp.linalg.norm((a - b).ravel()) / max(float(jnp.linalg.norm(b.ravel())), 1e-30))  # noqa: E731
        q = s2.params["layers"]["attn"]["q"]
        mu_q = mu2["layers"]["attn"]["q"]
        report[kind] = {
            "metrics_single": {k: float(v) for k, v in m1.items()},
            "metrics_sharded": {k: float(v) for k, v in m2.items()},
            "max_rel_grad_diff": max(jax.tree.leaves(jax.tree.map(rel, jax.device_get(mu2), jax.device_get(mu1)))),
            "max_abs_param_diff": max(jax.tree.leaves(jax.tree.map(
                lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()), s2.params, s1.params))),
            "q_spec": str(q.sharding.spec),
            "q_shard_shape": list(q.addressable_shards[0].data.shape),
            "q_shape": list(q.shape),
            "mu_q_spec": str(mu_q.sharding.spec),
            "mu_q_shard_shape": list(mu_q.addressable_shards[0].data.shape),
            "embed_spec": str(s2.params["embed"].sharding.spec),
            "mu_embed_spec": str(mu2["embed"].sharding.spec),
            "cache_size": len(step.programs),
        }
    # dropout: the same masks on one device and sharded (partitionable threefry), same accumulation
    sharded_state = training.create_train_state(jax.device_put(params, psh), tx, shardings=ssh)
    single = training.make_sft_step(module, tx, lr_schedule=sched, grad_accum=2, dropout=0.1)
    s1, m1 = single(training.create_train_state(params, tx), sft_batch)
    step = training.make_sft_step(module, tx, lr_schedule=sched, grad_accum=2, dropout=0.1, layout=layout,
                                  state_shardings=ssh)
    s2, m2 = step(sharded_state, training.put_batch(sft_batch, layout))
    report["sft_dropout"] = {
        "loss_single": float(m1["loss"]), "loss_sharded": float(m2["loss"]),
        "max_abs_param_diff": max(jax.tree.leaves(jax.tree.map(
            lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()), s2.params, s1.params))),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
