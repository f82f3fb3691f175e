"""Fused attention (`jax.nn.dot_product_attention`) equals the spelled-out einsum path, which
test_training_steps / test_llama / test_t5 check against transformers: SFT and DPO step losses
and gradients (the DPO step's shared-prompt mask for Llama, T5's relative-position bias), scoring
and prefill, in fp32."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

import training_helpers as th
from dpost import training
from dpost.models import layers

FAMILIES = ("llama", "t5")
LOSS_RTOL, GRAD_RTOL, GRAD_ATOL = 2e-6, 1e-5, 1e-7


@functools.lru_cache(maxsize=None)
def imported(family: str):
    """(module per attention implementation, params) for a tiny transformers model with random norms
    (and, for T5, random relative-position tables)."""
    hf = th.hf_llama(0) if family == "llama" else th.hf_t5(0)
    _, cfg, params, _ = th.import_hf(family, hf)
    m, _ = th.family_modules(family)
    return {name: m.make_module(cfg.replace(attention=name)) for name in layers.ATTENTIONS}, params


def sgd():
    cfg = training.OptimizerConfig(learning_rate=1.0, total_steps=10, kind="sgd", schedule="constant",
                                   max_grad_norm=None)
    return training.make_optimizer(cfg), training.make_schedule(cfg)


def step_outcomes(family: str, kind: str, batch, ref_params=None):
    """{attention: (metrics, params after one SGD step with lr 1, i.e. params - gradient)}."""
    modules, params = imported(family)
    tx, sched = sgd()
    out = {}
    for name, module in modules.items():
        if kind == "sft":
            step, args = training.make_sft_step(module, tx, lr_schedule=sched), ()
        else:
            step, args = training.make_dpo_step(module, tx, training.DPOConfig(), lr_schedule=sched), (ref_params,)
        state, metrics = step(training.create_train_state(params, tx), batch, *args)
        out[name] = ({k: float(v) for k, v in metrics.items()}, state.params)
    return out


def metric_atol(key: str, metrics: dict) -> float:
    """DPO rewards are beta x differences of summed log-probs: their fp32 rounding scales with those
    sums (~50 here), not with the small reward itself (CPUs with other vector widths round differently)."""
    if key.startswith("rewards/") and key != "rewards/accuracies":
        return LOSS_RTOL * training.DPOConfig().beta * max(abs(metrics["logps/chosen"]), abs(metrics["logps/rejected"]))
    return 1e-7


def assert_same_step(out):
    (m_fused, p_fused), (m_einsum, p_einsum) = out["fused"], out["einsum"]
    assert m_fused.keys() == m_einsum.keys()
    for key in m_einsum:
        np.testing.assert_allclose(m_fused[key], m_einsum[key], rtol=LOSS_RTOL, atol=metric_atol(key, m_einsum),
                                   err_msg=key)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=GRAD_RTOL, atol=GRAD_ATOL),
                 p_fused, p_einsum)


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts traced `jax.nn.dot_product_attention` calls, so a test knows the fused path ran."""
    calls = []
    real = jax.nn.dot_product_attention

    def counted(*args, **kwargs):
        calls.append(kwargs.get("bias") is not None)
        return real(*args, **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", counted)
    return calls


@pytest.mark.parametrize("family", FAMILIES)
def test_sft_step_fused_equals_einsum(family, fused_calls):
    out = step_outcomes(family, "sft", th.sft_batch(3, batch=4, prompt_len=9, completion_len=11, vocab=60))
    assert fused_calls and (family == "llama" or any(fused_calls))  # T5 passes its position bias
    assert_same_step(out)


@pytest.mark.parametrize("family", FAMILIES)
def test_dpo_step_fused_equals_einsum(family, fused_calls):
    """Llama runs each pair as [prompt | chosen | rejected] with the shared-prompt mask; T5 runs
    chosen and rejected as rows sharing the prompt."""
    _, params = imported(family)
    ref_params = jax.tree.map(lambda x: x + 0.01, params)
    out = step_outcomes(family, "dpo", th.pair_batch(5, batch=4, prompt_len=9, chosen_len=12, rejected_len=7,
                                                     vocab=60), ref_params)
    assert fused_calls
    assert out["einsum"][0]["loss"] != pytest.approx(np.log(2), abs=1e-6)  # policy and reference differ
    assert_same_step(out)


@pytest.mark.parametrize("family", FAMILIES)
def test_scoring_and_prefill_fused_equals_einsum(family, fused_calls):
    modules, params = imported(family)
    b = th.sft_batch(4, batch=3, prompt_len=10, completion_len=6, vocab=60)
    scored = {name: m.apply({"params": params}, b["prompt"], b["prompt_mask"], b["completion"], b["completion_mask"],
                            method="completion_logits") for name, m in modules.items()}
    np.testing.assert_allclose(scored["fused"], scored["einsum"], rtol=1e-5, atol=1e-5)
    prefilled = {name: m.apply({"params": params}, b["prompt"], b["prompt_mask"], 5, 2, method="prefill")
                 for name, m in modules.items()}
    jax.tree.map(lambda a, c: np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-5, atol=1e-5),
                 prefilled["fused"], prefilled["einsum"])
    assert fused_calls


def test_attention_setting_checked():
    with pytest.raises(ValueError, match="attention='flash'"):
        imported("llama")[0]["fused"].config.replace(attention="flash")


@pytest.mark.parametrize("refuses", (False, True))
def test_fused_attention_routes_half_precision_to_cudnn_on_gpu(monkeypatch, caplog, refuses):
    """On a GPU backend a bf16 attention asks JAX for cuDNN (whose `implementation=None` means XLA)
    with what cuDNN's layout checks require: the mask's query axis spelled out and the bias in the
    compute dtype; a shape cuDNN refuses falls back to XLA with one warning. cuDNN itself needs a
    GPU: here a stand-in checks the arguments and computes XLA's answer from them, which must stay
    within bf16 rounding of the fp32 answer."""
    real = jax.nn.dot_product_attention
    asked = []

    def stand_in(q, k, v, *, bias=None, mask=None, scale=None, implementation=None):
        asked.append(implementation)
        if implementation == "cudnn":
            assert mask.shape[2] == q.shape[1] and bias.dtype == q.dtype and k.dtype == q.dtype
            if refuses:
                raise NotImplementedError("unsupported shape")
        return real(q, k, v, bias=bias, mask=mask, scale=scale, implementation="xla")

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(jax.nn, "dot_product_attention", stand_in)
    rng = np.random.default_rng(0)
    b, t, s, n, kv, dh = 2, 6, 8, 4, 2, 16
    q, k, v = (rng.standard_normal(shape).astype(np.float32) for shape in ((b, t, n, dh), (b, s, kv, dh), (b, s, kv, dh)))
    mask = np.ones((b, 1, 1, s), bool)
    mask[0, ..., :3] = False  # left padding of row 0: a padding mask without a query axis
    bias = rng.standard_normal((1, n, t, s)).astype(np.float32)
    want = real(q, k, v, bias=bias, mask=mask)  # fp32, XLA
    got = layers.fused_attention(jax.numpy.asarray(q, jax.numpy.bfloat16), k, v, mask=mask, bias=bias)
    assert asked == (["cudnn", "xla"] if refuses else ["cudnn"])
    assert got.dtype == jax.numpy.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=0.06, rtol=0.03)
    assert ("cuDNN refused" in caplog.text) == refuses
    asked.clear()
    layers.fused_attention(q, k, v, mask=mask, bias=bias)  # fp32 stays on XLA
    layers.fused_attention(jax.numpy.asarray(q[:, :1], jax.numpy.bfloat16), k, v, mask=mask, bias=bias[:, :, :1])
    assert asked == ["xla", "xla"]  # ... and so does a single-query (decode) step
