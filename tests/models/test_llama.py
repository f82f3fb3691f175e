"""Llama family: parity with transformers' PyTorch LlamaForCausalLM, GGUF import, export, sharding."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from dpost import models
from dpost.data import batching
from tests.conftest import data_dir, smollm2_path

TINY_CONFIGS = {
    # GQA 6:2, untied head, head_dim unrelated to hidden_size
    "gqa3_untied_odd": dict(hidden_size=42, intermediate_size=80, num_hidden_layers=3, num_attention_heads=6,
                            num_key_value_heads=2, head_dim=10, rope_theta=500.0, tie_word_embeddings=False),
    # multi-query (1 KV head), tied embeddings
    "mqa_tied": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=1, head_dim=8, rope_theta=10000.0, tie_word_embeddings=True),
    # plain multi-head attention, Llama-3.1 style rope scaling
    "mha_llama3_rope": dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=4, head_dim=12, rope_theta=500000.0, tie_word_embeddings=False,
                            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
}


def tiny_hf_llama(name: str, vocab: int = 97):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=vocab, rms_norm_eps=1e-5, max_position_embeddings=256,
                                   **TINY_CONFIGS[name])
    return transformers.LlamaForCausalLM(cfg).eval()


def save_hf(model, folder) -> str:
    model.save_pretrained(folder)
    return str(folder)


def torch_logits(model, ids, mask=None):
    with torch.no_grad():
        out = model(torch.tensor(ids), attention_mask=None if mask is None else torch.tensor(mask))
    return out.logits.float().numpy()


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_logits_and_logprobs_match_transformers(name, tmp_path):
    hf = tiny_hf_llama(name)
    bundle = models.load("hf:" + save_hf(hf, tmp_path))
    ids = np.random.RandomState(1).randint(3, 97, (3, 11))
    ours, _ = bundle.module.apply({"params": bundle.params}, jnp.asarray(ids))
    np.testing.assert_allclose(np.asarray(ours), torch_logits(hf, ids), atol=1e-4, rtol=0)

    # Ragged prompts/completions: summed completion log-probs from PyTorch logits, per row.
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14]]
    completions = [[20, 21], [22, 23, 24, 25], [26, 27, 28]]
    got = models.sequence_logprobs(bundle.replace(tokenizer=None), prompts, completions)
    for row, (p, c) in enumerate(zip(prompts, completions)):
        logp = torch.log_softmax(torch.tensor(torch_logits(hf, [p + c])[0]), -1).numpy()
        want = sum(logp[len(p) - 1 + j, tok] for j, tok in enumerate(c))
        assert abs(got[row] - want) < 1e-3, (row, got[row], want)


def test_kv_cache_decode_matches_full_forward(tmp_path):
    hf = tiny_hf_llama("gqa3_untied_odd")
    bundle = models.load("hf:" + save_hf(hf, tmp_path))
    prompt, mask = batching.pad_rows([[5, 6, 7], [1, 2, 3, 4, 5]], 8, 0, left=True)
    logits, state = bundle.module.apply({"params": bundle.params}, prompt, mask, 4, 2, method="prefill")
    np.testing.assert_allclose(np.asarray(logits[0]), torch_logits(hf, [[5, 6, 7]])[0, -1], atol=1e-4)
    np.testing.assert_allclose(np.asarray(logits[2]), torch_logits(hf, [[1, 2, 3, 4, 5]])[0, -1], atol=1e-4)
    logits, state = bundle.module.apply({"params": bundle.params}, jnp.array([8, 9, 10, 11]), state,
                                        method="decode_step")
    np.testing.assert_allclose(np.asarray(logits[1]), torch_logits(hf, [[5, 6, 7, 9]])[0, -1], atol=1e-4)
    np.testing.assert_allclose(np.asarray(logits[3]), torch_logits(hf, [[1, 2, 3, 4, 5, 11]])[0, -1], atol=1e-4)


def test_bf16_compute_is_close(tmp_path):
    hf = tiny_hf_llama("mqa_tied")
    path = save_hf(hf, tmp_path)
    ids = np.random.RandomState(2).randint(3, 97, (2, 9))
    b32, b16 = models.load("hf:" + path), models.load("hf:" + path, dtype="bfloat16")
    assert jax.tree.leaves(b16.params)[0].dtype == jnp.float32  # fp32 masters, bf16 compute
    out32, _ = b32.module.apply({"params": b32.params}, jnp.asarray(ids))
    out16, _ = b16.module.apply({"params": b16.params}, jnp.asarray(ids))
    assert out16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out16, np.float32), np.asarray(out32), atol=0.1)


def test_export_round_trip(tmp_path):
    hf = tiny_hf_llama("gqa3_untied_odd")
    bundle = models.load("hf:" + save_hf(hf, tmp_path / "in"))
    models.export_hf(bundle, str(tmp_path / "out"))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    ids = np.random.RandomState(3).randint(3, 97, (2, 10))
    ours, _ = bundle.module.apply({"params": bundle.params}, jnp.asarray(ids))
    np.testing.assert_allclose(torch_logits(reloaded, ids), np.asarray(ours), atol=1e-5, rtol=0)


def test_orbax_round_trip_and_mismatch(tmp_path):
    hf = tiny_hf_llama("mqa_tied")
    bundle = models.load("hf:" + save_hf(hf, tmp_path / "in"))
    models.save_orbax(bundle, str(tmp_path / "ckpt"))
    again = models.load("orbax:" + str(tmp_path / "ckpt"))
    for a, b in zip(jax.tree.leaves(bundle.params), jax.tree.leaves(again.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Same family, different width: the error names the key and both shapes.
    info_path = tmp_path / "ckpt" / "dpost_model.json"
    info = json.loads(info_path.read_text())
    info["config"]["intermediate_size"] = 70
    info_path.write_text(json.dumps(info))
    with pytest.raises(ValueError, match=r"mlp/(gate|up|down).*\(2, 32, 64\).*\(2, 32, 70\)|mlp/down.*\(2, 64, 32\)"):
        models.load("orbax:" + str(tmp_path / "ckpt"))


def test_smollm2_gguf_matches_transformers_gguf(smollm2_bundle):
    path = smollm2_path()
    folder, name = os.path.split(path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    with open(os.path.join(data_dir(), "gsm8k", "test.jsonl")) as f:
        questions = [json.loads(line)["question"] for _, line in zip(range(4), f)]
    for q in questions:
        ids = smollm2_bundle.tokenizer(q)["input_ids"]
        ref = torch_logits(hf, [ids])[0]
        ours, _ = smollm2_bundle.module.apply({"params": smollm2_bundle.params}, jnp.asarray([ids]))
        ours = np.asarray(ours[0])
        assert np.abs(ours - ref).max() <= 1e-3
        np.testing.assert_array_equal(ours.argmax(-1), ref.argmax(-1))


SHARDED_SCRIPT = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, jax.numpy as jnp, numpy as np
    from dpost import models, sharding
    from dpost.models.llama.model import LlamaConfig
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=8)
    ref = models.init_random("llama", cfg, seed=0)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sharded = models.init_random("llama", cfg, seed=0, mesh=mesh)
    spec = sharded.params["layers"]["attn"]["q"].sharding.spec
    assert spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None), spec
    assert len(sharded.params["embed"].sharding.device_set) == 8
    ids = np.random.RandomState(0).randint(0, 64, (4, 12))
    want, _ = ref.module.apply({"params": ref.params}, jnp.asarray(ids))
    with sharding.activation_rules(mesh):
        x = jax.device_put(ids, sharding.batch_sharding(mesh, 2))
        got, _ = jax.jit(lambda p, t: ref.module.apply({"params": p}, t))(sharded.params, x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
    print("OK", spec)
""")


def test_sharded_forward_equals_unsharded():
    out = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "OK" in out.stdout, out.stdout + out.stderr
