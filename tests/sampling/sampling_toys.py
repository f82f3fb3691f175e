"""Toys for the sampler tests: tiny tokenizers (byte-level BPE, SentencePiece-style unigram), tiny
HF Llama models, and a scripted language model that "wants" to write a fixed text."""

from __future__ import annotations

import dataclasses
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpost.models.bundle import ModelBundle

# -- tokenizers -------------------------------------------------------------------------------------


def byte_bpe_tokenizer():
    """GPT-2 style byte-level BPE: single bytes plus merges for '<<', '>>', ' <<', '==' and '=<<'."""
    import tokenizers
    import transformers
    from tokenizers import decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_to_char = _bytes_to_unicode()
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for b in range(256):
        vocab[byte_to_char[b]] = len(vocab)
    assert set(byte_to_char.values()) == set(alphabet)
    merges = [("<", "<"), (">", ">"), ("Ġ", "<<"), ("=", "="), ("=", "<<")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def sentencepiece_tokenizer():
    """T5-like unigram tokenizer with '▁' word-boundary pieces ('▁[', '▁24', ']', ...)."""
    import tokenizers
    import transformers
    from tokenizers import decoders, models, pre_tokenizers

    pieces = ["<pad>", "</s>", "<unk>", "▁"]
    chars = list("0123456789.,[]=/*+-$%()abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ?!:'")
    pieces += chars
    pieces += ["▁" + c for c in chars]
    pieces += ["▁" + str(n) for n in range(10, 100)]
    pieces += ["▁" + w for w in ("He", "has", "apples", "so", "the", "answer", "is", "sold", "in", "total")]
    vocab = [(p, 0.0) if i < 3 else (p, -1.0) for i, p in enumerate(pieces)]
    tok = tokenizers.Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


# -- scripted model ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ScriptConfig:
    vocab_size: int
    eos_token_id: int
    pad_token_id: int


class ScriptedLM(nn.Module):
    """A language model whose next-token distribution at step t of the completion strongly prefers
    scripts[k][t], where k is chosen by the prompt's last token (k = last token - first_key).

    It implements the family interface (prefill / decode_step / completion_logits) honestly: logits
    are a function of (script, step) only, forced tokens included, so log-probs can be compared with
    `models.sequence_logprobs`. A trainable bias keeps `params` a real pytree argument.
    """

    scripts: tuple  # tuple of tuples of token ids (padded with eos)
    vocab: int
    first_key: int
    margin: float = 6.0

    def setup(self):
        self.bias = self.param("bias", nn.initializers.zeros, (self.vocab,), jnp.float32)

    def _table(self):
        return jnp.asarray(np.array(self.scripts, np.int32))

    def _logits(self, script_index, pos):
        table = self._table()
        pos = jnp.minimum(pos, table.shape[1] - 1)
        want = table[script_index, pos]
        # A smooth background so every token has a finite, distinct log-prob.
        background = 0.01 * jnp.sin(jnp.arange(self.vocab, dtype=jnp.float32))
        return background + self.margin * jax.nn.one_hot(want, self.vocab) + self.bias

    def _script_index(self, prompt):
        return jnp.clip(prompt[:, -1] - self.first_key, 0, len(self.scripts) - 1)

    def prefill(self, prompt, prompt_mask, max_new_tokens, num_samples=1):
        k = jnp.repeat(self._script_index(prompt), num_samples)
        state = {"script": k, "pos": jnp.ones_like(k)}
        return self._logits(k, jnp.zeros_like(k)), state

    def decode_step(self, tokens, state):
        logits = self._logits(state["script"], state["pos"])
        return logits, {"script": state["script"], "pos": state["pos"] + 1}

    def completion_logits(self, prompt, prompt_mask, completion, completion_mask):
        b, c = completion.shape
        k = self._script_index(prompt)
        pos = jnp.broadcast_to(jnp.arange(c), (b, c))
        return jax.vmap(lambda kk, pp: self._logits(jnp.full((c,), kk), pp))(k, pos)


def scripted_bundle(family: str, tokenizer, texts: list) -> tuple[ModelBundle, list[list[int]]]:
    """Bundle whose model wants to write texts[k] (then EOS) after prompt k; returns prompts too.

    A text may also be given as a list of token ids (to script a non-canonical tokenization)."""
    eos = tokenizer.eos_token_id
    scripts = [(list(t) if not isinstance(t, str) else tokenizer.encode(t, add_special_tokens=False)) + [eos]
               for t in texts]
    width = max(len(s) for s in scripts)
    scripts = tuple(tuple(s + [eos] * (width - len(s))) for s in scripts)
    vocab = len(tokenizer)
    first_key = 3
    module = ScriptedLM(scripts, vocab, first_key)
    params = module.init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32), jnp.ones((1, 2), jnp.int32), 4, 1,
                         method="prefill")["params"]
    cfg = ScriptConfig(vocab, eos, tokenizer.pad_token_id)
    prompts = [[first_key + k] for k in range(len(texts))]
    return ModelBundle(family, module, params, tokenizer, cfg, source="scripted"), prompts


# -- tiny HF llama ----------------------------------------------------------------------------------


def tiny_hf_llama(folder, vocab: int = 101, seed: int = 0, **overrides):
    """A random transformers LlamaForCausalLM with grouped-query attention, saved to `folder`."""
    import torch
    import transformers

    torch.manual_seed(seed)
    kw = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=6,
              num_key_value_heads=2, head_dim=8, rope_theta=10000.0, tie_word_embeddings=False,
              vocab_size=vocab, rms_norm_eps=1e-5, max_position_embeddings=512,
              bos_token_id=1, eos_token_id=2, pad_token_id=0)
    kw.update(overrides)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw)).eval()
    # Sharpen the output head so greedy decoding has clear winners (no near-ties across frameworks).
    with torch.no_grad():
        model.lm_head.weight.mul_(4.0)
    model.save_pretrained(str(folder))
    return model


def tiny_hf_t5(folder, vocab: int, eos: int = 1, pad: int = 0):
    """A random transformers T5 (gated-GELU, untied head), saved to `folder`."""
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=vocab, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2,
                                num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=20,
                                feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0,
                                decoder_start_token_id=pad, pad_token_id=pad, eos_token_id=eos)
    model = transformers.T5ForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # a sharper head: clear greedy winners, and EOS somewhere in some rows
        model.lm_head.weight = torch.nn.Parameter(2.0 * torch.randn_like(model.shared.weight))
    model.save_pretrained(str(folder))
    return model


@pytest.fixture(scope="module")
def fast_compile():
    """Tiny models: compile the sampler's programs without LLVM optimisation (faster tests); a test
    module opts in with an autouse fixture that requests this one."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DPOST_SAMPLER_FAST_COMPILE", "1")
        yield


def run_on_8_devices(script: str, check: bool = True):
    """Runs `script` in a subprocess (XLA_FLAGS must be set before jax is imported; the script does)
    with this folder as argv[1] and the repository on the path; with `check` it must print OK.
    Returns the finished process (stdout, stderr as text)."""
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(os.path.dirname(here))
    env = dict(os.environ, DPOST_SAMPLER_FAST_COMPILE="1",
               PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", script, here], capture_output=True, text=True, timeout=900, env=env)
    if check:
        assert out.returncode == 0 and "OK" in out.stdout, out.stdout[-3000:] + out.stderr[-5000:]
    return out


def assert_same_samples(got, want, context) -> None:
    """Same token ids per prompt and sample, log-probs within fp32 rounding."""
    assert [[s.token_ids for s in p] for p in got] == [[s.token_ids for s in p] for p in want], context
    a = np.concatenate([s.token_logprobs for p in got for s in p])
    b = np.concatenate([s.token_logprobs for p in want for s in p])
    np.testing.assert_allclose(a, b, atol=1e-4)


def random_prompts(n: int, vocab: int, rng: np.random.RandomState, low: int = 3, high: int = 30):
    return [rng.randint(3, vocab, rng.randint(low, high)).tolist() for _ in range(n)]


def gsm8k_questions(data_dir: str, n: int) -> list[str]:
    with open(os.path.join(data_dir, "gsm8k", "test.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [r["question"] for r in rows[:n]]
