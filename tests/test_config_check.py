"""Config validation at start (`dpost.config_check`): a misspelled or out-of-range value is one line
naming the full field path and what is allowed; the shipped configs pass; `python -m dpost.main`
and `python -m dpost.compare` refuse a bad config before writing anything."""

from __future__ import annotations

import glob
import importlib.util
import os
import subprocess
import sys

import pytest

from dpost import config_check

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name: str = "arith_tiny"):
    spec = importlib.util.spec_from_file_location(f"config_{name}", os.path.join(REPO, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def with_field(config, path: str, value):
    config = config.copy_and_resolve_references()
    *parents, leaf = path.split(".")
    node = config
    for part in parents:
        node = node[part]
    with node.ignore_type():  # a wrongly typed value must reach the check, not ConfigDict's own type error
        node[leaf] = value
    return config


@pytest.mark.parametrize("name", sorted(os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(REPO, "configs", "*.py"))))
def test_shipped_configs_pass(name):
    assert config_check.problems(load_config(name)) == []


# (path, misspelled value, allowed values as the message must list them); written out by hand from
# defaults.py, dpost.training.losses, the model registry and dpost.data.ood.
ENUMERATED = [
    ("method", "dpo-st", "'sft', 'st', 'dpo_st'"),
    ("mode", "evaluate", "'train', 'eval'"),
    ("dpo.reference", "in-step", "'precomputed', 'in_step'"),
    ("dpo.loss_type", "sigmod", "'sigmoid', 'ipo', 'hinge', 'robust'"),
    ("data.source", "hf", "'local', 'hub', 'synthetic'"),
    ("model.family", "llama2", "'', 'llama', 't5'"),
    ("model.dtype", "bf16", "'float32', 'bfloat16'"),
    ("data.ood", ("svamp", "multi-arith"), "'asdiv', 'multiarith', 'svamp'"),
    ("data.eval_splits", ("dev", "validation"), "'dev', 'test'"),
    ("model.source", "hf/some/dir", "hf:<location>, gguf:<location>, orbax:<location>, scratch, pretrain, ''"),
    ("model.source", "safetensors:x", "hf:<location>, gguf:<location>, orbax:<location>, scratch, pretrain, ''"),
    ("eval.checkpoint", "scratch", "hf:<location>, gguf:<location>, orbax:<location>, ''"),
    ("pairs.similarity", "word", "'subword', 'words'"),
    ("pairs.rejected", "graft", "'sample', 'wrong_step'"),
    ("dpo.count", "through_step", "'all', 'through_wrong_step'"),
    ("sampling.labels.batching", "dynamic", "'continuous', 'static'"),
    ("pseudo_labels.similarity", "tokens", "'subword', 'words'"),
]


@pytest.mark.parametrize("path,value,allowed", ENUMERATED, ids=[f"{p}={v}" for p, v, _ in ENUMERATED])
def test_misspelled_enumerated_value(path, value, allowed):
    config = with_field(load_config(), path, value)
    assert config_check.problems(config) == [f"config field '{path}' = {value!r}: expected one of {allowed}"
                                             if not isinstance(value, tuple) else
                                             f"config field '{path}' = {value!r}: expected a tuple of {allowed}"]
    with pytest.raises(ValueError) as err:
        config_check.check(config)
    assert "\n" not in str(err.value)


NUMERIC = [
    ("dpo.steps", -1, "an integer >= 1"),
    ("sft.batch_size", 0, "an integer >= 1"),
    ("sft.max_steps", -5, "an integer >= 0"),
    ("data.labeled", -1, "an integer >= 0"),
    ("model.dropout", 1.0, "a number in [0, 1)"),
    ("pretrain.batch_size", 0, "an integer >= 1"),
    ("data.max_train", 2.5, "an integer >= 0"),
    ("seed", True, "an integer >= 0"),  # a bool is not an int here
    ("sampling.pairs.top_p", 1.5, "a number in (0, 1]"),
    ("sampling.eval.temperature", -0.1, "a number in [0, inf)"),
    ("dpo.beta", 0.0, "a number in (0, inf)"),
    ("dpo.label_smoothing", 0.5, "a number in [0, 0.5)"),
    ("sft.optimizer.warmup_ratio", 1.2, "a number in [0, 1]"),
    ("dpo.optimizer.b2", 1.0, "a number in [0, 1)"),
    ("pseudo_labels.cap_percentile", 0, "a number in (0, 100]"),
    ("eval.final_replicates", 0, "an integer >= 1"),
    ("sft.optimizer.average_last", 1.5, "a number in [0, 1]"),
    ("mesh.fsdp", 0, "an integer >= 1, or -1 (all remaining devices)"),
    ("progress", "yes", "True or False"),
    ("sampling.labels.length_buckets", (128, 0), "a tuple of integers >= 1"),
]


@pytest.mark.parametrize("path,value,allowed", NUMERIC, ids=[f"{p}={v}" for p, v, _ in NUMERIC])
def test_out_of_range_value(path, value, allowed):
    assert config_check.problems(with_field(load_config(), path, value)) == [
        f"config field '{path}' = {value!r}: expected {allowed}"
    ]


def test_boundaries_accepted():
    config = load_config()
    for path, value in [("sampling.pairs.top_p", 1.0), ("sampling.eval.temperature", 0.0), ("mesh.data", -1),
                        ("dpo.rpo_alpha", 0.0), ("data.ood", ()), ("model.source", "gguf:/x/y.gguf"),
                        ("sft.max_steps", 0), ("dpo.optimizer.max_grad_norm", 0.0)]:
        config = with_field(config, path, value)
    assert config_check.problems(config) == []


def test_every_problem_in_one_line():
    config = with_field(with_field(load_config(), "method", "dpo"), "dpo.reference", "in-step")
    message = "; ".join(config_check.problems(config))
    assert "'method'" in message and "'dpo.reference'" in message and "\n" not in message


def test_cross_field_rules():
    train = with_field(load_config(), "model.source", "")
    assert config_check.problems(train) == [
        "config field 'model.source' is empty; mode 'train' needs one of "
        "hf:<location>, gguf:<location>, orbax:<location>, scratch, pretrain"]
    evaluation = with_field(load_config(), "mode", "eval")
    assert config_check.problems(evaluation) == [
        "config field 'eval.checkpoint' is empty; mode 'eval' needs one of hf:<location>, gguf:<location>, orbax:<location>"]
    assert config_check.problems(with_field(evaluation, "eval.checkpoint", "orbax:/ckpt")) == []
    assert config_check.problems(with_field(load_config(), "model.family", "")) == [
        "config field 'model.family' is empty; model.source 'scratch' or 'pretrain' needs a family"]
    release = with_field(with_field(with_field(load_config(), "dpo.reference", "precomputed"), "dpo.count", "all"),
                         "pairs.rejected", "sample")
    masked = with_field(release, "dpo.mask_calculator", True)
    assert config_check.problems(masked) == [
        "config field 'dpo.mask_calculator' = True needs dpo.reference 'in_step' (the precomputed reference "
        "log-probs are sums over every token)"]
    assert config_check.problems(with_field(masked, "dpo.reference", "in_step")) == []
    stepwise = with_field(release, "dpo.count", "through_wrong_step")
    assert config_check.problems(stepwise) == [
        "config field 'dpo.count' = 'through_wrong_step' needs dpo.reference 'in_step' (the precomputed "
        "reference log-probs are sums over every token)",
        "config field 'dpo.count' = 'through_wrong_step' needs pairs.rejected 'wrong_step' (the pairs "
        "then record where their first differing steps end)"]
    stepwise = with_field(with_field(stepwise, "dpo.reference", "in_step"), "pairs.rejected", "wrong_step")
    assert config_check.problems(stepwise) == []


def test_missing_field_named():
    config = load_config()
    del config.dpo["reference"]
    assert config_check.problems(config) == ["config field 'dpo.reference' is missing (dpost.config_check lists it)"]


def test_check_values_names_the_flag():
    with pytest.raises(ValueError, match=r"^--methods: 'dpo-st' not allowed for config field 'method': "
                                         r"expected one of 'sft', 'st', 'dpo_st'$"):
        config_check.check_values("method", ["sft", "dpo-st"], "--methods")
    config_check.check_values("method", ["sft", "st", "dpo_st"], "--methods")


def run_module(module: str, *args, tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", module, "--config", "configs/arith_tiny.py", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=300, env=env)


def test_main_refuses_misspelled_value_writing_nothing(tmp_path):
    workdir = tmp_path / "run"
    proc = run_module("dpost.main", "--config.dpo.reference=in-step", f"--workdir={workdir}", tmp_path=tmp_path)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert lines == ["dpost: error: config field 'dpo.reference' = 'in-step': expected one of 'precomputed', 'in_step'"], proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not workdir.exists()


def test_compare_refuses_misspelled_method_writing_nothing(tmp_path):
    workdir = tmp_path / "cmp"
    proc = run_module("dpost.compare", "--methods=sft,dpo-st", f"--workdir={workdir}", tmp_path=tmp_path)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [
        "dpost.compare: error: --methods: 'dpo-st' not allowed for config field 'method': "
        "expected one of 'sft', 'st', 'dpo_st'"], proc.stderr
    assert not workdir.exists()
