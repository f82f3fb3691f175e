"""Training-step options for accelerators: remat policies, unscanned layers and bf16 AdamW first
moments. Each remat policy, scanned and in the unscanned loop, gives the loss and gradients of the
plain scanned model (fp32) on each family; the bf16-moment AdamW equals a hand-computed AdamW whose
stored first moment is rounded to bf16; config_check names a misspelled value; the new config
fields leave existing runs' hashes alone."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import training_helpers as th
from dpost import config_check, defaults, training, workdir
from dpost.models import layers
from tests.memory.test_plan import load_config

FAMILIES = ("llama", "t5")
LOSS_RTOL, GRAD_RTOL, GRAD_ATOL = 2e-6, 1e-5, 1e-7
VARIANTS = {"remat full": dict(remat="full"), "remat dots": dict(remat="dots"),
            "unscanned, remat full": dict(scan_layers=False, remat="full"),
            "unscanned, remat dots": dict(scan_layers=False, remat="dots")}


def sgd():
    cfg = training.OptimizerConfig(learning_rate=1.0, total_steps=10, kind="sgd", schedule="constant",
                                   max_grad_norm=None)
    return training.make_optimizer(cfg), training.make_schedule(cfg)


@functools.lru_cache(maxsize=None)
def step_outcome(family: str, kind: str, variant: str | None):
    """(metrics, params after one SGD step with lr 1 = params - gradient) of a tiny dpost model with
    the variant's config fields (None: scanned, no remat)."""
    _, cfg, params, _ = th.init_model(family)
    m, _ = th.family_modules(family)
    module = m.make_module(cfg.replace(**VARIANTS.get(variant, {})))
    tx, sched = sgd()
    if kind == "sft":
        step, args = training.make_sft_step(module, tx, lr_schedule=sched), ()
        batch = th.sft_batch(3, batch=4, prompt_len=9, completion_len=11, vocab=60)
    else:
        step, args = training.make_dpo_step(module, tx, training.DPOConfig(), lr_schedule=sched), (
            jax.tree.map(lambda x: x + 0.01, params),)
        batch = th.pair_batch(5, batch=4, prompt_len=9, chosen_len=12, rejected_len=7, vocab=60)
    state, metrics = step(training.create_train_state(params, tx), batch, *args)
    return {k: float(v) for k, v in metrics.items()}, state.params


# Each family picks its layer wrapper in one place (nn.scan over layers.remat_layer in setup, the
# unrolled loop over remat_layer(scanned=False)), and the SFT and DPO steps reach it through the
# same forward (hidden_states / completion_logits). So each family runs each policy once, one
# scanned and one in the loop (the unscanned loop with remat "none" is the plain layer: its forward
# is checked below), and DPO steps take Llama's shared-prompt layout through the loop and the scan.
CASES = [("llama", "remat dots", "sft"), ("llama", "unscanned, remat full", "sft"),
         ("t5", "remat full", "sft"), ("t5", "unscanned, remat dots", "sft"),
         ("llama", "unscanned, remat dots", "dpo"),
         ("llama", "remat full", "dpo")]  # the CPU default's (configs/arith_tiny.py) DPO step


@pytest.mark.parametrize("family, variant, kind", CASES)
def test_variant_gives_the_plain_models_loss_and_gradients(family, variant, kind):
    metrics, params = step_outcome(family, kind, variant)
    base_metrics, base_params = step_outcome(family, kind, None)
    for key in base_metrics:
        np.testing.assert_allclose(metrics[key], base_metrics[key], rtol=LOSS_RTOL, atol=1e-7, err_msg=key)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=GRAD_RTOL, atol=GRAD_ATOL),
                 params, base_params)


@pytest.mark.parametrize("family", FAMILIES)
def test_unscanned_scoring_and_prefill_equal_the_scan(family):
    """Scoring (completion logits) and, for Llama, the prefill's cache take the same stacked params."""
    module, cfg, params, _ = th.init_model(family)
    m, _ = th.family_modules(family)
    loop = m.make_module(cfg.replace(scan_layers=False))
    b = th.sft_batch(4, batch=3, prompt_len=7, completion_len=6, vocab=60)
    args = (b["prompt"], b["prompt_mask"], b["completion"], b["completion_mask"])
    call = lambda mod, method, *a: mod.apply({"params": params}, *a, method=method)  # noqa: E731
    np.testing.assert_allclose(call(loop, "completion_logits", *args), call(module, "completion_logits", *args),
                               rtol=1e-5, atol=1e-5)
    if family == "llama":
        (l1, s1), (l2, s2) = (call(mod, "prefill", b["prompt"], b["prompt_mask"], 4) for mod in (loop, module))
        np.testing.assert_allclose(l1, l2, rtol=1e-5, atol=1e-5)
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), s1, s2)


def test_unscanned_layers_run_without_a_scan_loop():
    module, cfg, params, _ = th.init_model("llama")
    m, _ = th.family_modules("llama")
    tokens = jnp.ones((2, 5), jnp.int32)

    def primitives(c):
        mod = m.make_module(c)
        return str(jax.make_jaxpr(lambda p: mod.apply({"params": p}, tokens))(params))

    assert "scan[" in primitives(cfg) and "scan[" not in primitives(cfg.replace(scan_layers=False))


def test_remat_reads_booleans_of_older_configs_and_checkpoints():
    _, cfg, _, _ = th.init_model("llama")
    assert cfg.replace(remat=True).remat == "full" and cfg.replace(remat=False).remat == "none"
    assert cfg.replace(remat="dots").remat == "dots"
    with pytest.raises(ValueError, match="remat='dot'"):
        cfg.replace(remat="dot")


def test_dots_policy_keeps_less_than_none_and_more_than_full():
    """The compiled SFT step's temporaries (activations + gradients) order as the policies say."""
    _, cfg, params, _ = th.init_model("llama", num_hidden_layers=4)
    m, _ = th.family_modules("llama")
    tx, sched = sgd()
    batch = th.sft_batch(3, batch=8, prompt_len=24, completion_len=40, vocab=60)
    state = training.create_train_state(params, tx)

    def temp_bytes(remat):
        step = training.make_sft_step(m.make_module(cfg.replace(remat=remat)), tx, lr_schedule=sched)
        return step.lower(state, batch).compile().memory_analysis().temp_size_in_bytes

    full, dots, none = (temp_bytes(r) for r in ("full", "dots", "none"))
    assert full < dots < none, (full, dots, none)


# -- bf16 first moments ------------------------------------------------------------------------------

def adamw_bf16_mu(params, grads_per_step, *, lr, b1, b2, eps, wd):
    """optax.adamw by hand in fp64, with the first moment stored rounded to bf16 between steps
    (the step's own update uses the new moment before rounding) and the second moment kept."""
    p = np.asarray(params, np.float64)
    mu = np.zeros_like(p)
    nu = np.zeros_like(p)
    for t, g in enumerate(grads_per_step, start=1):
        g = np.asarray(g, np.float64)
        mu_new = b1 * mu + (1 - b1) * g
        nu = b2 * nu + (1 - b2) * g * g
        update = (mu_new / (1 - b1**t)) / (np.sqrt(nu / (1 - b2**t)) + eps)
        p = p - lr * (update + wd * p)
        mu = mu_new.astype(np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)
    return p, mu


def test_bf16_moments_state_and_updates_match_a_hand_computed_adamw():
    """Dyadic b1 and bf16-valued gradients make the new first moment exact in fp32 and fp64 alike,
    so where it rounds to bf16 is one well-defined value (round half to even on both sides)."""
    rng = np.random.default_rng(0)
    bf16_values = lambda x: np.asarray(x, np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)  # noqa: E731
    params = {"w": jnp.asarray(rng.standard_normal((16, 8)), jnp.float32),
              "norm": jnp.asarray(1 + 0.1 * rng.standard_normal(8), jnp.float32)}
    grads = [jax.tree.map(lambda x: jnp.asarray(bf16_values(rng.standard_normal(x.shape) / 64)), params)
             for _ in range(3)]
    hyper = dict(lr=1e-2, b1=0.5, b2=0.75, eps=1e-8, wd=0.1)
    cfg = training.OptimizerConfig(learning_rate=hyper["lr"], total_steps=10, weight_decay=hyper["wd"],
                                   b1=hyper["b1"], b2=hyper["b2"], eps=hyper["eps"], schedule="constant",
                                   max_grad_norm=None, moments_dtype="bfloat16")
    tx = training.make_optimizer(cfg)
    state = tx.init(params)
    p = params
    for g in grads:
        updates, state = tx.update(g, state, p)
        p = jax.tree.map(lambda a, u: a + u, p, updates)
    adam = state[0][0]  # chain(adamw) -> adamw = (scale_by_adam, weight decay, learning rate)
    assert {x.dtype for x in jax.tree.leaves(adam.mu)} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(adam.nu)} == {jnp.dtype(jnp.float32)}  # optax: no nu dtype
    assert {x.dtype for x in jax.tree.leaves(p)} == {jnp.dtype(jnp.float32)}  # fp32 masters
    for name, wd in (("w", hyper["wd"]), ("norm", 0.0)):  # no weight decay on norms
        want_p, want_mu = adamw_bf16_mu(params[name], [g[name] for g in grads], **dict(hyper, wd=wd))
        np.testing.assert_allclose(np.asarray(p[name], np.float64), want_p, rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(np.asarray(adam.mu[name], np.float64), want_mu)
    # and the rounding is what moves it: fp32 moments end elsewhere by more than fp32 noise
    fp32 = training.make_optimizer(dataclasses.replace(cfg, moments_dtype="float32"))
    s, q = fp32.init(params), params
    for g in grads:
        u, s = fp32.update(g, s, q)
        q = jax.tree.map(lambda a, b: a + b, q, u)
    assert float(jnp.max(jnp.abs(q["w"] - p["w"]))) > 1e-7


def test_sft_and_dpo_stages_pass_the_moments_dtype_to_the_optimizer():
    from dpost import stages

    config = defaults.base_config()
    config.dpo.optimizer.moments_dtype = "bfloat16"
    assert stages.optimizer_config(config.dpo.optimizer, 10).moments_dtype == "bfloat16"
    assert stages.optimizer_config(config.sft.optimizer, 10).moments_dtype == "float32"
    params = {"w": jnp.zeros((4, 4))}
    tx = training.make_optimizer(stages.optimizer_config(config.dpo.optimizer, 10))
    assert training.create_train_state(params, tx).opt_state[1][0].mu["w"].dtype == jnp.bfloat16


# -- config -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path, value", [("model.remat", "dot"), ("model.remat", 1),
                                         ("sft.optimizer.moments_dtype", "bf16"),
                                         ("dpo.optimizer.moments_dtype", "float16")])
def test_config_check_names_a_bad_value_in_one_line(path, value):
    config = defaults.base_config()
    config.model.source = "scratch"
    config.model.family = "llama"
    *parents, leaf = path.split(".")
    node = config
    for p in parents:
        node = node[p]
    node[leaf] = value
    with pytest.raises(ValueError) as err:
        config_check.check(config)
    message = str(err.value)
    assert "\n" not in message and f"config field '{path}' = {value!r}" in message


@pytest.mark.parametrize("value", list(layers.REMATS) + [True, False])
def test_config_check_accepts_every_remat_policy_and_the_booleans(value):
    config = defaults.base_config()
    config.model.source, config.model.family, config.model.remat = "scratch", "llama", value
    config_check.check(config)


def test_new_fields_at_their_defaults_keep_existing_runs_hashes_and_resume(tmp_path):
    """A config recorded before the fields existed has the same hash, and its workdir resumes."""
    # has every added field, data.synthetic.n_test_extra included; remat and the step-level DPO
    # options at their defaults (arith_tiny sets them)
    config = load_config("arith_tiny", **{"model.remat": False, "pairs.rejected": "sample", "dpo.count": "all"})
    flat = workdir.flatten_config(config)
    before = {k: v for k, v in flat.items() if k not in workdir.ADDED_FIELDS}
    assert set(workdir.ADDED_FIELDS) <= set(flat)
    assert workdir.config_hash(flat) == workdir.config_hash(before)
    assert flat["model.remat"] is False  # the default's stored value, as before the policies
    (tmp_path / workdir.CONFIG_FILE).write_text(__import__("json").dumps({"config": before}))
    workdir.RunDir(str(tmp_path), config).guard_config()  # no "changed fields" refusal
    config.sft.optimizer.moments_dtype = "bfloat16"
    assert workdir.config_hash(workdir.flatten_config(config)) != workdir.config_hash(before)
    with pytest.raises(ValueError, match="sft.optimizer.moments_dtype"):
        workdir.RunDir(str(tmp_path), config).guard_config()
