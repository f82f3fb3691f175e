"""Dropout in the SFT step (`model.dropout`): off = the step without it, bit for bit; on = a
different loss, drawn from the train state's rng and step only (so a resumed run repeats it)."""

from __future__ import annotations

import os
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import training_helpers as th  # noqa: E402

from dpost import training  # noqa: E402
from dpost.training.steps import with_dropout  # noqa: E402

RATE = 0.1


def _setup(family: str):
    module, cfg, params, boxed = th.import_hf(family, th.hf_llama(0) if family == "llama" else th.hf_t5(0))
    ocfg = training.OptimizerConfig(learning_rate=1e-2, total_steps=10)
    return module, cfg, params, boxed, training.make_optimizer(ocfg), training.make_schedule(ocfg)


def _state(params, tx, step: int = 0, rng: int = 3):
    state = training.create_train_state(params, tx, rng=rng)
    return state.replace(step=state.step + step)


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_sft_step_dropout(family):
    module, cfg, params, _, tx, sched = _setup(family)
    batch = th.sft_batch(0, batch=4, vocab=cfg.vocab_size)

    steps = {}

    def run(dropout, grad_accum=1, **state_kw):
        if (dropout, grad_accum) not in steps:
            steps[dropout, grad_accum] = training.make_sft_step(module, tx, lr_schedule=sched, grad_accum=grad_accum,
                                                                dropout=dropout)
        state, metrics = steps[dropout, grad_accum](_state(params, tx, **state_kw), batch)
        return float(metrics["loss"]), state

    plain, plain_state = run(0.0)
    # the eval step's mean token NLL (itself checked against transformers in test_steps)
    sums = training.make_sft_eval_step(module)(params, batch)
    np.testing.assert_allclose(plain, float(sums["nll_sum"] / sums["tokens"]), rtol=1e-6)
    dropped, state = run(RATE)
    assert dropped != plain
    again, state_again = run(RATE)
    assert again == dropped
    assert all(np.array_equal(a, b) for a, b in zip(_leaves(state.params), _leaves(state_again.params)))
    assert run(RATE, step=1)[0] != dropped  # the next step draws other masks
    assert run(RATE, rng=4)[0] != dropped  # another seed draws other masks
    # the masks of micro-batch a come from fold_in(fold_in(state.rng, step), a), nothing else
    expected = _loss_with_key(with_dropout(module, RATE), params, batch,
                              jax.random.fold_in(_state(params, tx, step=2).step_rng(), 0))
    np.testing.assert_allclose(run(RATE, step=2)[0], expected, rtol=1e-6)
    assert run(RATE, grad_accum=2)[0] != dropped  # each micro-batch draws its own masks


def _loss_with_key(train_module, params, batch, key):
    @jax.jit
    def loss(params, batch, key):
        logps, mask = training.sft_token_logprobs(train_module, params, batch, rngs={"dropout": key})
        return -(logps * mask).sum() / mask.sum()

    return float(loss(params, batch, key))


def test_dropout_zero_matches_transformers_eval_mode():
    """Rate 0 is the deterministic model: the SFT step's loss equals transformers' eval-mode loss."""
    module, cfg, params, _, tx, sched = _setup("llama")
    batch = th.sft_batch(1, batch=4, vocab=cfg.vocab_size)
    _, metrics = training.make_sft_step(module, tx, lr_schedule=sched, dropout=0.0)(_state(params, tx), batch)
    model = th.hf_llama(0)
    prompt, completion = torch.from_numpy(batch["prompt"]).long(), torch.from_numpy(batch["completion"]).long()
    mask = torch.cat([torch.from_numpy(batch["prompt_mask"]), torch.from_numpy(batch["completion_mask"])], 1).long()
    with torch.no_grad():
        logits = model(input_ids=torch.cat([prompt, completion], 1), attention_mask=mask,
                       position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits[:, prompt.shape[1] - 1 : -1]
    logp = torch.log_softmax(logits.double(), -1).gather(-1, completion[..., None])[..., 0]
    cmask = torch.from_numpy(batch["completion_mask"]).double()
    np.testing.assert_allclose(float(metrics["loss"]), float(-(logp * cmask).sum() / cmask.sum()), rtol=1e-5)


def test_resume_with_dropout_is_bitwise_identical(tmp_path):
    """The masks depend on the state only: 3 steps straight equal 1 step, a checkpoint round trip,
    then 2 more steps."""
    module, cfg, params, boxed, tx, sched = _setup("llama")
    step = training.make_sft_step(module, tx, lr_schedule=sched, dropout=RATE)
    batches = [th.sft_batch(i, batch=4, vocab=cfg.vocab_size) for i in range(3)]
    straight = _state(params, tx)
    for b in batches:
        straight, _ = step(straight, b)
    first, _ = step(_state(params, tx), batches[0])
    with training.Checkpointer(str(tmp_path)) as ckpt:
        ckpt.save(first, force=True)
    with training.Checkpointer(str(tmp_path)) as ckpt:
        resumed, _, _ = ckpt.restore(training.abstract_state(tx, nn.unbox(boxed)))
    for b in batches[1:]:
        resumed, _ = step(resumed, b)
    assert int(resumed.step) == int(straight.step) == 3
    assert all(np.array_equal(a, b) for a, b in zip(_leaves(resumed.params), _leaves(straight.params)))
