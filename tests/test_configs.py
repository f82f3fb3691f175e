"""The model configs: one Flan-T5 config with base/large variants (and the old file names as
aliases), the release's recipe details the protocol names (dropout, data split, Llama column)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(name: str, *args):
    import runpy

    return runpy.run_path(os.path.join(ROOT, "configs", f"{name}.py"))["get_config"](*args)


@pytest.mark.parametrize("variant", ["base", "large"])
def test_flan_t5_variants_and_their_aliases(variant):
    config = load("flan_t5", variant)
    assert config.to_dict() == load(f"flan_t5_{variant}").to_dict()
    assert config.model.source == f"hf:google/flan-t5-{variant}"
    assert config.model.dropout == 0.1 and config.data.source == "local"
    # the release's Flan-T5 recipe (protocol table)
    assert (config.sft.optimizer.learning_rate, config.sft.epochs, config.sft.batch_size) == (3e-4, 8, 96)
    assert (config.dpo.optimizer.learning_rate, config.dpo.steps, config.dpo.batch_size) == (7e-7, 150, 96)
    assert (config.data.max_prompt_len, config.data.max_target_len) == (200, 300)


def test_flan_t5_variants_differ_only_in_the_model():
    base, large = load("flan_t5", "base").to_dict(), load("flan_t5", "large").to_dict()
    base["model"].pop("source"), large["model"].pop("source")
    assert base == large
    assert load("flan_t5").to_dict() == load("flan_t5", "large").to_dict()  # no variant: the release's main one
    with pytest.raises(ValueError, match=r"unknown variant 'xl'.*\['base', 'large'\]"):
        load("flan_t5", "xl")


def test_llama2_7b_follows_the_papers_llama_column():
    config = load("llama2_7b")
    assert config.model.dropout == 0.1 and config.data.source == "local"
    assert config.sft.optimizer.warmup_ratio == 0.03  # Table 5 (the release's config: 0.1)
    assert config.dpo.optimizer.warmup_ratio == 0.1
    assert config.sampling.labels.num_samples == 10 and config.sampling.pairs.num_samples == 5
    assert (config.sft.optimizer.learning_rate, config.sft.epochs, config.sft.batch_size) == (2e-5, 2, 128)
    assert (config.dpo.optimizer.learning_rate, config.dpo.steps, config.dpo.batch_size) == (3e-7, 100, 128)


def test_command_line_selects_the_variant():
    """`--config configs/flan_t5.py:base` through ml_collections' config_flags (dpost.memory's CLI
    loads configs exactly as dpost.main does)."""
    out = subprocess.run([sys.executable, "-m", "dpost.memory", "--config", "configs/flan_t5.py:base", "--mesh",
                          "fsdp=8", "--device_memory_gb", "80"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "model   t5 hf:google/flan-t5-base " in out.stdout, out.stdout
