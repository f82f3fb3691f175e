"""dpo_loss / sft_loss against independent numpy derivations of TRL's formulas; the LR schedule
against transformers' own `cosine_with_min_lr` lambda; the weight-decay mask against Trainer's."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpost import training
from dpost.training import losses
from tests.conftest import reference


def _logsig(x):
    return -np.logaddexp(0.0, -x)


def trl_reference(pc, pr, rc, rr, beta, loss_type, eps, lc=None, lr=None):
    """TRL DPOTrainer's per-pair losses (trl/trainer/dpo_trainer.py), re-derived in float64 numpy."""
    chosen_logratios, rejected_logratios = pc - rc, pr - rr
    delta = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":  # TRL 0.x with label smoothing (cDPO); TRL 1.x has eps = 0
        loss = -(1 - eps) * _logsig(beta * delta) - eps * _logsig(-beta * delta)
    elif loss_type == "robust":
        clean = -(1 - eps) * _logsig(beta * delta)
        flipped = -eps * _logsig(-beta * delta)
        loss = (clean - flipped) / (1 - 2 * eps)
    elif loss_type == "hinge":
        loss = np.maximum(0.0, 1 - beta * delta)
    elif loss_type == "ipo":
        if lc is not None:
            delta = chosen_logratios / np.maximum(lc, 1) - rejected_logratios / np.maximum(lr, 1)
        loss = (delta - 1 / (2 * beta)) ** 2
    return loss, beta * chosen_logratios, beta * rejected_logratios


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "robust"])
@pytest.mark.parametrize("beta,eps", [(0.1, 0.0), (0.5, 0.2)])
def test_dpo_loss_matches_trl_formulas(loss_type, beta, eps):
    rng = np.random.default_rng(0)
    pc, pr, rc, rr = (rng.normal(-40, 15, 64) for _ in range(4))
    lc, lr = rng.integers(1, 60, 64), rng.integers(1, 60, 64)
    kwargs = dict(beta=beta, loss_type=loss_type, label_smoothing=eps)
    got = training.dpo_loss(*map(jnp.asarray, (pc, pr, rc, rr)), **kwargs)
    want = trl_reference(pc, pr, rc, rr, beta, loss_type, eps)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), w, rtol=2e-5, atol=1e-5)
    if loss_type == "ipo":  # TRL 1.x normalises IPO log-ratios by completion length
        got = training.dpo_loss(pc, pr, rc, rr, chosen_lengths=lc, rejected_lengths=lr, **kwargs)
        want = trl_reference(pc, pr, rc, rr, beta, loss_type, eps, lc, lr)
        np.testing.assert_allclose(np.asarray(got[0]), want[0], rtol=2e-5, atol=1e-5)


def test_dpo_loss_matches_trl_torch_sigmoid():
    """The paper's loss, written with torch exactly as TRL does (F.logsigmoid)."""
    torch = reference("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(1)
    pc, pr, rc, rr = (rng.normal(-40, 15, 32) for _ in range(4))
    t = [torch.tensor(x) for x in (pc, pr, rc, rr)]
    want = -F.logsigmoid(0.1 * ((t[0] - t[2]) - (t[1] - t[3])))
    got, _, _ = training.dpo_loss(pc, pr, rc, rr)
    np.testing.assert_allclose(np.asarray(got), want.numpy(), rtol=1e-5, atol=1e-6)


def test_dpo_loss_gradient_and_rewards_have_no_grad():
    pc, pr, rc, rr = jnp.array([-3.0]), jnp.array([-5.0]), jnp.array([-4.0]), jnp.array([-4.0])
    g = jax.grad(lambda a, b: training.dpo_loss(a, b, rc, rr)[0].sum(), argnums=(0, 1))(pc, pr)
    h = 0.1 * 2.0
    expected = -0.1 * (1 - 1 / (1 + math.exp(-h)))
    np.testing.assert_allclose(float(g[0][0]), expected, rtol=1e-5)
    np.testing.assert_allclose(float(g[1][0]), -expected, rtol=1e-5)
    g_rewards = jax.grad(lambda a: training.dpo_loss(a, pr, rc, rr)[1].sum())(pc)
    assert float(g_rewards[0]) == 0.0


def test_dpo_loss_rejects_unknown_type():
    with pytest.raises(ValueError, match="loss_type"):
        training.dpo_loss(jnp.zeros(1), jnp.zeros(1), jnp.zeros(1), jnp.zeros(1), loss_type="nope")


def test_sft_loss_is_a_token_mean_not_a_mean_of_row_means():
    logps = jnp.array([[-1.0, -1.0, -1.0, 0.0], [-4.0, 0.0, 0.0, 0.0]])
    mask = jnp.array([[1, 1, 1, 0], [1, 0, 0, 0]])
    assert float(training.sft_loss(logps, mask)) == pytest.approx(7.0 / 4.0)
    total, count = losses.masked_nll(logps, mask)
    assert (float(total), float(count)) == (7.0, 4.0)


@pytest.mark.parametrize("total,warmup_ratio,min_lr_rate", [(100, 0.1, 0.1), (37, 0.1, 0.0), (10, 0.0, 0.5)])
def test_schedule_matches_transformers(total, warmup_ratio, min_lr_rate):
    reference("torch")
    from transformers.optimization import _get_cosine_schedule_with_warmup_lr_lambda

    cfg = training.OptimizerConfig(learning_rate=3e-4, total_steps=total, warmup_ratio=warmup_ratio,
                                   min_lr_rate=min_lr_rate)
    warm = math.ceil(total * warmup_ratio)
    assert training.warmup_steps(cfg) == warm
    sched = training.make_schedule(cfg)
    for step in range(total + 1):
        want = 3e-4 * _get_cosine_schedule_with_warmup_lr_lambda(
            step, num_warmup_steps=warm, num_training_steps=total, num_cycles=0.5, min_lr_rate=min_lr_rate
        )
        assert float(sched(step)) == pytest.approx(want, rel=1e-5, abs=1e-12)


def test_weight_decay_mask_skips_norms_and_biases():
    params = {"embed": 0, "layers": {"attn_norm": {"scale": 0}, "attn": {"q": 0}}, "final_norm": {"scale": 0},
              "encoder": {"relpos_bias": 0}, "lm_head": 0}
    mask = training.decay_mask(params)
    assert mask == {"embed": True, "layers": {"attn_norm": {"scale": False}, "attn": {"q": True}},
                    "final_norm": {"scale": False}, "encoder": {"relpos_bias": False}, "lm_head": True}


def test_adamw_matches_torch_adamw():
    """One AdamW update with decay masked like transformers' Trainer, clipping and the schedule."""
    torch = reference("torch")
    rng = np.random.default_rng(0)
    w0, s0 = rng.normal(size=(5, 3)).astype(np.float32), rng.normal(size=(3,)).astype(np.float32)
    grads = [(rng.normal(size=(5, 3)).astype(np.float32), rng.normal(size=(3,)).astype(np.float32)) for _ in range(3)]
    cfg = training.OptimizerConfig(learning_rate=1e-2, total_steps=3, weight_decay=0.1, warmup_ratio=0.0,
                                   min_lr_rate=0.1, max_grad_norm=1.0)
    tx = training.make_optimizer(cfg)
    params = {"w": jnp.asarray(w0), "norm": {"scale": jnp.asarray(s0)}}
    state = tx.init(params)
    tw, ts = torch.nn.Parameter(torch.tensor(w0)), torch.nn.Parameter(torch.tensor(s0))
    opt = torch.optim.AdamW([{"params": [tw], "weight_decay": 0.1}, {"params": [ts], "weight_decay": 0.0}], lr=1e-2)
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    sched = get_cosine_with_min_lr_schedule_with_warmup(opt, 0, 3, min_lr_rate=0.1)
    for gw, gs in grads:
        import optax

        updates, state = tx.update({"w": jnp.asarray(gw), "norm": {"scale": jnp.asarray(gs)}}, state, params)
        params = optax.apply_updates(params, updates)
        tw.grad, ts.grad = torch.tensor(gw), torch.tensor(gs)
        torch.nn.utils.clip_grad_norm_([tw, ts], 1.0)
        opt.step()
        sched.step()
    np.testing.assert_allclose(np.asarray(params["w"]), tw.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(params["norm"]["scale"]), ts.detach().numpy(), rtol=1e-5, atol=1e-6)
