"""Continuous batching (a fixed number of slots, refilled as rows finish) samples exactly what static
batching samples: token for token, log-probs within fp32 rounding, for Llama and T5 modules, greedy
and sampled, calculator on, with more rows than slots and rows of very different lengths; forced
calculator results across refills (scripted model); 8 simulated devices; a bounded number of
compiled programs.

The reference is `batching="static"`: length-sorted chunks decoded to their longest row, one
batched `decode_step` per step (no slots, no refills, no per-row vmap), itself checked against
transformers' `generate` and `models.sequence_logprobs` in test_sampling_llama.py / _t5.py."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest

from dpost import models, sampling
from dpost.sampling import continuous, sampler as sampler_lib
from sampling_toys import (byte_bpe_tokenizer, fast_compile, random_prompts, scripted_bundle,  # noqa: F401
                           run_on_8_devices, sentencepiece_tokenizer, tiny_hf_llama, tiny_hf_t5)

LLAMA_VOCAB, LLAMA_EOS = 101, 98  # greedy rows of this random model end at EOS early, late or never
T5_VOCAB, T5_EOS, T5_PAD = 262, 1, 0
GREEDY = dict(max_new_tokens=40, calculator=True)
SAMPLED = dict(max_new_tokens=24, temperature=1.0, top_k=30, num_samples=3, seed=11, calculator=True)


@pytest.fixture(scope="module", autouse=True)
def _fast(fast_compile):
    yield


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    tiny_hf_llama(folder, vocab=LLAMA_VOCAB, eos_token_id=LLAMA_EOS)
    llama = models.load(f"hf:{folder}").replace(tokenizer=byte_bpe_tokenizer())  # calculator tables need one
    folder = tmp_path_factory.mktemp("t5")
    tiny_hf_t5(folder, T5_VOCAB, T5_EOS, T5_PAD)
    t5 = models.load(f"hf:{folder}").replace(tokenizer=sentencepiece_tokenizer())
    return {"llama": (llama, LLAMA_VOCAB), "t5": (t5, T5_VOCAB)}


def assert_same(got, want):
    assert [[s.token_ids for s in p] for p in got] == [[s.token_ids for s in p] for p in want]
    assert [[s.finish_reason for s in p] for p in got] == [[s.finish_reason for s in p] for p in want]
    assert [[s.text for s in p] for p in got] == [[s.text for s in p] for p in want]
    np.testing.assert_allclose(np.concatenate([s.token_logprobs for p in got for s in p]),
                               np.concatenate([s.token_logprobs for p in want for s in p]), rtol=1e-5, atol=1e-5)


class CountRefills:
    """Counts refills and records which prompts each one started (rows whose slot is the slot count
    are filler)."""

    def __init__(self, monkeypatch):
        self.calls = 0
        self.started: list[set[int]] = []
        program = continuous.refill_program

        def counted(*args):
            self.calls += 1
            state, slot, prompt_index = args[3], np.asarray(args[7]), np.asarray(args[8])
            self.started.append(set(prompt_index[slot < state["done"].shape[0]].tolist()))
            return program(*args)

        monkeypatch.setattr(continuous, "refill_program", counted)


@pytest.mark.parametrize("family", ["llama", "t5"])
@pytest.mark.parametrize("kw", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_continuous_equals_static(bundles, family, kw, monkeypatch):
    bundle, vocab = bundles[family]
    prompts = random_prompts(7, vocab, np.random.RandomState(3), low=2, high=40)
    n = kw.get("num_samples", 1)
    static = sampling.generate(bundle, prompts, batching="static", **kw)
    refills = CountRefills(monkeypatch)
    got = sampling.generate(bundle, prompts, batch_size=2, **kw)  # 2 prompts' rows in flight
    assert_same(got, static)
    slots = continuous.plan_slots(len(prompts) * n, 2 * n, 1, n)[0]
    assert slots < len(prompts) * n and refills.calls > 1  # rows waited for slots
    started = [i for call in refills.started for i in call]
    assert sorted(started) == list(range(len(prompts)))  # each prompt prefilled by one refill
    lengths = [len(s.token_ids) for p in got for s in p]
    assert min(lengths) < kw["max_new_tokens"] // 2 and max(lengths) == kw["max_new_tokens"], lengths
    # and the slot count changes nothing either
    assert_same(sampling.generate(bundle, prompts, batch_size=1, **kw), static)
    # Static chunks of 2 prompts, each padded to its own longest prompt (continuous slots: to the
    # call's): other cache lengths, the same samples on this model (on a real one only up to fp32
    # rounding, README "Determinism").
    by_length = sorted(len(p) for p in prompts)
    widths = {sampling.prompt_length_bucket(max(by_length[k : k + 2])) for k in range(0, len(prompts), 2)}
    assert len(widths) > 1, widths
    assert_same(sampling.generate(bundle, prompts, batching="static", batch_size=2, **kw), static)


# (script the model wants to write: very different lengths, calculator annotations in both formats)
SCRIPTS = {
    "llama": ["<<48/2=25>>25.", "ok", "So <<1/3=0.34>>0.34 and <<1234*10=12345>>12345 then <<7-9=1>> so 3 more.",
              "x=<<2+x=5>>5", "<<3*(2+1)=8>>"],
    "t5": ["He has [ 48 / 2 = 25] 25.", "so", "so [ 1 / 3 = 0.34] 0.34 and [ 1234 * 10 = 12345] 12345 then [ 7 - 9 = 1]",
           "[ 2 + x = 5] 5", "[ 3 * (2 + 1) = 8]"],
}


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_calculator_forcing_across_refills(family, monkeypatch):
    tok = byte_bpe_tokenizer() if family == "llama" else sentencepiece_tokenizer()
    bundle, prompts = scripted_bundle(family, tok, SCRIPTS[family])
    kw = dict(max_new_tokens=64, calculator=True, num_samples=2, temperature=0.3, seed=3)  # near the script
    static = sampling.generate(bundle, prompts, batching="static", **kw)
    refills = CountRefills(monkeypatch)
    got = sampling.generate(bundle, prompts, batch_size=1, **kw)
    assert refills.calls > 2
    assert_same(got, static)
    forced = "<<48/2=24>>" if family == "llama" else "[ 48 / 2 = 24]"
    assert any(forced in s.text for s in got[0])  # the calculator did force results
    assert len({len(s.token_ids) for p in got for s in p}) > 3


def test_take_starts_whole_prompts():
    waiting = [(i, j) for i in (5, 2, 7) for j in range(3)]  # prompts in their order, 3 samples each
    assert continuous._take(waiting, 0, 8, 4, 6) == waiting[:6]  # 2 whole prompts; the third waits
    assert continuous._take(waiting, 0, 8, 1, 6) == waiting[:3]  # at most 1 prompt
    assert continuous._take(waiting, 0, 2, 4, 6) == []  # prompt 5 does not fit yet
    assert continuous._take(waiting, 1, 2, 4, 6) == waiting[1:3]  # its last 2 samples (the rest started)
    assert continuous._take(waiting, 0, 2, 4, 2) == waiting[:2]  # 3 samples never fit 2 slots: parts
    assert continuous._take(waiting, 6, 8, 4, 6) == waiting[6:]


@pytest.mark.parametrize("prompts,group,shards,want", [(1, 4, 1, 1), (3, 4, 1, 4), (3, 2, 1, 2), (1, 8, 2, 2),
                                                       (5, 16, 4, 8)])
def test_prefill_group_sizes(prompts, group, shards, want):
    assert continuous.prefill_group(prompts, group, shards) == want


def test_compiled_programs_stay_bounded(bundles):
    """Other contents, prompt counts, lengths (same bucket), seeds and temperatures: no new programs;
    one call config compiles the empty slots, the decode and a refill per prefill size (1, 2, ...,
    the plan's group)."""
    bundle, vocab = bundles["llama"]
    rng = np.random.RandomState(7)

    def prompts(count):  # the longest prompt sets the bucket (20 tokens)
        return random_prompts(count - 1, vocab, rng, low=2, high=20) + [rng.randint(3, vocab, 20).tolist()]

    kw = dict(max_new_tokens=12, num_samples=2, batch_size=3)
    group = continuous.plan_slots(5 * 2, 3 * 2, 1, 2)[1]
    start = sampler_lib.compiled_program_count()
    sampling.generate(bundle, prompts(5), temperature=0.7, **kw)
    assert sampler_lib.compiled_program_count() - start <= 2 + group.bit_length()
    before = sampler_lib.compiled_program_count()
    for i, count in enumerate((4, 6, 9)):
        sampling.generate(bundle, prompts(count), temperature=0.5 + i, seed=i, **kw)
    assert sampler_lib.compiled_program_count() == before


SHARDED = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    sys.path.insert(0, sys.argv[1])
    import jax, numpy as np
    from dpost import models, sampling, sharding
    from dpost.models.llama.model import LlamaConfig
    from dpost.models.t5.model import T5Config
    from sampling_toys import byte_bpe_tokenizer, sentencepiece_tokenizer
    assert jax.device_count() == 8
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    bpe, spm = byte_bpe_tokenizer(), sentencepiece_tokenizer()
    configs = {
        "llama": (LlamaConfig(vocab_size=len(bpe), hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                              num_kv_heads=2, head_dim=8, eos_token_id=bpe.eos_token_id,
                              pad_token_id=bpe.pad_token_id), bpe),
        "t5": (T5Config(vocab_size=len(spm), d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                        relative_attention_num_buckets=8, relative_attention_max_distance=20,
                        feed_forward_proj="gated-gelu", tie_word_embeddings=False), spm),
    }
    rng = np.random.RandomState(0)
    for family, (cfg, tok) in configs.items():
        single = models.init_random(family, cfg, tokenizer=tok, seed=0)
        sharded = models.init_random(family, cfg, tokenizer=tok, seed=0, mesh=mesh)
        prompts = [rng.randint(3, len(tok), rng.randint(2, 30)).tolist() for _ in range(9)]
        for kw in (dict(max_new_tokens=16, calculator=True),
                   dict(max_new_tokens=16, temperature=1.0, num_samples=3, top_k=20, calculator=True, seed=5)):
            want = sampling.generate(single, prompts, batching="static", **kw)
            # 4 batch shards: batch_size 1 gives 4 prompts' rows (greedy: 4 slots for 9 rows)
            got = sampling.generate(sharded, prompts, batch_size=1, **kw)
            assert [[s.token_ids for s in p] for p in got] == [[s.token_ids for s in p] for p in want], (family, kw)
            a = np.concatenate([s.token_logprobs for p in got for s in p])
            b = np.concatenate([s.token_logprobs for p in want for s in p])
            np.testing.assert_allclose(a, b, atol=1e-4)
            lengths = {len(s.token_ids) for p in got for s in p}
            print(family, sorted(lengths))
    print("OK")
""")


def test_sharded_continuous_equals_single_device_static():
    run_on_8_devices(SHARDED)
