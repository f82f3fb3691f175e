"""Training-time dropout in the model families: where it applies (against transformers' PyTorch
models in train mode, which record every dropout they run) and what it does to Llama's attention
probabilities (zeroed at the rate, survivors scaled by 1 / (1 - rate))."""

from __future__ import annotations

import collections
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "training"))
import training_helpers as th  # noqa: E402

from dpost.models import layers  # noqa: E402
from dpost.models.llama import model as llama_model  # noqa: E402
from dpost.training.steps import with_dropout  # noqa: E402

RATE = 0.1
B, S, T = 2, 5, 3  # batch, prompt (encoder) length, completion (decoder) length: distinct shapes


def hf_dropout_calls(model, **inputs) -> list[tuple[tuple[int, ...], float]]:
    """(input shape, p) of every dropout transformers' model runs in train mode (modules and the
    attention's functional dropout both go through torch.nn.functional.dropout)."""
    calls = []
    original = torch.nn.functional.dropout

    def recording(x, p=0.5, training=True, inplace=False):
        if training and p > 0:
            calls.append((tuple(x.shape), p))
        return original(x, p, training, inplace)

    torch.nn.functional.dropout = recording
    try:
        model.train()
        with torch.no_grad():
            model(**{k: torch.from_numpy(np.asarray(v)).long() for k, v in inputs.items()})
    finally:
        torch.nn.functional.dropout = original
    return calls


def our_dropout_calls(module, params, num_layers: dict[str, int], *args, method: str):
    """(input shape, rate) of every flax Dropout the module runs, calls inside a scanned layer stack
    counted once per layer. The scan traces its body more than once, so a layer's calls are
    counted per trace: each Dropout inside a layer must run equally often (once per trace)."""
    outside, inside = [], collections.defaultdict(list)

    def record(next_fun, call_args, kwargs, context):
        if isinstance(context.module, nn.Dropout) and context.method_name == "__call__":
            path = context.module.path
            entry = (tuple(call_args[0].shape), context.module.rate)
            if "layers" in path:
                inside[(path[0], path)].append(entry)
            else:
                outside.append(entry)
        return next_fun(*call_args, **kwargs)

    with nn.intercept_methods(record):
        module.apply({"params": params}, *args, rngs={"dropout": jax.random.key(0)}, method=method)
    traces = {len(v) for v in inside.values()}
    assert len(traces) == 1, f"a layer's dropouts ran unequally often: {dict(inside)}"
    per_layer = [(stack, v[0]) for (stack, _), v in inside.items()]
    assert all(len(set(v)) == 1 for v in inside.values())
    return outside + [entry for stack, entry in per_layer for _ in range(num_layers[stack])]


def test_t5_dropout_sits_where_transformers_puts_it():
    hf = transformers.T5ForConditionalGeneration(
        transformers.T5Config(**dict(th.T5_HF, dropout_rate=RATE, d_ff=44), attn_implementation="eager"))
    module, cfg, params, _ = th.import_hf("t5", hf)
    rng = np.random.default_rng(0)
    prompt, completion = rng.integers(2, 60, (B, S), np.int32), rng.integers(2, 60, (B, T), np.int32)
    start = np.full((B, 1), cfg.decoder_start_token_id, np.int32)
    expected = hf_dropout_calls(hf, input_ids=prompt, attention_mask=np.ones((B, S)),
                                decoder_input_ids=np.concatenate([start, completion[:, :-1]], 1))
    ours = our_dropout_calls(with_dropout(module, RATE), params,
                             {"encoder": cfg.num_layers, "decoder": cfg.num_decoder_layers},
                             prompt, np.ones((B, S), np.int32), completion, np.ones((B, T), np.int32),
                             method="completion_logits")
    # same shapes ([B, H, T, S] attention probabilities, [B, T, F] feed-forward activations,
    # [B, T, D] sublayer outputs and stack inputs/outputs), as often, at the same rate
    assert collections.Counter(ours) == collections.Counter(expected)
    assert len(expected) == 2 + 4 * cfg.num_layers + 2 + 6 * cfg.num_decoder_layers


def test_llama_dropout_is_on_attention_probabilities_only():
    hf_cfg = transformers.LlamaConfig(**dict(th.LLAMA_HF, attention_dropout=RATE), attn_implementation="eager")
    hf = transformers.LlamaForCausalLM(hf_cfg)
    module, cfg, params, _ = th.import_hf("llama", hf)
    rng = np.random.default_rng(0)
    prompt, completion = rng.integers(3, 90, (B, S), np.int32), rng.integers(3, 90, (B, T), np.int32)
    expected = hf_dropout_calls(hf, input_ids=np.concatenate([prompt, completion], 1))
    ours = our_dropout_calls(with_dropout(module, RATE), params, {"layers": cfg.num_layers},
                             prompt, np.ones((B, S), np.int32), completion, np.ones((B, T), np.int32),
                             method="completion_logits")
    # dpost holds the probabilities grouped by KV head ([B, KV, G*T, T] for [B, H, T, T]): same size
    size = lambda calls: collections.Counter((int(np.prod(shape)), p) for shape, p in calls)  # noqa: E731
    assert size(ours) == size(expected) == collections.Counter({(B * hf_cfg.num_attention_heads * (S + T) ** 2, RATE):
                                                                hf_cfg.num_hidden_layers})


def test_llama_attention_dropout_zeroes_at_the_rate_and_rescales():
    rate, b, t = 0.3, 4, 64
    cfg = llama_model.LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4,
                                  num_kv_heads=2, head_dim=8)
    x = jax.random.normal(jax.random.key(1), (b, t, cfg.hidden_size))
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    mask = layers.causal_padding_mask(jnp.ones((b, t), bool))
    attn = llama_model.Attention(cfg, rate)
    params = attn.init(jax.random.key(0), x, positions, mask, None, None, None)
    seen = []

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if isinstance(context.module, nn.Dropout):
            seen.append((np.asarray(args[0]), np.asarray(out)))
        return out

    with nn.intercept_methods(record):
        dropped, _ = attn.apply(params, x, positions, mask, None, None, None, rngs={"dropout": jax.random.key(2)})
    ((probs, out),) = seen
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)  # the softmax output, one row per query
    live = probs > 0  # masked (future) keys have probability 0 either way
    zeroed = (out == 0) & live
    assert abs(zeroed.sum() / live.sum() - rate) < 0.02, zeroed.sum() / live.sum()
    np.testing.assert_allclose(out[~zeroed], probs[~zeroed] / (1 - rate), rtol=1e-6)
    plain, _ = llama_model.Attention(cfg).apply(params, x, positions, mask, None, None, None)
    assert not np.allclose(dropped, plain)


def test_models_as_loaded_have_no_dropout():
    """Evaluation, scoring, sampling and DPO use the module as loaded: rate 0, no rng needed, and
    an rng changes nothing."""
    module, cfg, params, _ = th.tiny_llama(0)
    assert module.dropout_rate == 0.0 and with_dropout(module, 0.0) is module
    batch = th.sft_batch(0, vocab=cfg.vocab_size)
    args = (batch["prompt"], batch["prompt_mask"], batch["completion"], batch["completion_mask"])
    plain = module.apply({"params": params}, *args, method="completion_logits")
    with_rng = module.apply({"params": params}, *args, rngs={"dropout": jax.random.key(0)}, method="completion_logits")
    np.testing.assert_array_equal(plain, with_rng)
    assert with_dropout(module, 0.1).dropout_rate == 0.1 and module.dropout_rate == 0.0
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="model.dropout"):
            with_dropout(module, bad)
