"""The sampler's decode copy of the params (`decode_layout`): matrices in the compute dtype, norm
scales and T5's relative-position tables in fp32, and decoding from it gives exactly the tokens
and log-probs that decoding from uncast fp32 masters gives (each matmul casts its weight anyway)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpost import models, sampling
from dpost.models import layers
from dpost.models.llama.model import LlamaConfig
from dpost.models.t5.model import T5Config

CONFIGS = {
    "llama": LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=8, dtype="bfloat16"),
    "t5": T5Config(vocab_size=97, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                   relative_attention_num_buckets=8, relative_attention_max_distance=20,
                   feed_forward_proj="gated-gelu", tie_word_embeddings=False, dtype="bfloat16"),
}
OPTIONS = dict(max_new_tokens=12, temperature=1.0, num_samples=2, seed=3, ignore_eos=True)


@pytest.fixture(autouse=True)
def _fast_compile(monkeypatch):
    monkeypatch.setenv("DPOST_SAMPLER_FAST_COMPILE", "1")


def _leaves_by_name(tree):
    out = {}
    for path, x in jax.tree_util.tree_leaves_with_path(tree):
        out.setdefault(path[-1].key, []).append(x)
    return out


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_decode_copy_dtypes(family):
    bundle = models.init_random(family, CONFIGS[family], seed=0)
    decoded = sampling.decode_layout(bundle.module, bundle.params)
    by_name = _leaves_by_name(decoded)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(bundle.params))  # masters untouched
    for name, xs in by_name.items():
        for x in xs:
            want = jnp.bfloat16 if x.ndim >= 2 and name != "relpos" else jnp.float32
            assert x.dtype == want, (name, x.shape, x.dtype)
    assert any(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(decoded))
    if family == "t5":
        assert "relpos" in by_name


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_decoding_from_the_cast_copy_is_exact(family, monkeypatch):
    bundle = models.init_random(family, CONFIGS[family], seed=1)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 97, n).tolist() for n in (5, 11, 3)]
    cast = sampling.generate(bundle, prompts, **OPTIONS)
    monkeypatch.setattr(layers, "cast_matrices", lambda tree, dtype, keep=(): tree)  # fp32 masters
    sampling._jitted_layout.cache_clear()
    try:
        uncast = sampling.generate(bundle, prompts, **OPTIONS)
    finally:
        sampling._jitted_layout.cache_clear()
    for a, b in zip(cast, uncast):
        assert [s.token_ids for s in a] == [s.token_ids for s in b]
        np.testing.assert_array_equal([s.token_logprobs for s in a], [s.token_logprobs for s in b])
