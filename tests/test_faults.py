"""Fault-injection hooks: what the environment selects (the crashes themselves are exercised by
the subprocess tests in test_driver.py, test_multihost.py and training/test_checkpoints.py)."""

from __future__ import annotations

import pytest

from dpost import faults


class Exited(Exception):
    pass


@pytest.fixture
def exits(monkeypatch):
    def fake_exit(code):
        raise Exited(code)

    monkeypatch.setattr(faults.os, "_exit", fake_exit)
    for name in (faults.KILL_AFTER_STEP, faults.KILL_STAGE, faults.SIGTERM_AFTER_STEP, faults.KILL_AFTER_SHARD):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_nothing_set_means_no_faults(exits):
    assert faults.for_stage("iter_1/dpo") == faults.StepFaults()
    faults.StepFaults().after_save(3, None)
    faults.after_shard("/w/iter_1/sample_pairs", 0)


def test_kill_after_step_waits_for_saves_and_honours_the_stage_filter(exits):
    exits.setenv(faults.KILL_AFTER_STEP, "2")
    exits.setenv(faults.KILL_STAGE, "iter_1/dpo")
    assert faults.for_stage("iter_1/sft").kill_after is None
    hooks = faults.for_stage("iter_1/dpo")
    waited = []
    hooks.after_save(1, lambda: waited.append(1))
    assert waited == []
    with pytest.raises(Exited) as err:
        hooks.after_save(2, lambda: waited.append(2))
    assert waited == [2] and err.value.args == (faults.EXIT_CODE,)


def test_sigterm_after_step_signals_this_process(exits):
    exits.setenv(faults.SIGTERM_AFTER_STEP, "3")
    sent = []
    exits.setattr(faults.os, "kill", lambda pid, sig: sent.append((pid, sig)))
    hooks = faults.for_stage("any")
    hooks.after_step(2)
    hooks.after_step(3)
    assert sent == [(faults.os.getpid(), faults.signal.SIGTERM)]


def test_kill_after_shard_matches_stage_suffix_and_index(exits):
    exits.setenv(faults.KILL_AFTER_SHARD, "iter_1/sample_pairs:1")
    faults.after_shard("/w/iter_1/sample_pairs", 0)
    faults.after_shard("/w/iter_1/sample_labels", 1)
    with pytest.raises(Exited):
        faults.after_shard("/w/iter_1/sample_pairs", 1)


def test_malformed_step_is_named(exits):
    exits.setenv(faults.KILL_AFTER_STEP, "two")
    with pytest.raises(ValueError, match="DPOST_TEST_KILL_AFTER_STEP='two' is not a step number"):
        faults.for_stage("x")
