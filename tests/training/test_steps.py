"""SFT and DPO steps against transformers/PyTorch on the same weights, and step invariances
(reference paths, gradient accumulation, remat, bf16 compute, one compiled program) on models
dpost initialises itself, which need no torch."""

from __future__ import annotations

import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
import training_helpers as th  # noqa: E402

from dpost import training  # noqa: E402
from tests.conftest import reference  # noqa: E402


def torch_reference():
    """torch, for the parity tests (transformers' models are built with it)."""
    reference("transformers")
    return reference("torch")


def sgd(lr=1.0):
    cfg = training.OptimizerConfig(learning_rate=lr, total_steps=10, kind="sgd", schedule="constant",
                                   max_grad_norm=None)
    return training.make_optimizer(cfg), training.make_schedule(cfg)


# ------------------------------------------------------------------------------------------------
# PyTorch references
# ------------------------------------------------------------------------------------------------
def torch_token_logps(family, model, prompt, prompt_mask, completion, completion_mask):
    """[B, C] log-probs of completion tokens (0 at padding), transformers model, fp32."""
    torch = torch_reference()
    prompt, prompt_mask = torch.from_numpy(prompt).long(), torch.from_numpy(prompt_mask).long()
    completion, completion_mask = torch.from_numpy(completion).long(), torch.from_numpy(completion_mask).long()
    if family == "llama":
        p = prompt.shape[1]
        ids = torch.cat([prompt, completion], 1)
        mask = torch.cat([prompt_mask, completion_mask], 1)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, p - 1 : -1]
    else:
        start = torch.full((completion.shape[0], 1), model.config.decoder_start_token_id, dtype=torch.long)
        dec = torch.cat([start, completion[:, :-1]], 1)
        logits = model(input_ids=prompt, attention_mask=prompt_mask, decoder_input_ids=dec).logits
    logp = torch.log_softmax(logits.float(), -1).gather(-1, completion[..., None])[..., 0]
    return logp * completion_mask


def hf_model(family, **kw):
    torch_reference()
    if family == "llama":
        return th.hf_llama(0, **kw)
    return th.hf_t5(0)


def vocab_of(model):
    return model.config.vocab_size


# ------------------------------------------------------------------------------------------------
# SFT loss parity
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family,tied", [("llama", False), ("llama", True), ("t5", False)])
def test_sft_loss_matches_transformers(family, tied):
    torch = torch_reference()
    model = hf_model(family, **({"tie_word_embeddings": True} if tied else {}))
    module, cfg, params, _ = th.import_hf(family, model)
    batch = th.sft_batch(3, batch=4, vocab=vocab_of(model))
    # the eval step runs the train step's loss code (sft_token_logprobs + masked_nll), forward only;
    # the train step's own `loss` metric is checked against it in test_grad_accumulation_equals_full_batch
    sums = training.make_sft_eval_step(module)(params, batch)
    metrics = {"loss": sums["nll_sum"] / sums["tokens"], "tokens": sums["tokens"]}

    prompt, completion = torch.from_numpy(batch["prompt"]).long(), torch.from_numpy(batch["completion"]).long()
    prompt_mask = torch.from_numpy(batch["prompt_mask"]).long()
    completion_mask = torch.from_numpy(batch["completion_mask"]).long()
    labels = completion.masked_fill(completion_mask == 0, -100)
    with torch.no_grad():
        if family == "llama":
            ids = torch.cat([prompt, completion], 1)
            mask = torch.cat([prompt_mask, completion_mask], 1)
            full_labels = torch.cat([torch.full_like(prompt, -100), labels], 1)
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            loss = model(input_ids=ids, attention_mask=mask, position_ids=pos, labels=full_labels).loss
        else:
            loss = model(input_ids=prompt, attention_mask=prompt_mask, labels=labels).loss
    assert abs(float(metrics["loss"]) - loss.item()) < 1e-4
    assert float(metrics["tokens"]) == batch["completion_mask"].sum()


# ------------------------------------------------------------------------------------------------
# DPO step parity with a hand-written PyTorch step on the transformers model
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "t5"])
def test_dpo_step_matches_pytorch(family):
    torch = torch_reference()
    model = hf_model(family)
    module, cfg, params, _ = th.import_hf(family, model)
    batch = th.pair_batch(5, batch=4, vocab=vocab_of(model))
    ref_params = jax.tree.map(jnp.copy, params)
    ref_before = jax.tree.map(np.asarray, ref_params)
    params_before = th.export_to_torch_names(family, cfg, params)
    lr, beta = 1.0, 0.1

    tx, sched = sgd(lr)
    step = training.make_dpo_step(module, tx, training.DPOConfig(beta=beta), lr_schedule=sched)
    state, metrics = step(training.create_train_state(params, tx), batch, ref_params)
    after = th.export_to_torch_names(family, cfg, state.params)

    # PyTorch: policy = the transformers model, reference = a frozen copy.
    import copy

    policy = copy.deepcopy(model).train()
    reference = copy.deepcopy(model).eval()
    with torch.no_grad():
        ref_c = torch_token_logps(family, reference, batch["prompt"], batch["prompt_mask"], batch["chosen"],
                                  batch["chosen_mask"]).sum(-1)
        ref_r = torch_token_logps(family, reference, batch["prompt"], batch["prompt_mask"], batch["rejected"],
                                  batch["rejected_mask"]).sum(-1)
    pol_c = torch_token_logps(family, policy, batch["prompt"], batch["prompt_mask"], batch["chosen"],
                              batch["chosen_mask"]).sum(-1)
    pol_r = torch_token_logps(family, policy, batch["prompt"], batch["prompt_mask"], batch["rejected"],
                              batch["rejected_mask"]).sum(-1)
    loss = -torch.nn.functional.logsigmoid(beta * ((pol_c - ref_c) - (pol_r - ref_r))).mean()
    loss.backward()
    with torch.no_grad():
        for p in policy.parameters():
            if p.grad is not None:
                p -= lr * p.grad
    torch_after = {k: v.detach().numpy() for k, v in policy.state_dict().items()}

    assert abs(float(metrics["loss"]) - loss.item()) < 1e-5
    np.testing.assert_allclose(float(metrics["logps/chosen"]), pol_c.mean().item(), rtol=1e-5)
    # policy == reference at this step: the margin is 0 up to fp32 rounding of summed log-probs (~1e-6)
    np.testing.assert_allclose(float(metrics["rewards/margins"]),
                               (beta * ((pol_c - ref_c) - (pol_r - ref_r))).mean().item(), rtol=1e-4, atol=2e-6)
    changed = 0
    for name, new in after.items():
        d_jax = new - params_before[name]
        d_torch = torch_after[name] - params_before[name]
        scale = np.linalg.norm(d_torch)
        assert np.linalg.norm(d_jax - d_torch) <= 1e-4 * max(scale, 1e-12), name
        changed += scale > 0
    assert changed >= len(after) - 1  # every policy tensor moved
    # the reference is untouched (and still alive: it was not donated)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), ref_params, ref_before)


# ------------------------------------------------------------------------------------------------
# invariances
# ------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def llama():
    return th.init_model("llama", 0)


@functools.lru_cache(maxsize=None)
def shared_sgd():
    return sgd(1.0)


@functools.lru_cache(maxsize=None)
def shared_step(kind: str, grad_accum: int = 1, **dpo):
    """Steps shared between tests (one jit object, so one compilation per shape)."""
    module = llama()[0]
    tx, sched = shared_sgd()
    if kind == "sft":
        return training.make_sft_step(module, tx, lr_schedule=sched, grad_accum=grad_accum)
    return training.make_dpo_step(module, tx, training.DPOConfig(**dpo), lr_schedule=sched, grad_accum=grad_accum)


def fresh_state():
    return training.create_train_state(llama()[2], shared_sgd()[0])


def _params_close(a, b, rtol=1e-5, atol=1e-7):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol), a, b)


def test_reference_in_step_equals_precomputed():
    """Same losses, metrics and gradients (SGD, lr 1: the update is the gradient) either way."""
    module, cfg, params, _ = llama()
    batch = th.pair_batch(7, batch=4)
    dpo = dict(loss_type="ipo", rpo_alpha=0.5)  # exercises the length normalisation and the NLL term
    ref_params = jax.tree.map(lambda x: x + 0.01, params)  # a reference that differs from the policy
    s1, m1 = shared_step("dpo", **dpo)(fresh_state(), batch, ref_params)
    rc, rr = training.make_reference_fn(module)(ref_params, batch)
    pre = shared_step("dpo", reference="precomputed", **dpo)
    s2, m2 = pre(fresh_state(), dict(batch, ref_chosen_logps=np.asarray(rc), ref_rejected_logps=np.asarray(rr)))
    for k in training.DPO_METRICS + ("nll",):
        np.testing.assert_allclose(float(m1[k]), float(m2[k]), rtol=1e-6, atol=2e-6, err_msg=k)
    _params_close(s1.params, s2.params, rtol=1e-6, atol=1e-8)
    assert float(m1["nll"]) > 0 and float(m1["rewards/chosen"]) != 0


def test_dpo_stage_scores_only_the_missing_reference_sides():
    """The DPO stage scores the reference log-probs the sampler did not harvest (gold rationales,
    earlier rounds), side by side: each (pair, side) gets transformers' summed completion log-prob."""
    import types

    from dpost import stages

    torch = torch_reference()
    module, _, params, _ = th.tiny_llama(0)
    batch = th.pair_batch(11, batch=5, chosen_len=12, rejected_len=12)  # one width, as the stage pads them
    wanted = [(0, "chosen"), (3, "chosen"), (1, "rejected"), (4, "rejected"), (3, "rejected")]
    bundle = types.SimpleNamespace(module=module, params=params)
    got = stages._score_sides(bundle, batch, wanted, batch_size=2)  # 3 batches, the last one filled
    hf = th.hf_llama()
    for (i, side), score in zip(wanted, got):
        prompt = batch["prompt"][i][batch["prompt_mask"][i] == 1]
        completion = batch[side][i][batch[side + "_mask"][i] == 1]
        ids = torch.tensor(np.concatenate([prompt, completion])[None].astype(np.int64))
        with torch.no_grad():
            logp = torch.log_softmax(hf(ids).logits[0, :-1].double(), -1)
        expected = logp[len(prompt) - 1:].gather(-1, ids[0, len(prompt):, None]).sum().item()
        np.testing.assert_allclose(score, expected, rtol=1e-4, err_msg=f"{side} of pair {i}")


def test_sft_step_loss_and_filler_rows():
    """The SFT step's loss is the eval step's token-mean NLL (checked against transformers above);
    DPO filler rows (valid 0) do not count, whatever they hold. Gradient accumulation == the full
    batch is checked in sharded_check.py (single device, grad_accum 1 vs 8 devices, grad_accum 2)."""
    _, _, params, _ = llama()
    sft = th.sft_batch(11, batch=8)
    s1, m1 = shared_step("sft")(fresh_state(), sft)
    assert float(m1["tokens"]) == sft["completion_mask"].sum()
    sums = training.make_sft_eval_step(llama()[0])(params, sft)
    np.testing.assert_allclose(float(m1["loss"]), float(sums["nll_sum"] / sums["tokens"]), rtol=1e-6)

    pairs = dict(th.pair_batch(12, batch=4), valid=np.array([1, 1, 0, 1], np.int32))
    ref = jax.tree.map(lambda x: x * 1.01, params)
    d1, n1 = shared_step("dpo")(fresh_state(), pairs, ref)
    other = dict(pairs, chosen=np.where(np.arange(4)[:, None] == 2, 5, pairs["chosen"]))
    d3, n3 = shared_step("dpo")(fresh_state(), other, ref)
    for k in training.DPO_METRICS:
        np.testing.assert_allclose(float(n1[k]), float(n3[k]), rtol=1e-6, atol=2e-6, err_msg=k)
    _params_close(d1.params, d3.params, rtol=1e-6, atol=1e-9)
    # and the mean is over the 3 valid pairs: rewards/accuracies is a multiple of 1/3
    assert round(float(n1["rewards/accuracies"]) * 3, 4) == round(float(n1["rewards/accuracies"]) * 3)


def test_remat_and_bf16_compute():
    from dpost.models.llama import model as lm

    module, cfg, params, _ = llama()
    batch = th.pair_batch(14, batch=4)
    tx, sched = shared_sgd()
    out = {"base": shared_step("dpo")(fresh_state(), batch, params)}
    for name, c in {"remat": cfg.replace(remat=True), "bf16": cfg.replace(dtype="bfloat16")}.items():
        step = training.make_dpo_step(lm.make_module(c), tx, training.DPOConfig(), lr_schedule=sched)
        out[name] = step(fresh_state(), batch, params)
    _params_close(out["base"][0].params, out["remat"][0].params, rtol=1e-5, atol=1e-7)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(out["bf16"][0].params))  # fp32 masters
    np.testing.assert_allclose(float(out["bf16"][1]["logps/chosen"]), float(out["base"][1]["logps/chosen"]),
                               rtol=2e-2)


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_bf16_params_cast_up_front_as_accurate_as_per_matmul_casts(family, monkeypatch):
    """Training casts the matrices to the compute dtype once per forward (`layers.compute_params`):
    against the fp32 loss and gradients, that is as accurate as casting inside each matmul (the
    same bf16 operands; XLA's CPU backend may fold the casts of either form differently, so the two
    are compared with fp32, not bit for bit), and the gradients stay fp32."""
    from dpost.models import layers
    from dpost.training import steps

    m, _ = th.family_modules(family)
    _, cfg, params, _ = th.init_model(family, 0)
    batch = th.sft_batch(21, batch=4, vocab=cfg.vocab_size)
    module16 = m.make_module(cfg.replace(dtype="bfloat16"))

    for path, x in jax.tree_util.tree_leaves_with_path(layers.compute_params(module16, params)):
        name = path[-1].key
        fp32 = x.ndim < 2 or name in ("embed", "relpos")
        assert x.dtype == (jnp.float32 if fp32 else jnp.bfloat16), (name, x.dtype)

    def value_and_grad(module):
        def loss(p):
            logps, mask = steps.sft_token_logprobs(module, p, batch)
            return -(logps * mask).sum()
        return jax.jit(jax.value_and_grad(loss))(params)

    exact = value_and_grad(m.make_module(cfg))
    up_front = value_and_grad(module16)
    monkeypatch.setattr(layers, "compute_params", lambda module, p: p)
    per_matmul = value_and_grad(module16)

    flat = lambda g: np.concatenate([np.ravel(x) for x in jax.tree.leaves(g)])  # noqa: E731
    grad_err = lambda g: np.linalg.norm(flat(g) - flat(exact[1])) / np.linalg.norm(flat(exact[1]))  # noqa: E731
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(up_front[1]))
    assert 0 < grad_err(up_front[1]) <= 1.25 * grad_err(per_matmul[1]) + 1e-3 < 0.05
    np.testing.assert_allclose(float(up_front[0]), float(exact[0]), rtol=2e-3)


def test_one_compiled_program_per_stage():
    module, cfg, params, _ = llama()
    ocfg = training.OptimizerConfig(learning_rate=1e-3, total_steps=4, weight_decay=0.01, warmup_ratio=0.25)
    tx = training.make_optimizer(ocfg)
    step = training.make_dpo_step(module, tx, training.DPOConfig(), lr_schedule=training.make_schedule(ocfg))
    state = training.create_train_state(params, tx)
    for i in range(4):
        state, metrics = step(state, th.pair_batch(100 + i, batch=4), params)
    assert int(state.step) == 4
    assert len(step.programs) == 1
    assert np.isfinite(float(metrics["loss"])) and float(metrics["learning_rate"]) > 0

    # the loop pads ragged batches to fixed lengths, so it too compiles once
    sft = shared_step("sft")
    before = len(sft.programs)
    batches = iter([th.sft_batch(200 + i, batch=8, prompt_len=4 + i, completion_len=9 + i) for i in range(3)])
    result = training.run(sft, fresh_state(), batches, training.LoopConfig(num_steps=3, progress=False, log_every=2),
                          pad_to=(8, 12))
    assert result.final_step == 3 and len(sft.programs) - before <= 1  # three ragged batches, one program


def test_cpu_step_compiles_with_the_memory_optimised_scheduler():
    """The step's compiler options reach XLA: the same lowered DPO step needs fewer temporary
    bytes with them than with XLA:CPU's default (concurrency-first) scheduler."""
    module, cfg, params, _ = llama()
    tx, sched = shared_sgd()
    step = training.make_dpo_step(module, tx, training.DPOConfig(reference="precomputed"), lr_schedule=sched)
    assert step.compiler_options == training.steps.CPU_COMPILER_OPTIONS
    batch = th.pair_batch(7, batch=4, prompt_len=16, chosen_len=24, rejected_len=24)
    batch["ref_chosen_logps"] = batch["ref_rejected_logps"] = np.zeros((4,), np.float32)
    lowered = step.lower(training.create_train_state(params, tx), batch)
    default = lowered.compile().memory_analysis().temp_size_in_bytes
    chosen = lowered.compile(compiler_options=step.compiler_options).memory_analysis().temp_size_in_bytes
    assert chosen < 0.95 * default


def test_negative_logits_chunk_is_refused():
    module = llama()[0]
    tx, _ = shared_sgd()
    for build in (lambda: training.make_sft_step(module, tx, logits_chunk=-8),
                  lambda: training.make_dpo_step(module, tx, logits_chunk=-8),
                  lambda: training.make_reference_fn(module, logits_chunk=-8)):
        with pytest.raises(ValueError, match="logits_chunk must be"):
            build()


def test_shared_prefix_and_chunked_head_equal_plain_forward():
    """[prompt | chosen | rejected] in one sequence == chosen and rejected as separate rows, and a
    chunked vocab head == the full one (values and gradients)."""
    from dpost.training import steps

    module, cfg, params, _ = llama()
    batch = {k: jnp.asarray(v) for k, v in th.pair_batch(21, batch=3, chosen_len=12, rejected_len=9).items()}

    def both(p, shared, chunk):
        c, r = steps.pair_token_logprobs(module, p, batch, shared_prefix=shared, chunk=chunk)
        return c.sum() + 0.5 * r.sum(), (c, r)

    fn = jax.jit(jax.value_and_grad(both, has_aux=True), static_argnums=(1, 2))
    (v0, (c0, r0)), g0 = fn(params, False, None)
    for shared, chunk in ((True, 5), (False, 4)):
        (v, (c, r)), g = fn(params, shared, chunk)
        np.testing.assert_allclose(np.asarray(c), np.asarray(c0), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(r), np.asarray(r0), rtol=1e-5, atol=1e-5)
        _params_close(g, g0, rtol=1e-4, atol=1e-6)
    assert c0.shape == (3, 12) and r0.shape == (3, 9)


@pytest.mark.parametrize("tied", [False, True])
def test_chunked_head_gradient_equals_autodiff_of_the_whole_head(tied):
    """The chunked head's hand-split backward pass (d hidden by position chunks, d head by
    vocabulary blocks, with a remainder block when the vocabulary does not divide) equals
    autodiff through the plain head: log-probs, d params (tied embedding or lm_head) and
    d hidden, for chunk sizes that do and do not divide the length."""
    from dpost.models import scoring

    module, cfg, params, _ = th.init_model("llama", 3, tie_word_embeddings=tied)
    rng = np.random.default_rng(5)
    hidden = jnp.asarray(rng.normal(size=(3, 13, cfg.hidden_size)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, cfg.vocab_size, (3, 13)), jnp.int32)
    weights = jnp.asarray(rng.normal(size=(3, 13)), jnp.float32)  # a cotangent that is not all ones

    def loss(p, h, chunk):
        logps = scoring.head_logprobs(module, p, h, targets, chunk)
        return (logps * weights).sum(), logps

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True), static_argnums=2)
    (v0, l0), (gp0, gh0) = fn(params, hidden, None)
    assert ("embed" if tied else "lm_head") in params
    for chunk in (3, 4, 13 - 1):  # 5 chunks: 96 // 5 = 19-row blocks + 1 left over; 4 chunks: 24 rows
        (v, lp), (gp, gh) = fn(params, hidden, chunk)
        np.testing.assert_allclose(np.asarray(lp), np.asarray(l0), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(float(v), float(v0), rtol=1e-5)
        np.testing.assert_allclose(np.asarray(gh), np.asarray(gh0), rtol=1e-4, atol=1e-6)
        _params_close(gp, gp0, rtol=1e-4, atol=1e-6)


def test_chunked_head_gradient_in_bf16_compute_matches_the_whole_head():
    """bf16 compute (fp32 masters): the hand-written backward pass casts like autodiff does, so
    chunked and whole-head gradients agree to bf16 rounding (relative norm error < 1e-2)."""
    from dpost.models import get_family, scoring

    _, cfg, params, _ = th.init_model("llama", 4, tie_word_embeddings=True)
    module = get_family("llama").make_module(cfg.replace(dtype="bfloat16"))
    rng = np.random.default_rng(6)
    hidden = jnp.asarray(rng.normal(size=(2, 10, cfg.hidden_size)), jnp.bfloat16)
    targets = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 10)), jnp.int32)

    def loss(p, h, chunk):
        return scoring.head_logprobs(module, p, h, targets, chunk).sum()

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), static_argnums=2)
    v0, (gp0, gh0) = fn(params, hidden, None)
    v, (gp, gh) = fn(params, hidden, 3)
    assert gh.dtype == jnp.bfloat16 and gp["embed"].dtype == jnp.float32
    rel = lambda a, b: float(jnp.linalg.norm((a.astype(jnp.float32) - b.astype(jnp.float32)).ravel())  # noqa: E731
                             / jnp.linalg.norm(b.astype(jnp.float32).ravel()))
    assert abs(float(v) - float(v0)) <= 1e-2 * abs(float(v0))
    assert rel(gh, gh0) < 1e-2 and rel(gp["embed"], gp0["embed"]) < 1e-2


def test_scoring_with_a_chunked_head_equals_the_whole_head():
    """The DPO stage scores reference sides with `padded_sequence_logprobs(..., chunk)`: same sums as
    the family's `completion_logits` path (decoder-only), and T5 ignores the chunk."""
    from dpost.models import scoring

    module, cfg, params, _ = llama()
    b = th.pair_batch(5, batch=3, chosen_len=11, rejected_len=7)
    args = (b["prompt"], b["prompt_mask"], b["chosen"], b["chosen_mask"])
    whole = np.asarray(scoring._sequence_logprobs(module, params, *args, None))
    for chunk in (4, 11, 64):
        np.testing.assert_allclose(np.asarray(scoring._sequence_logprobs(module, params, *args, chunk)), whole,
                                   rtol=1e-5)
    t5_module, _, t5_params, _ = th.init_model("t5", 0)
    t5_whole = scoring._sequence_logprobs(t5_module, t5_params, *args, None)
    np.testing.assert_array_equal(np.asarray(scoring._sequence_logprobs(t5_module, t5_params, *args, 4)),
                                  np.asarray(t5_whole))


def test_loss_masks_leave_tokens_out_of_the_dpo_sums():
    """`<side>_loss_mask` (dpo.mask_calculator): the in-step DPO loss and logps metrics are those of
    per-token log-probs (here from the model's plain `completion_logits`, one side at a time, not the
    step's shared-prefix layout) summed over the loss mask only, for policy and reference alike."""
    from dpost.models.scoring import token_logprobs_from_logits

    module, cfg, params, _ = llama()
    batch = th.pair_batch(5, batch=4)
    rng = np.random.default_rng(0)
    for side in ("chosen", "rejected"):  # drop about a third of each side's tokens
        batch[side + "_loss_mask"] = batch[side + "_mask"] * (rng.random(batch[side].shape) > 0.33)
    ref_params = jax.tree.map(lambda x: x + 0.01, params)
    beta = 0.1
    _, metrics = shared_step("dpo", beta=beta)(fresh_state(), batch, ref_params)

    def masked_sum(p, side):
        logits = module.apply({"params": p}, batch["prompt"], batch["prompt_mask"], batch[side], batch[side + "_mask"],
                              method="completion_logits")
        logps = np.asarray(token_logprobs_from_logits(logits, jnp.asarray(batch[side])), np.float64)
        return (logps * batch[side + "_loss_mask"]).sum(-1)

    pc, pr = masked_sum(params, "chosen"), masked_sum(params, "rejected")
    rc, rr = masked_sum(ref_params, "chosen"), masked_sum(ref_params, "rejected")
    logits = beta * ((pc - rc) - (pr - rr))
    np.testing.assert_allclose(float(metrics["loss"]), np.mean(np.log1p(np.exp(-logits))), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["logps/chosen"]), pc.mean(), rtol=1e-5)
    unmasked = shared_step("dpo", beta=beta)(fresh_state(), {k: v for k, v in batch.items() if "loss" not in k},
                                             ref_params)[1]
    assert abs(float(unmasked["logps/chosen"]) - pc.mean()) > 1.0  # the masks did leave tokens out
