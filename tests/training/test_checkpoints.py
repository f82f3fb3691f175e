"""Checkpoints: bitwise resume after a hard kill and after SIGTERM (child processes), params-only
restore, data-iterator position, mismatch errors, and the loop's logs."""

from __future__ import annotations

import json
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
import training_helpers as th  # noqa: E402

from dpost import training  # noqa: E402
from dpost.data import pipeline  # noqa: E402



def load_npz(path):
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def test_resume_after_kill_and_sigterm_is_bitwise_identical():
    job = th.job_result("resume")  # child processes, started in the background by conftest.py
    tmp = job["tmp"]
    runs = {r["name"]: r for r in job["runs"]}

    def info(name, rc=0):
        r = runs[name]
        assert r["rc"] == rc, (name, r["stdout"][-3000:], r["stderr"])
        return json.loads(r["stdout"].strip().splitlines()[-1]) if rc == 0 else None

    # A: uninterrupted
    assert info("a") == {"resumed_from": None, "final_step": 6, "steps": 6}
    # B: hard kill (os._exit) after step 3; the last checkpoint is step 2; restart resumes there.
    info("b_killed", rc=17)
    assert info("b_resumed") == {"resumed_from": 2, "final_step": 6, "steps": 4}
    # C: SIGTERM after step 3 -> checkpoint at step 3 and exit 143; restart resumes from 3.
    info("c_sigterm", rc=128 + 15)
    assert "preempted: saved step 3" in runs["c_sigterm"]["stdout"] + runs["c_sigterm"]["stderr"]
    assert info("c_resumed") == {"resumed_from": 3, "final_step": 6, "steps": 3}

    pa, pb, pc = (load_npz(os.path.join(tmp, f)) for f in ("a.npz", "b.npz", "c.npz"))
    assert pa.keys() == pb.keys() == pc.keys()
    for k in pa:
        np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)  # bitwise
        np.testing.assert_array_equal(pa[k], pc[k], err_msg=k)
    start = th.llama_init_params_for_resume()
    assert any(not np.array_equal(pa[k], start[k]) for k in pa)  # training moved the params

    # logs of run A: JSONL with the DPO metrics per step, and a TensorBoard event file
    work = os.path.join(tmp, "work")
    with open(os.path.join(work, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for key in training.DPO_METRICS + ("tokens_per_sec",):
        assert key in rows[-1], key
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(os.path.join(work, "tb", "dpo")))
    # saves at 2, 4, 6 (6 = the final one), keep=3; B kept step 2 only (killed before step 4)
    assert training.Checkpointer(os.path.join(tmp, "ckpt_a")).all_steps() == [2, 4, 6]
    assert training.Checkpointer(os.path.join(tmp, "ckpt_c")).all_steps() == [3, 4, 6]


def _tiny():
    from dpost.models.llama import model as lm
    from dpost.models.llama.model import LlamaConfig

    cfg = LlamaConfig(vocab_size=48, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2,
                      num_kv_heads=2, head_dim=8)
    boxed = jax.eval_shape(lambda: lm.init_params(cfg, jax.random.key(0)))
    return cfg, boxed, nn.unbox(lm.init_params(cfg, jax.random.key(0)))


def test_params_only_restore_and_data_state(tmp_path):
    cfg, boxed, params = _tiny()
    tx = training.make_optimizer(training.OptimizerConfig(learning_rate=1e-3, total_steps=10, weight_decay=0.1))
    state = training.create_train_state(params, tx, rng=3).replace(step=jnp.asarray(5, jnp.int32))
    data_state = {"grain": b"\x00\x01binary", "epoch": 2}
    with training.Checkpointer(str(tmp_path), keep=1) as ckpt:
        assert ckpt.save(state, data_state=data_state, meta={"stage": "sft_0"}, force=True)
    abstract = nn.unbox(boxed)
    restored = training.restore_params(str(tmp_path), abstract)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), restored, params)
    with training.Checkpointer(str(tmp_path)) as ckpt:
        full, ds, meta = ckpt.restore(training.abstract_state(tx, abstract))
    assert int(full.step) == 5 and ds == data_state and meta["stage"] == "sft_0"
    np.testing.assert_array_equal(np.asarray(full.rng), np.asarray(state.rng))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), full.opt_state,
                 state.opt_state)


def test_mismatched_checkpoint_names_key_and_shapes(tmp_path):
    cfg, boxed, params = _tiny()
    tx = training.make_optimizer(training.OptimizerConfig(learning_rate=1e-3, total_steps=10))
    with training.Checkpointer(str(tmp_path)) as ckpt:
        ckpt.save(training.create_train_state(params, tx), force=True)
    from dpost.models.llama import model as lm

    bigger = cfg.replace(hidden_size=24)
    abstract = nn.unbox(jax.eval_shape(lambda: lm.init_params(bigger, jax.random.key(0))))
    with pytest.raises(training.CheckpointMismatchError, match=r"'embed' has shape \(48, 16\).*expects \(48, 24\)"):
        training.restore_params(str(tmp_path), abstract)
    with pytest.raises(training.CheckpointMismatchError, match=r"layers/attn/q"):
        with training.Checkpointer(str(tmp_path)) as ckpt:
            ckpt.restore(training.abstract_state(tx, abstract))
    untied = nn.unbox(jax.eval_shape(lambda: lm.init_params(cfg.replace(tie_word_embeddings=True),
                                                            jax.random.key(0))))
    with pytest.raises(training.CheckpointMismatchError, match=r"unexpected keys \['lm_head'\]"):
        training.restore_params(str(tmp_path), untied)


def test_grain_iterator_position_round_trips(tmp_path):
    import grain

    ds = grain.MapDataset.range(20).shuffle(seed=1).repeat(None).batch(3)
    it = iter(ds.to_iter_dataset())
    for _ in range(4):
        next(it)
    cfg, boxed, params = _tiny()
    tx = training.make_optimizer(training.OptimizerConfig(learning_rate=1e-3, total_steps=10))
    with training.Checkpointer(str(tmp_path)) as ckpt:
        ckpt.save(training.create_train_state(params, tx), data_state=it.get_state(), force=True)
    expected = [np.asarray(next(it)).tolist() for _ in range(3)]
    with training.Checkpointer(str(tmp_path)) as ckpt:
        _, ds_state, _ = ckpt.restore(training.abstract_state(tx, nn.unbox(boxed)))
    it2 = iter(ds.to_iter_dataset())
    it2.set_state(ds_state)
    assert [np.asarray(next(it2)).tolist() for _ in range(3)] == expected


def test_loop_evaluates_and_logs(tmp_path):
    from dpost.models.llama import model as lm

    cfg, boxed, params = _tiny()
    module = lm.make_module(cfg)
    ocfg = training.OptimizerConfig(learning_rate=1e-2, total_steps=4, warmup_ratio=0.25)
    tx = training.make_optimizer(ocfg)
    step = training.make_sft_step(module, tx, lr_schedule=training.make_schedule(ocfg))
    eval_step = training.make_sft_eval_step(module)
    held_out = [th.sft_batch(50, batch=4, vocab=48)]
    data = pipeline.make_array_loader(th.sft_batch(51, batch=8, vocab=48), batch_size=4)
    lines = []
    result = training.run(
        step, training.create_train_state(params, tx), data,
        training.LoopConfig(num_steps=4, eval_every=2, log_every=2, progress=True, name="sft"),
        workdir=str(tmp_path), eval_fn=lambda s: training.evaluate_sft(eval_step, s.params, held_out),
    )
    assert [e["step"] for e in result.eval_history] == [2, 4]
    assert result.eval_history[-1]["loss"] < result.eval_history[0]["loss"] + 1.0
    assert len(result.history) == 4 and result.tokens > 0
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/loss" in r for r in rows) and any("loss" in r and "tokens_per_sec" in r for r in rows)
    del lines
