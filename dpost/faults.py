"""Fault injection for tests: crash or preempt a run at a chosen point.

Tests that run dpost in a subprocess choose the fault through the environment; production sets
none of these, and every hook is then a no-op.

  DPOST_TEST_KILL_AFTER_STEP=N        hard exit (code 17, no cleanup) after training step N, once
                                      pending checkpoint saves are finished, so the kill lands
                                      between two checkpoints deterministically
  DPOST_TEST_KILL_STAGE=iter_1/dpo    restricts the kill to the training stage of that name
  DPOST_TEST_SIGTERM_AFTER_STEP=N     SIGTERM to this process after training step N (a preemption)
  DPOST_TEST_KILL_AFTER_SHARD=S:I     hard exit right after sampling shard I of the stage whose
                                      path ends with S (e.g. iter_1/sample_pairs:0) was written
"""

from __future__ import annotations

import dataclasses
import os
import signal
from typing import Callable

KILL_AFTER_STEP = "DPOST_TEST_KILL_AFTER_STEP"
KILL_STAGE = "DPOST_TEST_KILL_STAGE"
SIGTERM_AFTER_STEP = "DPOST_TEST_SIGTERM_AFTER_STEP"
KILL_AFTER_SHARD = "DPOST_TEST_KILL_AFTER_SHARD"
EXIT_CODE = 17


def _step(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not a step number") from None


@dataclasses.dataclass(frozen=True)
class StepFaults:
    """The faults of one training stage (None: none)."""

    kill_after: int | None = None
    sigterm_after: int | None = None

    def after_step(self, step: int) -> None:
        """Sends the SIGTERM chosen for this step (the loop then saves and stops as on a preemption)."""
        if step == self.sigterm_after:
            os.kill(os.getpid(), signal.SIGTERM)

    def after_save(self, step: int, wait_for_saves: Callable[[], None] | None) -> None:
        """Kills the process if this step was chosen, after the pending saves are done."""
        if step == self.kill_after:
            if wait_for_saves is not None:
                wait_for_saves()
            os._exit(EXIT_CODE)


def for_stage(stage_name: str) -> StepFaults:
    """The faults the environment chooses for the training stage ``stage_name``."""
    stage = os.environ.get(KILL_STAGE)
    kill = _step(KILL_AFTER_STEP) if stage in (None, stage_name) else None
    return StepFaults(kill_after=kill, sigterm_after=_step(SIGTERM_AFTER_STEP))


def after_shard(stage_path: str, shard: int) -> None:
    """Kills the process if the environment chose this sampling shard of this stage."""
    target = os.environ.get(KILL_AFTER_SHARD, "")
    if not target:
        return
    suffix, _, index = target.rpartition(":")
    if str(stage_path).endswith(suffix) and int(index) == shard:
        os._exit(EXIT_CODE)
