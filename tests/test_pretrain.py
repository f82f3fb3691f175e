"""The pre-trained M0 of synthetic tasks (dpost.pretrain): built once, reused by a second run,
rebuilt when what it depends on changes, and disjoint from the task's questions."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from dpost import pretrain
from dpost.data import synthetic, task
from tests.memory.test_plan import load_config


def tiny(cache, **overrides):
    values = {"pretrain.corpus.n": 120, "pretrain.max_steps": 6, "pretrain.batch_size": 8,
              "pretrain.cache_dir": str(cache), "progress": False}
    values.update(overrides)
    return load_config("arith_tiny", **values)


def test_built_once_reused_then_rebuilt_on_change(tmp_path):
    first, info = pretrain.pretrained_m0(tiny(tmp_path))
    assert not info["reused"] and info["steps"] == 6 and info["flops"] > 0 and info["seconds"] > 0
    again, info2 = pretrain.pretrained_m0(tiny(tmp_path))
    assert info2["reused"] and info2["cache"] == info["cache"] and info2["seconds"] == info["seconds"]
    for a, b in zip(jax.tree.leaves(first.params), jax.tree.leaves(again.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert again.tokenizer.get_vocab() == first.tokenizer.get_vocab()
    # The run's seed and the cache location do not enter M0: every method and seed shares it.
    _, same = pretrain.pretrained_m0(tiny(tmp_path, seed=7))
    assert same["reused"] and same["cache"] == info["cache"]
    # A changed training field, corpus or model field builds another M0 beside it.
    caches = {info["cache"]}
    for change in ({"pretrain.seed": 1}, {"pretrain.corpus.n": 100}):
        _, other = pretrain.pretrained_m0(tiny(tmp_path, **change))
        assert not other["reused"] and other["cache"] not in caches, change
        caches.add(other["cache"])


def test_corpus_is_disjoint_from_the_task():
    config = tiny("unused", **{"pretrain.corpus.n": 2000})
    corpus = pretrain.corpus(config)
    splits = synthetic.splits_from_fields(task.SYNTHETIC_DATA_SEED, dict(config.data.synthetic))
    task_questions = {ex.question for rows in splits.values() for ex in rows}
    assert len({ex.question for ex in corpus}) == 2000
    assert not task_questions & {ex.question for ex in corpus}
    assert all(ex.question.split()[0] in synthetic.CORPUS_NAMES for ex in corpus)


def test_content_hash_follows_the_corpus_text():
    config = tiny("unused")
    corpus = pretrain.corpus(config)
    changed = corpus[:-1] + [corpus[-1].__class__(corpus[-1].question + " ", corpus[-1].answer, corpus[-1].gold, "x")]
    key = pretrain.content_hash(config, corpus)
    assert key == pretrain.content_hash(config, list(corpus))
    assert key != pretrain.content_hash(config, changed)
    for field, value in (("model.scratch.intermediate_size", 128), ("pretrain.optimizer.learning_rate", 1e-3),
                         ("pretrain.epochs", 9), ("model.dtype", "bfloat16"), ("model.attention", "fused")):
        assert pretrain.content_hash(tiny("unused", **{field: value}), corpus) != key, field
    for field, value in (("seed", 5), ("pretrain.cache_dir", "/elsewhere"), ("sft.epochs", 1), ("method", "st")):
        assert pretrain.content_hash(tiny("unused", **{field: value}), corpus) == key, field
    # execution options: M0 is pre-trained with their defaults whatever the run's (next test)
    defaults = pretrain.content_hash(tiny("unused", **{"model.remat": False, "model.scan_layers": True}), corpus)
    assert pretrain.content_hash(tiny("unused", **{"model.remat": "full", "model.scan_layers": False}), corpus) == defaults


def test_m0_is_pre_trained_with_default_execution_options(tmp_path):
    """Remat and unscanned layers round differently from the defaults (tests/training/test_train_options.py
    allows for it), so M0 would change with them; it is built with the defaults instead, the same bits,
    and the run's options apply to the bundle base_model.load returns."""
    from dpost import base_model
    from dpost.sharding import Layout

    plain, _ = pretrain.pretrained_m0(tiny(tmp_path / "a", **{"model.remat": False, "model.scan_layers": True}))
    options = tiny(tmp_path / "b", **{"model.remat": "full", "model.scan_layers": False})
    other, info = pretrain.pretrained_m0(options)
    assert not info["reused"] and other.config.remat == "none" and other.config.scan_layers
    for a, b in zip(jax.tree.leaves(plain.params), jax.tree.leaves(other.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    run_m0, _ = base_model.load(options, task.load_task(options, str(tmp_path / "run")), Layout())
    assert run_m0.config.remat == "full" and not run_m0.config.scan_layers


def test_unknown_corpus_field_is_an_error():
    with pytest.raises(ValueError, match="pretrain.corpus.*comute"):
        pretrain.corpus(tiny("unused", **{"pretrain.corpus.comute": 0.1}))
