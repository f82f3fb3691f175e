"""8 simulated CPU devices (child process; mesh data=2, fsdp=2, tensor=2): a sharded SFT and DPO
step (and an SFT step with dropout) equals the single-device step, and params/optimizer state are
really sharded."""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import training_helpers as th  # noqa: E402



def test_sharded_steps_equal_single_device():
    proc = th.job_result("sharded")  # started in the background by conftest.py
    assert proc["rc"] == 0, proc["stdout"][-3000:] + proc["stderr"][-5000:]
    report = json.loads(proc["stdout"].strip().splitlines()[-1])
    for kind in ("sft", "dpo"):
        r = report[kind]
        single, sharded = r["metrics_single"], r["metrics_sharded"]
        for k, v in single.items():
            assert abs(sharded[k] - v) <= 1e-5 * max(1.0, abs(v)), (kind, k, v, sharded[k])
        assert r["max_rel_grad_diff"] < 1e-5, (kind, r["max_rel_grad_diff"])  # AdamW mu = (1 - b1) grad
        assert r["max_abs_param_diff"] < 1e-4, (kind, r["max_abs_param_diff"])
        # q [layers, embed, heads, head_dim]: embed over fsdp, heads over tensor; moments alike
        assert r["q_spec"] == r["mu_q_spec"] == "PartitionSpec(None, 'fsdp', 'tensor', None)" or \
            r["q_spec"] == r["mu_q_spec"] == "P(None, 'fsdp', 'tensor', None)"
        assert r["q_shard_shape"] == [2, 16, 2, 8] and r["q_shape"] == [2, 32, 4, 8]
        assert r["mu_q_shard_shape"] == r["q_shard_shape"]
        assert r["embed_spec"] == r["mu_embed_spec"]
        assert r["cache_size"] == 1
    # dropout masks do not depend on the sharding, and they do change the loss
    r = report["sft_dropout"]
    assert abs(r["loss_sharded"] - r["loss_single"]) <= 1e-5 * abs(r["loss_single"]), r
    assert r["max_abs_param_diff"] < 1e-4, r
    assert r["loss_single"] != report["sft"]["metrics_single"]["loss"]
