"""Memory planner: figures against memory measured on CPU, refusal messages, and the CLI."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from dpost import memory, sharding
from dpost.data.batching import quarter_octave_bucket
from dpost.memory.__main__ import parse_mesh
from dpost.memory.report import fmt
from dpost.models.shapes import UnknownShapes, model_shapes

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GiB = 1024**3


def load_config(name: str, **overrides):
    spec = importlib.util.spec_from_file_location(f"cfg_{name}", os.path.join(ROOT, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    for dotted, value in overrides.items():
        node = config
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def tiny_plan(**overrides) -> memory.Plan:
    return memory.plan(load_config("arith_tiny", **overrides), {"data": 1}, 8 * GiB)


def within(estimate: float, measured: float, tol: float = 0.2) -> bool:
    return abs(estimate - measured) <= tol * measured


def _tiny_model(config):
    spec = model_shapes(config)
    from dpost.models.registry import get_family

    return spec, get_family(spec.family)


# -- shapes ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, params, family", [("llama2_7b", 6_738_415_616, "llama"),
                                                   ("flan_t5_large", 783_150_080, "t5"),
                                                   ("flan_t5_base", 247_577_856, "t5")])
def test_known_checkpoint_shapes_offline(name, params, family):
    p = memory.plan(load_config(name), {"fsdp": 8}, 80 * GiB)
    assert p.param_count == params
    assert p.origin == f"dpost.models.{family}.known.HF_CONFIGS"
    # fsdp=8 divides every embed dimension: each device holds an eighth of the fp32 masters, up to
    # the small replicated leaves (norm scales are sharded too; relative-position tables are not).
    assert within(p.stage("sft").terms["params"], 4 * params / 8, 0.01)


def test_scratch_model_uses_tokenizer_vocab_size():
    config = load_config("arith_tiny")
    config.model.scratch.tokenizer_vocab_size = 384  # the planner must follow the tokenizer's size
    spec = model_shapes(config)
    assert spec.family == "llama" and spec.config.vocab_size == 384 and spec.config.num_layers == 2


def test_mesh_parsing_and_resolution():
    assert parse_mesh("data=2,fsdp=4") == {"data": 2, "fsdp": 4}
    assert sharding.mesh_shape({"fsdp": -1, "tensor": 2}, num_devices=16) == {"data": 1, "fsdp": 8, "tensor": 2}
    with pytest.raises(ValueError, match="unknown mesh axes"):
        sharding.mesh_shape({"model": 2})
    with pytest.raises(ValueError, match="not divisible"):
        sharding.mesh_shape({"fsdp": -1, "tensor": 3}, num_devices=8)


def test_unknown_hub_id_is_not_refused_the_plan_warns(caplog):
    """A hub id in no family's known.py and not in the HF cache: models.load could still download
    it, so the plan says it cannot estimate and the run goes on (check_run returns no plan)."""
    config = load_config("arith_tiny", **{"model.source": "hf:example-org/not-a-known-model"})
    with pytest.raises(UnknownShapes, match="example-org/not-a-known-model"):
        memory.plan(config, {"data": 1}, 8 * GiB)
    with caplog.at_level("WARNING", logger="dpost.memory.planner"):
        assert memory.check_run(config, {"data": 1}) is None
    assert "memory plan: cannot estimate" in caplog.text and "not-a-known-model" in caplog.text


def test_check_run_still_refuses_a_known_model_that_does_not_fit():
    config = load_config("llama2_7b", **{"model.remat": False})
    with pytest.raises(ValueError, match="memory plan: stage"):
        memory.check_run(config, {"fsdp": 1}, 80 * GiB)


# -- against measured memory -----------------------------------------------------------------------

def test_params_and_optimizer_state_match_a_created_train_state():
    from dpost import models, training

    config = load_config("arith_tiny")
    spec, _ = _tiny_model(config)
    bundle = models.init_random(spec.family, spec.config, seed=0)
    tx = training.make_optimizer(training.OptimizerConfig(learning_rate=1e-3, total_steps=10, weight_decay=0.01))
    state = training.create_train_state(bundle.params, tx)
    nbytes = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))  # noqa: E731
    row = tiny_plan().stage("sft")
    assert within(row.terms["params"], nbytes(state.params), 0.01)
    assert within(row.terms["optimizer"], nbytes(state.opt_state), 0.01)
    assert row.terms["grads"] == row.terms["params"]


SHARDED_SCRIPT = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import flax.linen as nn
    import jax
    import numpy as np
    from dpost import sharding
    from dpost.memory.shards import param_info
    from dpost.models import registry, sources
    from dpost.models.shapes import ModelShapes
    from dpost.models.llama.model import LlamaConfig
    # 3 KV heads and a 3-way divisible MLP: the 2-way tensor axis is dropped for some leaves.
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=6,
                      num_kv_heads=3, head_dim=8)
    boxed = sources.abstract_params(registry.get_family("llama"), cfg)
    abstract = nn.unbox(boxed)
    for shape in ({"data": 2, "fsdp": 2, "tensor": 2}, {"fsdp": 8}, {"data": 8}):
        mesh = sharding.make_mesh(shape)
        # Placed as models.load places checkpoint tensors: one device_put per tensor into its sharding.
        shardings = sharding.param_shardings(boxed, mesh)
        params = jax.tree.map(lambda a, s: jax.device_put(np.zeros(a.shape, a.dtype), s), abstract, shardings)
        layout = sharding.Layout(sharding.abstract_mesh(sharding.mesh_shape(shape)))
        info = param_info(ModelShapes("llama", cfg, "test", "test"), layout)
        device0 = jax.devices()[0]
        held = sum(s.data.nbytes for x in jax.tree.leaves(params) for s in x.addressable_shards
                   if s.device == device0)
        assert held == info.per_device, (shape, held, info.per_device)
    print("OK")
""")


def test_sharded_param_bytes_equal_the_shards_a_device_holds():
    out = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0 and "OK" in out.stdout, out.stdout + out.stderr


@pytest.mark.parametrize("remat", [False, True])  # dots: an upper bound (formulas.py), not within 20%
def test_sft_activation_estimate_within_20pct_of_the_compiled_step(remat):
    """XLA's temp allocation of the SFT train step = activations + gradients (params, optimizer
    state and the batch are arguments, donated / aliased to the outputs)."""
    from dpost import training
    from dpost.models import sources

    config = load_config("arith_tiny", **{"model.remat": remat})
    spec, family = _tiny_model(config)
    module = family.make_module(spec.config)
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                          nn.unbox(sources.abstract_params(family, spec.config)))
    tx = training.make_optimizer(training.OptimizerConfig(learning_rate=1e-3, total_steps=10, weight_decay=0.01))
    step = training.make_sft_step(module, tx, grad_accum=int(config.sft.grad_accum))
    b, p, c = config.sft.batch_size, config.data.max_prompt_len, config.data.max_target_len
    ids = lambda n: jax.ShapeDtypeStruct((b, n), jnp.int32)  # noqa: E731
    batch = {"prompt": ids(p), "prompt_mask": ids(p), "completion": ids(c), "completion_mask": ids(c)}
    measured = step.lower(training.abstract_state(tx, params), batch).compile().memory_analysis().temp_size_in_bytes

    row = memory.plan(config, {"data": 1}, 8 * GiB).stage("sft")
    estimate = row.terms["activations"] + row.terms["grads"]
    assert within(estimate, measured), (remat, estimate, measured)
    assert (row.activations_remat if remat else row.activations_no_remat) == row.terms["activations"]


def test_kv_cache_equals_the_samplers_state():
    from dpost.models import sources
    from dpost.sampling import sampler

    config = load_config("arith_tiny")
    spec, family = _tiny_model(config)
    module = family.make_module(spec.config)
    params = nn.unbox(sources.abstract_params(family, spec.config))
    sc = config.sampling.pairs
    p, m, n = quarter_octave_bucket(config.data.max_prompt_len), sc.max_new_tokens, sc.num_samples
    prompts = sc.batch_size // n
    opts = sampler.StaticOptions(max_new_tokens=m, num_samples=n, greedy=False)
    i32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)  # noqa: E731
    state, _ = jax.eval_shape(
        lambda *a: sampler._prefill(module, opts, *a), params, i32(prompts, p), i32(prompts, p),
        i32(prompts * n), i32(prompts * n), jax.ShapeDtypeStruct((prompts * n,), bool), i32(),
    )
    cache = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state["model"]["cache"]))
    assert tiny_plan().stage("sample pairs").terms["kv cache"] == cache


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_sampler_weight_copies_cover_the_decode_copy(dtype):
    """The sampler decodes from its own copy of the params (split per layer, matrices in the compute
    dtype): the plan's "weight copies" must cover the bytes that copy adds, without doubling them."""
    from dpost import sampling
    from dpost.models import sources

    config = load_config("arith_tiny", **{"model.dtype": dtype})
    spec, family = _tiny_model(config)
    module = family.make_module(spec.config)
    params = nn.unbox(sources.abstract_params(family, spec.config))
    decoded = jax.eval_shape(lambda p: sampling.decode_layout(module, p), params)
    added = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(decoded):
        new_buffer = path[0].key == "layers" or leaf.dtype != jnp.float32  # split layers, cast matrices
        added += leaf.size * leaf.dtype.itemsize if new_buffer else 0
    estimate = memory.plan(config, {"data": 1}, 8 * GiB).stage("sample pairs").terms["weight copies"]
    # The estimate counts every parameter at the compute dtype; norm scales stay fp32 (< 1% here).
    assert 0.99 * added <= estimate <= 2 * added, (added, estimate)


def test_sampling_rows_use_the_configured_length_buckets():
    config = load_config("arith_tiny")
    p = int(config.data.max_prompt_len)
    assert tiny_plan().stage("sample pairs").batch.endswith(f"x {quarter_octave_bucket(p)}+{config.sampling.pairs.max_new_tokens} tok")
    custom = tiny_plan(**{"sampling.pairs.length_buckets": (p + 100,)})
    assert custom.stage("sample pairs").batch.endswith(f"x {p + 100}+{config.sampling.pairs.max_new_tokens} tok")
    assert custom.stage("sample labels").batch == tiny_plan().stage("sample labels").batch


def test_prompts_per_sampler_call_follow_the_driver():
    from dpost import stages
    config = load_config("arith_tiny")
    for name in ("pairs", "labels", "eval"):
        sc = config.sampling[name]
        assert tiny_plan().stage(f"sample {name}").batch.startswith(f"{stages.prompts_per_batch(sc)} prompts")


# -- refusal -----------------------------------------------------------------------------------------

def test_over_budget_plan_is_refused_naming_stage_and_largest_term():
    config = load_config("arith_tiny")
    p = memory.plan(config, {"data": 1}, 200 * 1024**2)
    with pytest.raises(ValueError) as err:
        memory.check_fits(p)
    msg = str(err.value)
    worst = max(p.over_budget(), key=lambda r: r.total)
    assert worst.stage == f"dpo (ref {config.dpo.reference})"  # the run's DPO stage: twice the SFT sequences
    assert f"stage '{worst.stage}'" in msg
    assert "largest term: activations" in msg
    assert fmt(worst.total) in msg and "200.0 MiB" in msg
    assert "model.remat=full" in msg  # a hint that addresses the largest term


def test_in_budget_plan_passes_and_unused_stages_do_not_count():
    memory.check_fits(tiny_plan())
    # a budget just above what the warm-up-only run needs, below what its (unused) DPO stage would need
    sft_only = load_config("arith_tiny", method="sft")
    needed = max(r.total for r in memory.plan(sft_only, {"data": 1}, None).stages if r.used)
    p = memory.plan(sft_only, {"data": 1}, int(needed * 1.02))
    assert not p.stage("dpo (ref precomputed)").used and not p.fits(p.stage("dpo (ref precomputed)"))
    memory.check_fits(p)  # sft and eval sampling fit; DPO does not run


def test_remat_and_grad_accum_change_the_right_terms():
    base = tiny_plan(**{"model.remat": False}).stage("sft")  # arith_tiny itself sets full
    remat = tiny_plan(**{"model.remat": True}).stage("sft")
    dots = tiny_plan(**{"model.remat": "dots"}).stage("sft")
    accum = tiny_plan(**{"model.remat": False, "sft.grad_accum": 2}).stage("sft")
    assert remat.terms["activations"] < dots.terms["activations"] < base.terms["activations"]
    assert remat.terms["activations"] < base.terms["activations"] / 1.5
    assert accum.terms["grads"] == 2 * base.terms["grads"]
    assert accum.terms["activations"] < 0.6 * base.terms["activations"]


def test_logits_chunk_bounds_the_logits_term_of_decoder_only_models():
    def sft_activations(name, **overrides):
        config = load_config(name, **{"model.remat": True, **overrides})
        return memory.plan(config, {"data": 8}, 80 * GiB).stage("sft").terms["activations"]

    # SmolLM2: 8 sequences x 384 targets x 49152 vocab of fp32 logits (and their gradient) dominate
    # its remat peak; in 64-position chunks they drop below one layer's recomputation
    assert sft_activations("smollm2_gsm8k", **{"model.logits_chunk": 64}) < 0.8 * sft_activations("smollm2_gsm8k")
    # T5's head is not chunked (the step ignores logits_chunk there), so its estimate does not move
    assert sft_activations("flan_t5_base", **{"model.logits_chunk": 64}) == sft_activations("flan_t5_base")


def test_bf16_first_moments_take_a_quarter_off_the_optimizer_term_of_their_stage():
    base = tiny_plan()
    bf16 = tiny_plan(**{"dpo.optimizer.moments_dtype": "bfloat16"})
    params = base.stage("sft").terms["params"]
    assert base.stage("sft").terms["optimizer"] == bf16.stage("sft").terms["optimizer"] == 2 * params
    assert bf16.stage("dpo (ref precomputed)").terms["optimizer"] == params + params // 2  # fp32 nu + bf16 mu


def test_in_step_reference_adds_reference_params():
    p = tiny_plan()
    in_step, pre = p.stage("dpo (ref in_step)"), p.stage("dpo (ref precomputed)")
    assert in_step.terms["ref params"] == pre.terms["params"]
    assert in_step.total >= pre.total + pre.terms["params"]


def test_seven_b_shards_with_fsdp_and_tensor():
    cfg = load_config("llama2_7b")
    p8 = memory.plan(cfg, {"fsdp": 8}, 80 * GiB)
    p16 = memory.plan(cfg, {"fsdp": 8, "tensor": 2}, 80 * GiB)
    assert within(p16.stage("sft").terms["params"], p8.stage("sft").terms["params"] / 2, 0.01)
    kv8, kv16 = p8.stage("sample pairs").terms["kv cache"], p16.stage("sample pairs").terms["kv cache"]
    assert kv16 == kv8 // 2  # 32 KV heads split over tensor=2
    memory.check_fits(p8)


# -- command line ------------------------------------------------------------------------------------

def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "dpost.memory", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_cli_prints_the_table_for_a_tiny_config():
    out = run_cli("--config", "configs/arith_tiny.py", "--device_memory_gb", "4")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    for stage in ("sft", "dpo (ref in_step)", "dpo (ref precomputed)", "sample pairs", "sample labels", "sample eval"):
        assert stage in text
    assert "act:remat" in text and "kv cache" in text and "4.00 GiB per device (--device_memory_gb)" in text
    assert "verdict: fits" in text


def test_cli_llama2_7b_on_eight_80gb_devices():
    out = run_cli("--config", "configs/llama2_7b.py", "--mesh", "fsdp=8", "--device_memory_gb", "80")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "6.74 B params" in text and "data=1,fsdp=8,tensor=1 (8 devices)" in text
    sft = next(line for line in text.splitlines() if line.startswith("* sft"))
    assert sft.rstrip().endswith("fits") and "does not fit" not in sft
    assert "verdict: fits" in text


def test_cli_check_exits_nonzero_when_over_budget():
    out = run_cli("--config", "configs/llama2_7b.py", "--mesh", "fsdp=8", "--device_memory_gb", "16", "--check",
                  "--config.model.remat=False")
    assert out.returncode == 1
    assert "does not fit" in out.stdout
    assert "stage '" in out.stderr and "largest term: activations" in out.stderr
