"""T5 family: logits, scoring, cached decoding and HF export against transformers (PyTorch, fp32).

Tiny random models are built with transformers, imported through the family's rule table and
compared with PyTorch's output. The sharded check runs in a child process with 8 simulated CPU
devices (the test process may already have initialised jax with one).
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import torch  # the independent reference: a missing one fails collection, also under CI
import transformers

from dpost.models import convert, scoring
from dpost.models.t5 import model as t5_model
from dpost.models.t5 import params as t5_params

# Tiny programs: LLVM optimisation costs more compile time than it saves at run time.
FAST_COMPILE = {"xla_backend_optimization_level": 0}
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CASES = {
    # Flan-T5 / v1.1 style: gated-gelu, untied head, odd head dim, deeper decoder, few buckets.
    "gated_untied": dict(
        vocab_size=64, d_model=24, d_kv=7, d_ff=40, num_layers=2, num_decoder_layers=3, num_heads=3,
        relative_attention_num_buckets=8, relative_attention_max_distance=20,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0,
    ),
    # Original T5: relu, tied + scaled head, deeper encoder, 32 buckets with a short max distance.
    "relu_tied": dict(
        vocab_size=50, d_model=16, d_kv=4, d_ff=32, num_layers=3, num_decoder_layers=2, num_heads=4,
        relative_attention_num_buckets=32, relative_attention_max_distance=12,
        feed_forward_proj="relu", tie_word_embeddings=True, decoder_start_token_id=0,
    ),
    # Equal depths, an odd bucket count and a start token that is not the pad token.
    "gated_start5": dict(
        vocab_size=40, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
        relative_attention_num_buckets=7, relative_attention_max_distance=10,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=5,
    ),
}

PROMPT_LENS = (12, 8, 5)  # left-padded to 12
COMPLETION_LENS = (9, 6, 3)  # right-padded to 9


def randomize_norms_and_biases(model):
    """Non-trivial layer norm scales and relative position biases (transformers initialises them to 1, ~0)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif "relative_attention_bias" in name:
                p.copy_(torch.randn_like(p))
    return model


@functools.lru_cache(maxsize=None)
def build(case: str, seed: int = 0):
    """(torch model, T5Config, dpost params) for a tiny random HF T5 with non-trivial norms/biases."""
    torch.manual_seed(seed)
    hf_cfg = transformers.T5Config(**CASES[case], dropout_rate=0.0, pad_token_id=0, eos_token_id=1)
    model = randomize_norms_and_biases(transformers.T5ForConditionalGeneration(hf_cfg).eval())
    with torch.no_grad():
        if not CASES[case]["tie_word_embeddings"]:  # transformers 5 ties lm_head in memory: untie it
            model.lm_head.weight = torch.nn.Parameter(0.3 * torch.randn_like(model.shared.weight))
    tensors = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    cfg = t5_params.settle_config(t5_params.config_from_hf(model.config.to_dict()), tensors.__getitem__, case)
    params = convert.import_params(
        t5_params.hf_rules(cfg), tensors.__getitem__, nn.unbox(abstract(cfg)), None, cfg.num_layers, case
    )
    return model, cfg, params


def abstract(cfg):
    return jax.eval_shape(lambda: t5_model.init_params(cfg, jax.random.key(0)))


def batch(cfg, seed: int = 1):
    """Left-padded prompts and right-padded completions (numpy int32) with their masks."""
    rng = np.random.default_rng(seed)
    pad = cfg.pad_token_id
    p_len, c_len = max(PROMPT_LENS), max(COMPLETION_LENS)
    prompt = np.full((len(PROMPT_LENS), p_len), pad, np.int32)
    prompt_mask = np.zeros_like(prompt)
    completion = np.full((len(COMPLETION_LENS), c_len), pad, np.int32)
    completion_mask = np.zeros_like(completion)
    for i, (p, c) in enumerate(zip(PROMPT_LENS, COMPLETION_LENS)):
        prompt[i, p_len - p :] = rng.integers(2, cfg.vocab_size, p)
        prompt_mask[i, p_len - p :] = 1
        completion[i, :c] = rng.integers(2, cfg.vocab_size, c)
        completion_mask[i, :c] = 1
    return prompt, prompt_mask, completion, completion_mask


def decoder_inputs(cfg, completion):
    start = np.full((completion.shape[0], 1), cfg.decoder_start_token_id, np.int32)
    return np.concatenate([start, completion[:, :-1]], axis=1)


def torch_logits(model, prompt, prompt_mask, decoder_input):
    with torch.no_grad():
        out = model(
            input_ids=torch.from_numpy(prompt).long(),
            attention_mask=torch.from_numpy(prompt_mask).long(),
            decoder_input_ids=torch.from_numpy(decoder_input).long(),
        )
    return out.logits.numpy()


@functools.lru_cache(maxsize=None)
def forward_fn(cfg):
    """One compiled program per config: (__call__ logits, completion_logits, completion token log-probs)."""
    module = t5_model.make_module(cfg)

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def forward(params, prompt, prompt_mask, completion, completion_mask):
        start = jnp.full((completion.shape[0], 1), cfg.decoder_start_token_id, completion.dtype)
        dec_in = jnp.concatenate([start, completion[:, :-1]], axis=1)
        full = module.apply({"params": params}, prompt, prompt_mask, dec_in)
        logits = module.apply(
            {"params": params}, prompt, prompt_mask, completion, completion_mask, method="completion_logits"
        )
        token_lp = scoring.completion_token_logprobs(module, params, prompt, prompt_mask, completion, completion_mask)
        return full, logits, token_lp

    return forward


@functools.lru_cache(maxsize=None)
def outputs(case: str):
    """dpost and PyTorch results on the standard batch: dict of numpy arrays."""
    model, cfg, params = build(case)
    prompt, prompt_mask, completion, completion_mask = batch(cfg)
    full, logits, token_lp = forward_fn(cfg)(params, prompt, prompt_mask, completion, completion_mask)
    ref = torch_logits(model, prompt, prompt_mask, decoder_inputs(cfg, completion))
    return dict(full=np.asarray(full), logits=np.asarray(logits), token_lp=np.asarray(token_lp), ref=ref)


@pytest.fixture(params=sorted(CASES))
def case(request):
    return request.param


def test_config_round_trip(case):
    model, cfg, _ = build(case)
    assert cfg == t5_params.config_from_hf(t5_params.config_to_hf(cfg))
    assert cfg.num_decoder_layers == model.config.num_decoder_layers
    assert cfg.tie_word_embeddings == CASES[case]["tie_word_embeddings"]
    assert cfg.scale_decoder_outputs == CASES[case]["tie_word_embeddings"]  # transformers 4's one flag
    hf = transformers.T5Config(**t5_params.config_to_hf(cfg))
    assert hf.scale_decoder_outputs == cfg.scale_decoder_outputs
    assert hf.is_gated_act == cfg.feed_forward_proj.startswith("gated")


FLAN_T5_BASE = {  # config.json of google/flan-t5-base (transformers 4.x)
    "architectures": ["T5ForConditionalGeneration"], "d_ff": 2048, "d_kv": 64, "d_model": 768,
    "decoder_start_token_id": 0, "dense_act_fn": "gelu_new", "dropout_rate": 0.1, "eos_token_id": 1,
    "feed_forward_proj": "gated-gelu", "is_encoder_decoder": True, "is_gated_act": True,
    "layer_norm_epsilon": 1e-06, "model_type": "t5", "n_positions": 512, "num_decoder_layers": 12,
    "num_heads": 12, "num_layers": 12, "pad_token_id": 0, "relative_attention_max_distance": 128,
    "relative_attention_num_buckets": 32, "tie_word_embeddings": False, "vocab_size": 32128,
}
T5_SMALL = {  # google-t5/t5-small: no feed_forward_proj / tie_word_embeddings keys (relu, tied)
    "architectures": ["T5ForConditionalGeneration"], "d_ff": 2048, "d_kv": 64, "d_model": 512,
    "decoder_start_token_id": 0, "dropout_rate": 0.1, "eos_token_id": 1, "layer_norm_epsilon": 1e-06,
    "model_type": "t5", "n_positions": 512, "num_heads": 8, "num_layers": 6, "pad_token_id": 0,
    "relative_attention_num_buckets": 32, "vocab_size": 32128,
}


def test_config_from_hub_configs():
    from dpost.models.registry import family_for_hf_config

    flan = t5_params.config_from_hf(FLAN_T5_BASE)
    assert family_for_hf_config(FLAN_T5_BASE, "flan").name == "t5"
    assert (flan.tie_word_embeddings, flan.feed_forward_proj, flan.num_decoder_layers) == (False, "gated-gelu", 12)
    names = {r.name for r in t5_params.hf_rules(flan)}
    assert {"lm_head.weight", "decoder.block.{layer}.layer.2.DenseReluDense.wi_1.weight"} <= names
    assert not flan.scale_decoder_outputs  # transformers 4: tie_word_embeddings implied the scaling
    # transformers 5 re-saves Flan-T5 declaring the head tied and unscaled (the tensors untie it: below).
    resaved = t5_params.config_from_hf(dict(FLAN_T5_BASE, tie_word_embeddings=True, scale_decoder_outputs=False))
    assert (resaved.tie_word_embeddings, resaved.scale_decoder_outputs) == (True, False)
    small = t5_params.config_from_hf(T5_SMALL)
    assert (small.tie_word_embeddings, small.feed_forward_proj, small.num_decoder_layers) == (True, "relu", 6)
    assert small.scale_decoder_outputs
    names = {r.name for r in t5_params.hf_rules(small)}
    assert "lm_head.weight" not in names and "encoder.block.{layer}.layer.1.DenseReluDense.wi.weight" in names


def test_params_layout(case):
    _, cfg, params = build(case)
    boxed = abstract(cfg)
    axes = nn.get_partition_spec(boxed)
    assert ("lm_head" in params) == (not cfg.tie_word_embeddings)
    assert tuple(axes["encoder"]["relpos"]) == ("relpos_buckets", "heads")
    assert params["encoder"]["relpos"].shape == (cfg.relative_attention_num_buckets, cfg.num_heads)
    assert tuple(axes["decoder"]["layers"]["cross_attn"]["q"]) == ("layers", "embed", "heads", "head_dim")
    assert params["encoder"]["layers"]["attn"]["q"].shape[0] == cfg.num_layers
    assert params["decoder"]["layers"]["self_attn"]["o"].shape == (
        cfg.num_decoder_layers, cfg.num_heads, cfg.d_kv, cfg.d_model
    )
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))


def test_logits_match_torch(case):
    _, cfg, _ = build(case)
    out = outputs(case)
    assert out["logits"].shape == (len(COMPLETION_LENS), max(COMPLETION_LENS), cfg.vocab_size)
    assert np.abs(out["full"] - out["ref"]).max() <= 1e-4
    assert np.abs(out["logits"] - out["ref"]).max() <= 1e-4


def test_left_padding_equals_unpadded(case):
    """Relative positions are slot differences: each left-padded row equals the row run without padding."""
    model, cfg, _ = build(case)
    prompt, _, completion, _ = batch(cfg)
    padded = outputs(case)["logits"]
    for i, p in enumerate(PROMPT_LENS):
        row = prompt[i : i + 1, prompt.shape[1] - p :]
        alone = torch_logits(model, row, np.ones_like(row), decoder_inputs(cfg, completion[i : i + 1]))
        assert np.abs(alone[0] - padded[i]).max() <= 1e-4


def test_completion_logprobs_match_torch(case):
    _, cfg, _ = build(case)
    _, _, completion, completion_mask = batch(cfg)
    out = outputs(case)
    ref = torch.log_softmax(torch.from_numpy(out["ref"]), -1)
    ref_lp = torch.gather(ref, -1, torch.from_numpy(completion).long()[..., None])[..., 0].numpy() * completion_mask
    assert np.all(out["token_lp"][completion_mask == 0] == 0)
    np.testing.assert_allclose(out["token_lp"].sum(-1), ref_lp.sum(-1), atol=1e-3, rtol=0)


def _prefill_and_decode(cfg, params, prompt, prompt_mask, teacher_tokens, max_new_tokens, num_samples):
    """Prefill, then decode_step over teacher_tokens [B*n, T] inside lax.scan (the state must keep
    fixed shapes, as in the sampler's while_loop). -> logits [B*n, T+1, V], final state."""
    module = t5_model.make_module(cfg)

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def run(params, prompt, prompt_mask, teacher_tokens):
        logits0, state = module.apply(
            {"params": params}, prompt, prompt_mask, max_new_tokens, num_samples, method="prefill"
        )

        def step(state, tokens):
            logits, new_state = module.apply({"params": params}, tokens, state, method="decode_step")
            assert jax.tree.map(lambda a: (a.shape, a.dtype), new_state) == jax.tree.map(
                lambda a: (a.shape, a.dtype), state
            )
            return new_state, logits

        state, logits = jax.lax.scan(step, state, teacher_tokens.T)
        return jnp.concatenate([logits0[:, None], jnp.moveaxis(logits, 0, 1)], axis=1), state

    return run(params, prompt, prompt_mask, teacher_tokens)


def test_prefill_decode_match_torch(case):
    model, cfg, params = build(case)
    prompt, prompt_mask, completion, _ = batch(cfg)
    n, c = 2, completion.shape[1]
    ref = np.repeat(torch_logits(model, prompt, prompt_mask, decoder_inputs(cfg, completion)), n, axis=0)
    # Like Llama, up to max_new_tokens decode steps may follow prefill: C - 1 steps fill the cache exactly.
    max_new = c - 1
    logits, state = _prefill_and_decode(cfg, params, prompt, prompt_mask, np.repeat(completion, n, 0)[:, :-1], max_new, n)
    assert logits.shape == ref.shape
    assert np.abs(np.asarray(logits) - ref).max() <= 1e-4
    assert state["index"].tolist() == [max_new + 1] * (len(prompt) * n)  # per row
    assert len(state["cache"]) == cfg.num_decoder_layers  # one buffer per layer
    assert state["cache"][0]["k"].shape == (len(prompt) * n, max_new + 1, cfg.num_heads, cfg.d_kv)
    assert state["cross_kv"][-1]["v"].shape == (len(prompt) * n, prompt.shape[1], cfg.num_heads, cfg.d_kv)
    assert state["enc_mask"].shape == (len(prompt) * n, prompt.shape[1])


def test_export_round_trip(case, tmp_path):
    from safetensors.numpy import save_file

    model, cfg, params = build(case)
    tensors = convert.export_tensors(t5_params.hf_rules(cfg), params, cfg.num_layers)
    assert ("lm_head.weight" in tensors) == (not cfg.tie_word_embeddings)
    assert f"decoder.block.{cfg.num_decoder_layers - 1}.layer.1.EncDecAttention.o.weight" in tensors
    assert f"encoder.block.{cfg.num_layers - 1}.layer.1.layer_norm.weight" in tensors
    reference = model.state_dict()
    for name, value in tensors.items():
        np.testing.assert_array_equal(value, reference[name].numpy(), err_msg=name)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(t5_params.config_to_hf(cfg)))
    loaded = transformers.AutoModelForSeq2SeqLM.from_pretrained(str(tmp_path)).eval()
    loaded_tensors = {k: v.detach().numpy() for k, v in loaded.state_dict().items()}
    assert t5_params.settle_config(t5_params.config_from_hf(loaded.config.to_dict()), loaded_tensors.__getitem__, "") == cfg

    prompt, prompt_mask, completion, completion_mask = batch(cfg, seed=3)
    dec_in = decoder_inputs(cfg, completion)
    ref = torch_logits(model, prompt, prompt_mask, dec_in)
    assert np.abs(torch_logits(loaded, prompt, prompt_mask, dec_in) - ref).max() <= 1e-5
    _, ours, _ = forward_fn(cfg)(params, prompt, prompt_mask, completion, completion_mask)
    assert np.abs(np.asarray(ours) - ref).max() <= 1e-4


# -- the head's two facts, through files transformers writes -----------------------------------------

HEAD_BASE = dict(
    vocab_size=48, d_model=16, d_kv=4, d_ff=24, num_layers=2, num_decoder_layers=1, num_heads=2,
    relative_attention_num_buckets=8, relative_attention_max_distance=16, feed_forward_proj="gated-gelu",
    dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
)
HEADS = [(True, True), (True, False), (False, True), (False, False)]  # (tied, scaled)


def saved_hf_t5(folder, tied: bool, scaled: bool, seed: int = 0):
    """A tiny gated-GELU T5 made and saved by transformers with this head; returns the model reloaded
    from the folder (the reference)."""
    torch.manual_seed(seed)
    # T5Config(tie_word_embeddings=False) is transformers 5's way to an unscaled head (still tied).
    hf_cfg = transformers.T5Config(**HEAD_BASE, tie_word_embeddings=scaled)
    hf_cfg.tie_word_embeddings = tied  # a separate lm_head (and, in transformers 5, stack embeddings)
    model = randomize_norms_and_biases(transformers.T5ForConditionalGeneration(hf_cfg))
    with torch.no_grad():
        if not tied:  # one input embedding, as in every released T5 (separate ones are refused: below)
            model.encoder.embed_tokens.weight.copy_(model.shared.weight)
            model.decoder.embed_tokens.weight.copy_(model.shared.weight)
            model.lm_head.weight.copy_(0.3 * torch.randn_like(model.shared.weight))
    model.save_pretrained(folder)
    return transformers.T5ForConditionalGeneration.from_pretrained(folder).eval()


def assert_loads_like(folder, reference, tied: bool, scaled: bool, seed: int):
    """models.load reads the head's two facts and gives the reference's logits; -> (bundle, batch, logits)."""
    from dpost import models

    bundle = models.load(f"hf:{folder}")
    assert (bundle.config.tie_word_embeddings, bundle.config.scale_decoder_outputs) == (tied, scaled)
    assert ("lm_head" in bundle.params) == (not tied)
    prompt, prompt_mask, completion, completion_mask = batch(bundle.config, seed=seed)
    ref = torch_logits(reference, prompt, prompt_mask, decoder_inputs(bundle.config, completion))
    _, ours, _ = forward_fn(bundle.config)(bundle.params, prompt, prompt_mask, completion, completion_mask)
    assert np.abs(np.asarray(ours) - ref).max() <= 1e-4
    return bundle, (prompt, prompt_mask, completion), ref


@pytest.mark.parametrize("tied,scaled", HEADS)
def test_head_facts_load_and_export_match_transformers(tied, scaled, tmp_path):
    from dpost import models

    reference = saved_hf_t5(tmp_path / "hf", tied, scaled)
    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert written["scale_decoder_outputs"] == scaled
    assert (reference.lm_head.weight.data_ptr() == reference.shared.weight.data_ptr()) == tied

    bundle, (prompt, prompt_mask, completion), ref = assert_loads_like(tmp_path / "hf", reference, tied, scaled, 4)
    models.export_hf(bundle, str(tmp_path / "out"))
    exported = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (exported["tie_word_embeddings"], exported["scale_decoder_outputs"]) == (tied, scaled)
    reloaded = transformers.T5ForConditionalGeneration.from_pretrained(str(tmp_path / "out")).eval()
    assert reloaded.config.scale_decoder_outputs == scaled
    assert (reloaded.lm_head.weight.data_ptr() == reloaded.shared.weight.data_ptr()) == tied
    assert np.abs(torch_logits(reloaded, prompt, prompt_mask, decoder_inputs(bundle.config, completion)) - ref).max() <= 1e-5
    assert models.load(f"hf:{tmp_path / 'out'}").config == bundle.config


@pytest.mark.parametrize("tied", [True, False])
def test_transformers4_config_one_flag_for_both(tied, tmp_path):
    """A config.json without scale_decoder_outputs (transformers 4): tie_word_embeddings is both facts."""
    reference = saved_hf_t5(tmp_path, tied, tied)
    hf = json.loads((tmp_path / "config.json").read_text())
    del hf["scale_decoder_outputs"]
    (tmp_path / "config.json").write_text(json.dumps(hf))
    assert_loads_like(tmp_path, reference, tied, tied, 5)


def test_resaved_untied_head_declared_tied(tmp_path):
    """transformers 5 re-saves an untied Flan-T5 with tie_word_embeddings=true and a distinct
    lm_head.weight; it unties on load, and so must dpost."""
    saved_hf_t5(tmp_path / "first", tied=False, scaled=False).save_pretrained(tmp_path / "resaved")
    assert json.loads((tmp_path / "resaved" / "config.json").read_text())["tie_word_embeddings"] is True
    reference = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "resaved").eval()
    assert_loads_like(tmp_path / "resaved", reference, False, False, 6)


def test_separate_stack_embedding_refused(tmp_path):
    from safetensors.numpy import load_file, save_file

    from dpost import models

    saved_hf_t5(tmp_path, tied=False, scaled=False)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    tensors["decoder.embed_tokens.weight"] = tensors["decoder.embed_tokens.weight"] + 1.0
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"'decoder\.embed_tokens\.weight' differs from 'shared\.weight'"):
        models.load(f"hf:{tmp_path}")


def test_bf16_compute_smoke():
    _, cfg, params = build("gated_untied")
    prompt, prompt_mask, completion, completion_mask = batch(cfg)
    ref = outputs("gated_untied")["logits"]
    cfg16 = cfg.replace(dtype="bfloat16")
    full, logits, token_lp = forward_fn(cfg16)(params, prompt, prompt_mask, completion, completion_mask)
    assert logits.dtype == jnp.bfloat16 and full.dtype == jnp.bfloat16
    assert token_lp.dtype == jnp.float32 and np.isfinite(np.asarray(token_lp)).all()
    logits = np.asarray(logits, np.float32)
    assert np.isfinite(logits).all()
    assert np.abs(logits - ref).max() <= 0.05 * np.abs(ref).max()
    # The sampler's state keeps the compute dtype (shapes only: no second compile).
    module = t5_model.make_module(cfg16)
    _, state = jax.eval_shape(
        lambda p: module.apply({"params": p}, prompt, prompt_mask, 4, 2, method="prefill"), params
    )
    assert state["cache"][0]["k"].dtype == jnp.bfloat16 and state["cross_kv"][0]["k"].dtype == jnp.bfloat16
    assert state["index"].dtype == jnp.int32 and state["index"].shape == (len(prompt) * 2,)


# -- sharded forward on 8 simulated CPU devices (child process) ---------------------------------------

SHARDED_CHILD = textwrap.dedent(
    """
    import json, sys
    import jax, jax.numpy as jnp, numpy as np, flax.linen as nn
    from dpost import sharding
    from dpost.models.registry import get_family

    family_name, config_kwargs = sys.argv[1], json.loads(sys.argv[2])
    assert len(jax.devices()) == 8, jax.devices()
    family = get_family(family_name)
    config = family.config_class()(**config_kwargs)
    module = family.make_module(config)
    boxed = jax.eval_shape(lambda: family.init_params(config, jax.random.key(0)))
    # Random values straight from numpy: compiling the RNG-heavy flax init costs more than the test.
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: (0.2 * rng.standard_normal(x.shape)).astype(np.float32), nn.unbox(boxed))
    b, p, c, n = 4, 10, 6, 2
    prompt = rng.integers(2, config.vocab_size, (b, p)).astype(np.int32)
    prompt_mask = np.ones((b, p), np.int32)
    prompt_mask[1, :3] = 0
    prompt_mask[3, :6] = 0
    completion = rng.integers(2, config.vocab_size, (b, c)).astype(np.int32)
    completion_mask = np.ones((b, c), np.int32)
    completion_mask[2, 4:] = 0

    def forward(params, prompt, prompt_mask, completion, completion_mask):
        logits = module.apply({"params": params}, prompt, prompt_mask, completion, completion_mask,
                              method="completion_logits")
        first, state = module.apply({"params": params}, prompt, prompt_mask, c, n, method="prefill")
        tokens = jnp.repeat(completion[:, 0], n)
        second, state = module.apply({"params": params}, tokens, state, method="decode_step")
        return logits, first, second

    expected = jax.jit(forward)(params, prompt, prompt_mask, completion, completion_mask)

    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    shardings = sharding.param_shardings(boxed, mesh)
    sharded = jax.device_put(params, shardings)
    specs = {"/".join(str(getattr(k, "key", k)) for k in path): str(x.sharding.spec)
             for path, x in jax.tree_util.tree_flatten_with_path(sharded)[0]}
    batch_arrays = [jax.device_put(x, sharding.batch_sharding(mesh, x.ndim))
                    for x in (prompt, prompt_mask, completion, completion_mask)]
    with sharding.activation_rules(mesh):
        got = jax.jit(forward)(sharded, *batch_arrays)
    diffs = [float(np.abs(np.asarray(g) - np.asarray(e)).max()) for g, e in zip(got, expected)]
    n_sharded = sum(len(x.sharding.device_set) == 8 and not x.sharding.is_fully_replicated
                    for x in jax.tree.leaves(sharded))
    print("RESULT " + json.dumps({"diffs": diffs, "specs": specs, "n_sharded": n_sharded}))
    """
)


def start_sharded_child(family: str, config_kwargs: dict) -> subprocess.Popen:
    """Starts SHARDED_CHILD for one family on 8 simulated CPU devices (collect with sharded_child_result)."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.Popen(
        [sys.executable, "-c", SHARDED_CHILD, family, json.dumps(config_kwargs)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO,
    )


def sharded_child_result(proc: subprocess.Popen, timeout: int = 180) -> dict:
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
    assert proc.returncode == 0, stderr[-4000:]
    line = [l for l in stdout.splitlines() if l.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def run_sharded_child(family: str, config_kwargs: dict, timeout: int = 180) -> dict:
    """Runs SHARDED_CHILD for one family synchronously; returns its RESULT dict."""
    return sharded_child_result(start_sharded_child(family, config_kwargs), timeout)


SHARDED_CASES = {
    "t5": dict(
        vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=3, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=16,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False,
    ),
}


@pytest.fixture(scope="module", autouse=True)
def sharded_children():
    """Starts the 8-device children when this module starts, so they overlap the other tests."""
    procs = {family: start_sharded_child(family, kwargs) for family, kwargs in SHARDED_CASES.items()}
    yield procs
    for proc in procs.values():  # only ours, by handle; normally already finished
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.mark.parametrize("family", sorted(SHARDED_CASES))
def test_sharded_forward_matches_unsharded(family, sharded_children):
    result = sharded_child_result(sharded_children[family])
    assert max(result["diffs"]) <= 1e-5, result["diffs"]
    assert result["n_sharded"] > 0
    if family == "t5":
        specs = result["specs"]
        assert "tensor" in specs["decoder/layers/cross_attn/q"] and "fsdp" in specs["decoder/layers/cross_attn/q"]
        assert "tensor" in specs["embed"]
