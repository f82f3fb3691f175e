"""Tail averaging (`<stage>.optimizer.average_last`): the trained params are the plain mean of the
params after each of the last ceil(f x steps) updates, computed here by hand from the iterates of
optax's own AdamW/SGD run without it; the updates themselves do not change; the average survives a
checkpoint round trip; the stages, the config check and the memory planner see the field."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dpost import config_check, defaults, training
from tests.memory.test_plan import tiny_plan


def _params():
    rng = np.random.default_rng(0)
    return {"w": jnp.asarray(rng.standard_normal((8, 4)), jnp.float32),
            "norm": jnp.asarray(1 + 0.1 * rng.standard_normal(4), jnp.float32)}


def _grads(n):
    rng = np.random.default_rng(1)
    return [{"w": jnp.asarray(rng.standard_normal((8, 4)), jnp.float32),
             "norm": jnp.asarray(rng.standard_normal(4), jnp.float32)} for _ in range(n)]


def _iterates(tx, params, grads):
    state, p, out = tx.init(params), params, []
    for g in grads:
        updates, state = tx.update(g, state, p)
        p = optax.apply_updates(p, updates)
        out.append(p)
    return out, state


@pytest.mark.parametrize("total, fraction", [(10, 0.3), (7, 0.5), (6, 1.0), (5, 0.01)])
def test_average_is_the_mean_of_the_last_iterates_of_plain_adamw(total, fraction):
    params, grads = _params(), _grads(total)
    cfg = training.OptimizerConfig(learning_rate=1e-2, total_steps=total, weight_decay=0.1, warmup_ratio=0.2,
                                   min_lr_rate=0.1, average_last=fraction)
    averaged, state = _iterates(training.make_optimizer(cfg), params, grads)
    # the reference: the same schedule, clipping and AdamW straight from optax, averaged by hand
    schedule = training.make_schedule(cfg)
    plain = optax.chain(optax.clip_by_global_norm(1.0),
                        optax.adamw(schedule, weight_decay=0.1,
                                    mask=lambda p: {"w": True, "norm": False}))
    reference, _ = _iterates(plain, params, grads)
    k = max(1, math.ceil(total * fraction))
    for name in params:
        for a, b in zip(averaged, reference):  # averaging leaves the trajectory alone
            np.testing.assert_array_equal(np.asarray(a[name]), np.asarray(b[name]))
        want = np.mean([np.asarray(p[name], np.float64) for p in reference[-k:]], axis=0)
        got = training.final_params(averaged[-1], state)[name]
        np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-6, atol=1e-6)


def test_sgd_tail_average_by_hand():
    """SGD at lr 0.5 on gradients 1, 2, 3, 4 from 0: iterates -0.5, -1.5, -3, -5; the last two
    average to -4."""
    cfg = training.OptimizerConfig(learning_rate=0.5, total_steps=4, kind="sgd", schedule="constant",
                                   max_grad_norm=None, average_last=0.5)
    grads = [{"x": jnp.asarray([float(g)])} for g in (1, 2, 3, 4)]
    iterates, state = _iterates(training.make_optimizer(cfg), {"x": jnp.zeros(1)}, grads)
    assert [float(p["x"][0]) for p in iterates] == [-0.5, -1.5, -3.0, -5.0]
    assert float(training.final_params(iterates[-1], state)["x"][0]) == -4.0


def test_without_averaging_the_trained_params_are_the_last_iterate():
    cfg = training.OptimizerConfig(learning_rate=1e-2, total_steps=3)
    iterates, state = _iterates(training.make_optimizer(cfg), _params(), _grads(3))
    assert training.final_params(iterates[-1], state) is iterates[-1]


def test_average_survives_a_checkpoint_round_trip(tmp_path):
    cfg = training.OptimizerConfig(learning_rate=1e-2, total_steps=6, average_last=0.5)
    tx = training.make_optimizer(cfg)
    state = training.create_train_state(_params(), tx, rng=0)
    grads = _grads(6)
    for g in grads[:4]:  # into the tail: the average holds two iterates
        updates, opt_state = tx.update(g, state.opt_state, state.params)
        state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                              opt_state=opt_state)
    ckpt = training.Checkpointer(str(tmp_path / "ckpt"), async_save=False)
    ckpt.save(state, force=True)
    ckpt.wait()
    restored, _, _ = ckpt.restore(training.abstract_state(tx, state.params), 4)
    ckpt.close()
    for a, b in zip(jax.tree.leaves(state.opt_state), jax.tree.leaves(restored.opt_state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    def finish(s):
        for g in grads[4:]:
            updates, opt_state = tx.update(g, s.opt_state, s.params)
            s = s.replace(params=optax.apply_updates(s.params, updates), opt_state=opt_state)
        return training.final_params(s.params, s.opt_state)

    for a, b in zip(jax.tree.leaves(finish(state)), jax.tree.leaves(finish(restored))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_stages_pass_average_last_to_the_optimizer():
    from dpost import stages

    config = defaults.base_config()
    config.sft.optimizer.average_last = 0.25
    assert stages.optimizer_config(config.sft.optimizer, 8).average_last == 0.25
    assert stages.optimizer_config(config.dpo.optimizer, 8).average_last == 0.0
    tx = training.make_optimizer(stages.optimizer_config(config.sft.optimizer, 8))
    state = training.create_train_state({"w": jnp.ones((2, 2))}, tx)
    assert isinstance(state.opt_state[-1], training.optimizer.TailAverageState)


@pytest.mark.parametrize("value", [-0.1, 1.5])
def test_config_check_names_a_bad_average_last(value):
    config = defaults.base_config()
    config.model.source, config.model.family = "scratch", "llama"
    config.dpo.optimizer.average_last = value
    with pytest.raises(ValueError) as err:
        config_check.check(config)
    assert "\n" not in str(err.value) and "config field 'dpo.optimizer.average_last'" in str(err.value)


def test_memory_plan_counts_the_averaged_copy_as_optimizer_state():
    plain = tiny_plan().stage("sft").terms
    averaged = tiny_plan(**{"sft.optimizer.average_last": 0.25}).stage("sft").terms
    assert averaged["optimizer"] == plain["optimizer"] + plain["params"]
    assert tiny_plan(**{"sft.optimizer.average_last": 0.25}).stage("dpo (ref precomputed)").terms["optimizer"] == \
        tiny_plan().stage("dpo (ref precomputed)").terms["optimizer"]
    # and a created state's optimizer holds that much more: its params once more
    params = _params()
    nbytes = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))  # noqa: E731
    grow = [nbytes(training.make_optimizer(training.OptimizerConfig(learning_rate=1.0, total_steps=4,
                                                                    average_last=f)).init(params))
            for f in (0.0, 0.5)]
    assert grow[1] - grow[0] == nbytes(params) + 4  # + the int32 update count
