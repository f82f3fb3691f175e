"""Train-state checkpoints on Orbax's CheckpointManager (local paths or gs://).

Layout of one checkpoint, `<directory>/<step>/`:
  params/  the model parameters alone (fp32 masters): enough for eval or as the next stage's
           reference, and readable without knowing the optimizer
  train/   {step, opt_state, rng}: with params, the full TrainState for resuming a stage
  data/    JSON: the data iterator's position (`get_state()`), base64 where it is bytes
  meta/    JSON: free-form (stage name, planned steps, ...)

Restores check the stored tree against the target first: a key or shape that does not match the
model raises `CheckpointMismatchError` naming the key and both shapes. `PreemptionGuard` turns
SIGTERM into a flag the train loop polls, so it can save before exiting.
"""

from __future__ import annotations

import base64
import logging
import signal
import threading
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from dpost.training.state import TrainState
from dpost.trees import CheckpointMismatchError, check_tree_matches  # noqa: F401 (CheckpointMismatchError: re-exported)

log = logging.getLogger(__name__)

ITEMS = ("params", "train", "data", "meta")


# --------------------------------------------------------------------------------------------------
# tree comparison
# --------------------------------------------------------------------------------------------------
def _to_nested(tree) -> Any:
    """Pytree (dicts, lists, namedtuples, dataclasses) -> nested dict with str keys, for comparing."""
    if isinstance(tree, dict) or hasattr(tree, "items"):
        return {str(k): _to_nested(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)) and not hasattr(tree, "shape"):
        if hasattr(tree, "_fields"):  # namedtuple
            return {f: _to_nested(getattr(tree, f)) for f in tree._fields}
        return {str(i): _to_nested(v) for i, v in enumerate(tree)}
    return tree


# --------------------------------------------------------------------------------------------------
# data-iterator state <-> JSON
# --------------------------------------------------------------------------------------------------
def _encode(obj):
    if isinstance(obj, bytes):
        return {"__bytes__": base64.b64encode(obj).decode("ascii")}
    if isinstance(obj, dict):
        return {str(k): _encode(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_encode(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _decode(obj):
    if isinstance(obj, dict):
        if set(obj) == {"__bytes__"}:
            return base64.b64decode(obj["__bytes__"])
        return {k: _decode(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v) for v in obj]
    return obj


# --------------------------------------------------------------------------------------------------
# manager
# --------------------------------------------------------------------------------------------------
def _handlers():
    return {
        "params": ocp.StandardCheckpointHandler(),
        "train": ocp.StandardCheckpointHandler(),
        "data": ocp.JsonCheckpointHandler(),
        "meta": ocp.JsonCheckpointHandler(),
    }


def _with_shardings(abstract: Any) -> Any:
    """ShapeDtypeStructs without a sharding get the first device (Orbax needs one to restore)."""
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def fix(x):
        sharding = getattr(x, "sharding", None)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding if sharding is not None else device)

    return jax.tree.map(fix, abstract)


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with the arrays' shardings) of a pytree of arrays."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree
    )


class Checkpointer:
    """CheckpointManager wrapper: periodic/forced saves of a TrainState (+ data position, meta),
    keeping the last `keep`; full or params-only restores with shape checks.

    save_every: save when step % save_every == 0 (0 = only forced saves, e.g. at the end).
    """

    def __init__(self, directory: str, *, save_every: int = 0, keep: int | None = 2, async_save: bool = True):
        self.directory = epath.Path(directory)
        self.save_every = int(save_every)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            enable_async_checkpointing=async_save,
            # We decide when to save (should_save); Orbax only keeps/cleans up.
            save_interval_steps=1,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=_handlers())

    # -- queries --------------------------------------------------------------------------------------
    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def should_save(self, step: int) -> bool:
        return self.save_every > 0 and step > 0 and step % self.save_every == 0

    # -- save -----------------------------------------------------------------------------------------
    def save(self, state: TrainState, *, data_state: Any = None, meta: dict | None = None, force: bool = False,
             step: int | None = None) -> bool:
        """Saves at `state.step` (if due, or `force`). Returns whether a save was started. Callers that
        track the step on the host pass it as `step`: reading `state.step` would wait for the step's
        computation and stop the host from dispatching ahead."""
        step = int(jax.device_get(state.step)) if step is None else int(step)
        if not force and not self.should_save(step):
            return False
        if step in self.manager.all_steps():
            return False
        train = {"step": state.step, "opt_state": state.opt_state, "rng": state.rng}
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(state.params),
            train=ocp.args.StandardSave(train),
            data=ocp.args.JsonSave({"state": _encode(data_state)}),
            meta=ocp.args.JsonSave(dict(meta or {}, step=step)),
        )
        saved = self.manager.save(step, args=args, force=True)
        log.info("checkpoint: saving step %d to %s%s", step, self.directory, "" if saved else " (skipped)")
        return saved

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- restore --------------------------------------------------------------------------------------
    def _resolve(self, step: int | None) -> int:
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        return step

    def _stored(self, step: int, item: str):
        meta = self.manager.item_metadata(step)
        tree = meta[item] if not hasattr(meta, item) else getattr(meta, item)
        tree = getattr(tree, "tree", tree)
        return tree

    def restore_params(self, abstract_params: Any, step: int | None = None) -> Any:
        """Params alone (eval, or the next stage's reference). abstract_params: ShapeDtypeStructs
        (with shardings where the result should be sharded)."""
        step = self._resolve(step)
        check_tree_matches(self._stored(step, "params"), abstract_params, f"checkpoint {self.directory}/{step}")
        out = self.manager.restore(
            step, args=ocp.args.Composite(params=ocp.args.StandardRestore(_with_shardings(abstract_params)))
        )
        return out["params"]

    def restore(self, abstract_state: TrainState, step: int | None = None) -> tuple[TrainState, Any, dict]:
        """(TrainState, data-iterator state or None, meta) from the checkpoint at `step` (latest)."""
        step = self._resolve(step)
        where = f"checkpoint {self.directory}/{step}"
        train_target = {"step": abstract_state.step, "opt_state": abstract_state.opt_state, "rng": abstract_state.rng}
        check_tree_matches(self._stored(step, "params"), abstract_state.params, where)
        check_tree_matches(self._stored(step, "train"), _to_nested(train_target), where + " (optimizer state)")
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(_with_shardings(abstract_state.params)),
                train=ocp.args.StandardRestore(_with_shardings(train_target)),
                data=ocp.args.JsonRestore(),
                meta=ocp.args.JsonRestore(),
            ),
        )
        train = out["train"]
        state = TrainState(step=train["step"], params=out["params"], opt_state=train["opt_state"], rng=train["rng"])
        return state, _decode((out["data"] or {}).get("state")), dict(out["meta"] or {})


def restore_params(directory: str, abstract_params: Any, step: int | None = None) -> Any:
    """Params from a train checkpoint directory (latest step by default); see Checkpointer.restore_params."""
    ckpt = Checkpointer(directory, async_save=False)
    try:
        return ckpt.restore_params(abstract_params, step)
    finally:
        ckpt.close()


# --------------------------------------------------------------------------------------------------
# preemption
# --------------------------------------------------------------------------------------------------
class Preempted(SystemExit):
    """Raised by the train loop after it saved a checkpoint in response to SIGTERM."""

    def __init__(self, step: int):
        super().__init__(128 + signal.SIGTERM)
        self.step = step


class PreemptionGuard:
    """Within `with PreemptionGuard() as g:`, SIGTERM sets `g.requested` instead of killing the
    process (previous handlers are restored on exit). On multi-host runs, also polls JAX's
    preemption sync point so every host saves at the same step."""

    def __init__(self, signals=(signal.SIGTERM,)):
        self.signals = tuple(signals)
        self.requested = False
        self._previous = {}

    def _handler(self, signum, frame):
        log.warning("received signal %d: will checkpoint and exit after the current step", signum)
        self.requested = True

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous.clear()

    def should_stop(self, step: int) -> bool:
        if self.requested:
            return True
        if jax.process_count() > 1:
            try:
                from jax.experimental import multihost_utils

                return bool(multihost_utils.reached_preemption_sync_point(step))
            except Exception:  # preemption service not initialised
                return False
        return False
