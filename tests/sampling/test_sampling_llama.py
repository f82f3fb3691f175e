"""Sampler on a tiny random Llama with grouped-query attention: parity with transformers' greedy
`generate`, log-probs equal to `models.sequence_logprobs`, determinism, sampling options, and a
bounded number of compiled programs.

Option sets are shared between tests (module fixtures) so the file compiles few programs."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from dpost import models, sampling
from dpost.data.batching import pad_rows
from dpost.models.scoring import completion_token_logprobs
from dpost.sampling import sampler as sampler_lib
from sampling_toys import random_prompts, tiny_hf_llama

VOCAB = 101
EOS = 98  # a token this random model's greedy continuations reach in some rows and not in others
GREEDY = dict(max_new_tokens=40)
SAMPLED = dict(max_new_tokens=20, temperature=1.0, num_samples=4, seed=7)


@pytest.fixture(scope="module", autouse=True)
def _fast_compile():
    """Tiny models: compile the sampler's programs without LLVM optimisation (faster tests)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DPOST_SAMPLER_FAST_COMPILE", "1")
        yield


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_llama")
    hf = tiny_hf_llama(folder, vocab=VOCAB, eos_token_id=EOS)
    bundle = models.load(f"hf:{folder}")
    assert bundle.config.num_kv_heads < bundle.config.num_heads  # GQA
    return hf, bundle


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.RandomState(0)
    return random_prompts(6, VOCAB, rng, low=2, high=40), random_prompts(4, VOCAB, rng, low=2, high=10)


@pytest.fixture(scope="module")
def greedy_out(tiny, prompts):
    return sampling.generate(tiny[1], prompts[0], **GREEDY)


@pytest.fixture(scope="module")
def sampled_out(tiny, prompts):
    return sampling.generate(tiny[1], prompts[1][:3], **SAMPLED)


def hf_greedy(hf, prompts, max_new_tokens, eos=EOS, pad=0):
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                          pad_token_id=pad, eos_token_id=eos)
    return [row[: row.index(eos) + 1] if eos in row else row for row in out[:, width:].tolist()]


def per_token_logprobs(bundle, prompts, completions):
    prompt, prompt_mask = pad_rows(prompts, max(map(len, prompts)), bundle.pad_token_id, left=True)
    completion, completion_mask = pad_rows(completions, max(map(len, completions)), bundle.pad_token_id, left=False)
    fn = jax.jit(functools.partial(completion_token_logprobs, bundle.module))
    return np.asarray(fn(bundle.params, prompt, prompt_mask, completion, completion_mask))


def check_logprobs(bundle, prompts, out):
    flat_prompts = [p for p, samples in zip(prompts, out) for _ in samples]
    flat = [s for samples in out for s in samples]
    completions = [s.token_ids for s in flat]
    ref = models.sequence_logprobs(bundle, flat_prompts, completions)
    np.testing.assert_allclose([sum(s.token_logprobs) for s in flat], ref, atol=1e-3, rtol=0)
    per_tok = per_token_logprobs(bundle, flat_prompts, completions)
    for i, s in enumerate(flat):
        assert len(s.token_logprobs) == len(s.token_ids)
        np.testing.assert_allclose(s.token_logprobs, per_tok[i, : len(s.token_ids)], atol=1e-3)


def test_greedy_matches_transformers_generate(tiny, prompts, greedy_out):
    hf, bundle = tiny
    want = hf_greedy(hf, prompts[0], GREEDY["max_new_tokens"])
    assert [len(s) for s in greedy_out] == [1] * len(prompts[0])
    for i, ((s,), ref) in enumerate(zip(greedy_out, want)):
        assert s.token_ids == ref, (i, s.token_ids, ref)
        assert s.finish_reason == ("eos" if ref[-1] == EOS else "length")
    assert {s.finish_reason for (s,) in greedy_out} == {"eos", "length"}  # both paths exercised


def test_token_logprobs_match_scoring(tiny, prompts, greedy_out, sampled_out):
    bundle = tiny[1]
    check_logprobs(bundle, prompts[0], greedy_out)
    check_logprobs(bundle, prompts[1][:3], sampled_out)


def test_seeds_num_samples_and_batch_composition(tiny, prompts, sampled_out):
    bundle = tiny[1]
    a, b, c, d = prompts[1]
    first = sampled_out
    assert [len(s) for s in first] == [4, 4, 4]
    ids = lambda out, i: [s.token_ids for s in out[i]]  # noqa: E731
    again = sampling.generate(bundle, [a, b, c], **SAMPLED)
    assert [ids(again, i) for i in range(3)] == [ids(first, i) for i in range(3)]
    assert len({tuple(t) for t in ids(first, 0)}) > 1  # the 4 samples of a prompt differ
    other_seed = sampling.generate(bundle, [a, b, c], **dict(SAMPLED, seed=8))
    assert ids(other_seed, 0) != ids(first, 0)
    # Same prompt index, other companions / batch sizes / prompt-length bucket: same samples.
    long = np.random.RandomState(9).randint(3, VOCAB, 70).tolist()  # a longer prompt bucket
    for batch, bs in (([a, d, long], None), ([a, b, c], 1)):
        out = sampling.generate(bundle, batch, batch_size=bs, **SAMPLED)
        assert ids(out, 0) == ids(first, 0), bs
        np.testing.assert_allclose([x for s in out[0] for x in s.token_logprobs],
                                   [x for s in first[0] for x in s.token_logprobs], atol=1e-4)
        if bs == 1:
            assert [ids(out, i) for i in range(3)] == [ids(first, i) for i in range(3)]


def test_chunks_sorted_by_length_results_in_input_order(tiny, prompts, greedy_out):
    """Prompts run in length-sorted chunks; each result still lands at its prompt's position."""
    bundle = tiny[1]
    order = sorted(range(len(prompts[0])), key=lambda i: -len(prompts[0][i]))  # longest first
    assert order != list(range(len(order)))
    out = sampling.generate(bundle, [prompts[0][i] for i in order], batch_size=2, **GREEDY)
    assert [s.token_ids for (s,) in out] == [greedy_out[i][0].token_ids for i in order]


def test_top_k_and_top_p_end_to_end(tiny, prompts, greedy_out):
    bundle = tiny[1]
    # top_k = 1 (and any nucleus) at any temperature is greedy
    out = sampling.generate(bundle, prompts[0], max_new_tokens=GREEDY["max_new_tokens"], temperature=3.0, top_k=1,
                            top_p=0.5, seed=1)
    assert [s.token_ids for (s,) in out] == [s.token_ids for (s,) in greedy_out]


def _select(logits, u, top_p, opts):
    return jax.jit(sampler_lib.select_tokens, static_argnums=4)(logits, u, 1.0, top_p, opts)


def test_sampling_distributions_top_k_top_p():
    n = 4000
    u = jnp.linspace(0.0, 0.9999, n)
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * n, jnp.float32))
    freq = lambda toks, k: np.bincount(np.asarray(toks), minlength=k) / n  # noqa: E731
    opts = sampler_lib.StaticOptions(max_new_tokens=1, greedy=False, top_k=2)
    np.testing.assert_allclose(freq(_select(logits, u, 1.0, opts), 4), [0.5 / 0.8, 0.3 / 0.8, 0, 0], atol=0.01)
    opts = sampler_lib.StaticOptions(max_new_tokens=1, greedy=False, top_p=True)
    # 0.5 + 0.3 < 0.85, so the third token is in the nucleus and the fourth is not
    np.testing.assert_allclose(freq(_select(logits, u, 0.85, opts), 4), [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0],
                               atol=0.01)
    # nucleus larger than the candidate set: exact full-vocabulary fallback
    wide = jnp.zeros((n, 300), jnp.float32).at[:, 0].set(2.0)
    toks = np.asarray(_select(wide, u, 0.9, opts))
    assert len(set(toks.tolist())) > 100
    np.testing.assert_allclose(np.mean(toks == 0), float(np.exp(2.0) / (np.exp(2.0) + 299)) / 0.9, atol=0.02)
    # the plain (two-level inverse-CDF) sampler over a vocabulary that is not a multiple of its block
    opts = sampler_lib.StaticOptions(max_new_tokens=1, greedy=False)
    big = jnp.log(jnp.full((n, 1000), 1e-9).at[:, 700].set(0.5).at[:, 3].set(0.25).at[:, 999].set(0.25))
    f = freq(_select(big, u, 1.0, opts), 1000)
    np.testing.assert_allclose(f[[700, 3, 999]], [0.5, 0.25, 0.25], atol=0.01)


def test_eos_handling_and_ignore_eos(tiny, prompts, greedy_out):
    hf, bundle = tiny
    for (s,) in greedy_out:
        assert bundle.eos_token_id not in s.token_ids[:-1]
        assert (s.finish_reason == "eos") == (s.token_ids[-1] == bundle.eos_token_id)
        assert s.finish_reason == "eos" or len(s.token_ids) == GREEDY["max_new_tokens"]
    # with EOS := the first greedy token of prompt 0, generation stops there, unless EOS is ignored
    first = greedy_out[0][0].token_ids[0]
    eos_bundle = bundle.replace(config=bundle.config.replace(eos_token_id=first))
    (s,), = sampling.generate(eos_bundle, prompts[0][:1], **GREEDY)
    assert s.token_ids == [first] and s.finish_reason == "eos"
    np.testing.assert_allclose(s.token_logprobs, greedy_out[0][0].token_logprobs[:1], atol=1e-5)
    (s,), = sampling.generate(eos_bundle, prompts[0][:1], ignore_eos=True, **GREEDY)
    assert s.token_ids == greedy_out[0][0].token_ids and s.finish_reason == "length"


def test_compiled_programs_stay_bounded(tiny, prompts, greedy_out, sampled_out):
    bundle = tiny[1]
    rng = np.random.RandomState(5)
    # other contents, lengths and counts within the same buckets, other seeds and temperatures,
    # and new params with the same shapes: no new programs but a refill's for a prompt count not
    # seen yet (a refill prefills 1 or 2 prompts here, a program each), and none at all once more
    other = bundle.replace(params=jax.tree.map(lambda v: v * 1.01, bundle.params))
    calls = [(other if i % 2 else bundle, random_prompts(3 + i % 2, VOCAB, rng, low=2, high=10),
              random_prompts(5 + i % 2, VOCAB, rng, low=2, high=40)) for i in range(3)]

    def run(calls, offset):
        for i, (model, sampled, greedy) in enumerate(calls):
            sampling.generate(model, sampled, **dict(SAMPLED, seed=i + offset, temperature=0.5 + i))
            sampling.generate(model, greedy, **GREEDY)

    before = sampler_lib.compiled_program_count()
    run(calls, 0)
    first = sampler_lib.compiled_program_count()
    assert first - before <= 4, (before, first)  # two call configs, each refills of 1 or 2 prompts

    def same_lengths(prompts):
        return [rng.randint(3, VOCAB, len(p)).tolist() for p in prompts]

    run([(model, same_lengths(sampled), same_lengths(greedy)) for model, sampled, greedy in calls], 10)
    assert sampler_lib.compiled_program_count() == first


def test_progress_bar(tiny, prompts, capsys):
    bundle = tiny[1]
    out = sampling.generate(bundle, prompts[0], progress=True, **GREEDY)
    assert len(out) == len(prompts[0])
    err = capsys.readouterr().err
    assert "tok/s" in err and f"{len(prompts[0])}/{len(prompts[0])}" in err
