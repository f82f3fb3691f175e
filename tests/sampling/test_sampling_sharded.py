"""Sharded sampling on 8 simulated CPU devices equals single-device sampling (greedy; sampled with
several samples per prompt, top-k and the calculator on), under the default and a custom rules table.
Both checks run in one subprocess (XLA_FLAGS must be set before jax is imported), sharing its
start-up and the single-device references; each reports its own outcome."""

from __future__ import annotations

import textwrap

import pytest

from sampling_toys import run_on_8_devices

# A rules table unlike DEFAULT_RULES (custom_rules): rows split over `data` only, the embedding
# dimension replicated, the MLP width over fsdp x tensor.
SCRIPT = textwrap.dedent("""
    import os, sys, traceback
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    sys.path.insert(0, sys.argv[1])
    import jax, numpy as np
    from jax.sharding import PartitionSpec as P
    from dpost import models, sampling, sharding
    from dpost.models.llama.model import LlamaConfig
    from sampling_toys import assert_same_samples, byte_bpe_tokenizer
    assert jax.device_count() == 8
    tok = byte_bpe_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=8, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    single = models.init_random("llama", cfg, tokenizer=tok, seed=0)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    rng = np.random.RandomState(0)
    prompts = [rng.randint(3, len(tok), rng.randint(2, 20)).tolist() for _ in range(5)]
    CALLS = (dict(max_new_tokens=16),
             dict(max_new_tokens=16, temperature=1.0, num_samples=3, top_k=20, calculator=True, seed=5))
    WANT = [sampling.generate(single, prompts, **kw) for kw in CALLS]

    def default_rules():
        sharded = models.init_random("llama", cfg, tokenizer=tok, seed=0, mesh=mesh)
        assert len(sharded.params["layers"]["attn"]["q"].sharding.device_set) == 8
        for kw, want in zip(CALLS, WANT):
            got = sampling.generate(sharded, prompts, **kw)  # the bundle's mesh
            via_arg = sampling.generate(single, prompts, mesh=mesh, **kw)  # params resharded onto `mesh`
            for out in (got, via_arg):
                assert_same_samples(out, want, kw)

    def custom_rules():
        custom = dict(sharding.DEFAULT_RULES)
        custom.update(batch="data", embed=None, mlp=("fsdp", "tensor"), act_mlp=("fsdp", "tensor"))
        custom = tuple(custom.items())
        layout = sharding.Layout(mesh, custom)
        assert layout.batch_shards == 2 and sharding.Layout(mesh).batch_shards == 4
        sharded = models.init_random("llama", cfg, tokenizer=tok, seed=0, layout=layout)
        # the params follow the custom table: MLP matrices [layers, embed, mlp] over fsdp x tensor, embed replicated
        assert sharded.params["layers"]["mlp"]["gate"].sharding.spec == P(None, None, ("fsdp", "tensor"))
        assert sharded.params["embed"].sharding.spec == P("tensor", None)

        # Spies: the rules every traced sampler program resolves its activation constraints with, and
        # the layout every host array is placed by.
        traced_rules, put_layouts = [], []
        real_rules, real_put = sharding.activation_rules, sampling._put
        def spy_rules(mesh, rules=None):
            traced_rules.append(dict(sharding.rules_from_config(rules)))
            return real_rules(mesh, rules)
        def spy_put(x, layout, batch):
            put_layouts.append(layout)
            return real_put(x, layout, batch)
        sharding.activation_rules, sampling._put = spy_rules, spy_put
        try:
            for kw, want in zip(CALLS, WANT):
                traced_rules.clear(); put_layouts.clear()
                got = sampling.generate(sharded, prompts, **kw)  # the bundle's layout, custom rules included
                assert traced_rules and put_layouts, "the sampler traced nothing under a layout"
                assert all(rules == dict(custom) for rules in traced_rules)
                assert all(l == layout for l in put_layouts)
                via_arg = sampling.generate(single, prompts, layout=layout, **kw)  # params placed by the custom rules
                for out in (got, via_arg):
                    assert_same_samples(out, want, kw)
        finally:
            sharding.activation_rules, sampling._put = real_rules, real_put

    for check in (default_rules, custom_rules):
        try:
            check()
            print("OK", check.__name__)
        except Exception:
            print("FAILED", check.__name__)
            traceback.print_exc(file=sys.stdout)
""")


@pytest.fixture(scope="module")
def outcome():
    return run_on_8_devices(SCRIPT, check=False)


def assert_passed(outcome, check: str) -> None:
    assert f"OK {check}" in outcome.stdout.splitlines(), outcome.stdout[-5000:] + outcome.stderr[-3000:]


def test_sharded_sampling_equals_single_device(outcome):
    assert_passed(outcome, "default_rules")


def test_sampler_places_and_constrains_by_the_layouts_custom_rules(outcome):
    assert_passed(outcome, "custom_rules")
