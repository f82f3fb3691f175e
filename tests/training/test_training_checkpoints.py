"""Checkpoints: bitwise resume after a hard kill and after SIGTERM (child processes), params-only
restore, data-iterator position, mismatch errors, and the loop's logs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
import training_helpers as th  # noqa: E402

from dpost import training  # noqa: E402
from dpost.training import loop  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))


def child_env(tmp_path, **extra):
    env = dict(os.environ)
    env.pop(loop.KILL_ENV, None)
    env.pop(loop.SIGTERM_ENV, None)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("XLA_FLAGS", th.FAST_COMPILE_FLAGS)
    # Child runs compile the same program: share a compilation cache between them.
    env["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path / "jax_cache")
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_child(tmp_path, ckpt, out, expect_rc=0, workdir=None, **hooks):
    args = [sys.executable, os.path.join(HERE, "resume_run.py"), str(ckpt), str(out)]
    if workdir:
        args.append(str(workdir))
    proc = subprocess.run(args, env=child_env(tmp_path, **hooks), capture_output=True, text=True, timeout=600)
    assert proc.returncode == expect_rc, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def load_npz(path):
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def test_resume_after_kill_and_sigterm_is_bitwise_identical(tmp_path):
    # A: uninterrupted
    work = tmp_path / "work"
    a = run_child(tmp_path, tmp_path / "ckpt_a", tmp_path / "a.npz", workdir=work)
    info_a = json.loads(a.stdout.strip().splitlines()[-1])
    assert info_a == {"resumed_from": None, "final_step": 6, "steps": 6}
    # B: hard kill (os._exit) after step 3; the last checkpoint is step 2; restart resumes there.
    run_child(tmp_path, tmp_path / "ckpt_b", tmp_path / "unused.npz", expect_rc=17, **{loop.KILL_ENV: 3})
    assert training.Checkpointer(str(tmp_path / "ckpt_b")).all_steps() == [2]
    b = run_child(tmp_path, tmp_path / "ckpt_b", tmp_path / "b.npz")
    assert json.loads(b.stdout.strip().splitlines()[-1]) == {"resumed_from": 2, "final_step": 6, "steps": 4}
    # C: SIGTERM after step 3 -> checkpoint at step 3, exit 143; restart resumes from 3.
    run_child(tmp_path, tmp_path / "ckpt_c", tmp_path / "unused.npz", expect_rc=128 + 15, **{loop.SIGTERM_ENV: 3})
    assert 3 in training.Checkpointer(str(tmp_path / "ckpt_c")).all_steps()
    c = run_child(tmp_path, tmp_path / "ckpt_c", tmp_path / "c.npz")
    assert json.loads(c.stdout.strip().splitlines()[-1]) == {"resumed_from": 3, "final_step": 6, "steps": 3}

    pa, pb, pc = load_npz(tmp_path / "a.npz"), load_npz(tmp_path / "b.npz"), load_npz(tmp_path / "c.npz")
    assert pa.keys() == pb.keys() == pc.keys()
    for k in pa:
        np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)  # bitwise
        np.testing.assert_array_equal(pa[k], pc[k], err_msg=k)
    # the run is not trivially constant: params moved
    start = th.llama_init_params_for_resume()
    assert any(not np.array_equal(pa[k], start[k]) for k in pa)

    # logs of run A: JSONL with the DPO metrics per step, and a TensorBoard event file
    rows = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for key in training.DPO_METRICS + ("tokens_per_sec",):
        assert key in rows[-1], key
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(work / "tb" / "dpo"))

    # keep=3 kept the last three of the saves at 2, 4, 6 (the final save is step 6)
    assert training.Checkpointer(str(tmp_path / "ckpt_a")).all_steps() == [2, 4, 6]


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
    grain = pytest.importorskip("grain")
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
    data = training.ArrayIterator(th.sft_batch(51, batch=8, vocab=48), batch_size=4)
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
