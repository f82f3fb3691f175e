"""The train loop: one stage (SFT or DPO) for a number of steps over a data iterator.

    result = loop.run(step, state, data, LoopConfig(num_steps=..., save_every=..., ...),
                      workdir=..., checkpoint_dir=..., eval_fn=...)

* data: any iterator of numpy batch dicts. If it has `get_state()`/`set_state()` (grain's
  `DatasetIterator` has), its position is checkpointed with the train state and restored on
  resume; otherwise a resumed run skips the batches already consumed.
* resume: if `checkpoint_dir` holds a checkpoint, the stage continues from it (train state, RNG,
  data position); the final params equal those of an uninterrupted run, bit for bit.
* saves: every `save_every` steps and at the end (Orbax, async), keeping the last `keep`.
* SIGTERM: the loop finishes the current step, saves, and raises `Preempted` (a SystemExit).
  Multi-host: the hosts first agree (`distributed.StopVote`, one step later), so a SIGTERM to one
  host stops every host at the same step with one collective save.
* logs: stdout, `<workdir>/metrics.jsonl` and TensorBoard (`<workdir>/tb`), process 0 only;
  a tqdm bar shows loss and tokens/s.
* shapes: `pad_to` pads every batch to fixed lengths so a stage compiles one program.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
import time
from typing import Any, Callable, Iterator, Mapping

import jax
import numpy as np

from dpost import distributed, faults
from dpost.data.batching import COMPLETION_KEYS, pad_to_lengths
from dpost.sharding import Layout
from dpost.training import checkpoints as ckpt_lib
from dpost.training.state import TrainState

log = logging.getLogger(__name__)

@dataclasses.dataclass(frozen=True)
class LoopConfig:
    num_steps: int
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate at the end only (when an eval_fn is given)
    save_every: int = 0  # 0: save at the end only (when a checkpoint_dir is given)
    keep: int | None = 2
    async_checkpointing: bool = True
    progress: bool = True  # tqdm bar (process 0)
    name: str = "train"  # stage name: prefixes log lines, names the TensorBoard run
    save_at_end: bool = True


@dataclasses.dataclass
class LoopResult:
    state: TrainState
    steps: int  # steps run in this call (after a resume: only the remaining ones)
    final_step: int
    resumed_from: int | None
    history: list[dict]  # logged train metrics
    eval_history: list[dict]
    seconds: float
    tokens: int


def steps_for_epochs(num_examples: int, batch_size: int, epochs: float, drop_remainder: bool = True) -> int:
    """Number of optimizer steps for `epochs` passes over `num_examples` at `batch_size`."""
    per_epoch = num_examples // batch_size if drop_remainder else math.ceil(num_examples / batch_size)
    return max(1, int(math.ceil(per_epoch * epochs)))


# --------------------------------------------------------------------------------------------------
# batches
# --------------------------------------------------------------------------------------------------
def count_tokens(batch: Mapping[str, np.ndarray]) -> int:
    """Non-padding tokens the step processes (a pair batch runs the prompt twice)."""
    keys = [k for k in COMPLETION_KEYS if k + "_mask" in batch]
    prompt = int(np.asarray(batch["prompt_mask"]).sum()) if "prompt_mask" in batch else 0
    return prompt * max(1, len(keys)) + sum(int(np.asarray(batch[k + "_mask"]).sum()) for k in keys)


def put_batch(batch: Mapping[str, Any], layout: Layout = Layout()) -> dict[str, jax.Array]:
    """Numeric arrays of a host batch onto the devices (sharded along `batch` by the layout; each
    process contributes its local rows). Non-numeric entries (ids, texts) are dropped."""
    arrays = {k: np.asarray(v) for k, v in batch.items() if isinstance(v, (np.ndarray, jax.Array))
              and np.asarray(v).dtype.kind in "biuf"}
    if layout.mesh is None:
        return jax.device_put(arrays)
    out = {}
    for k, v in arrays.items():
        out[k] = jax.make_array_from_process_local_data(layout.batch(v.ndim), v)
    return out


# --------------------------------------------------------------------------------------------------
# logging
# --------------------------------------------------------------------------------------------------
class MetricLogger:
    """stdout + JSONL + TensorBoard (tensorboardX), written by process 0 only."""

    def __init__(self, workdir: str | None, name: str, stdout: bool = True, write=None):
        self.name = name
        self.enabled = jax.process_index() == 0
        self.stdout = stdout
        self.write_line = write or (lambda s: print(s, flush=True))
        self._jsonl = None
        self._tb = None
        if workdir and self.enabled:
            os.makedirs(workdir, exist_ok=True)
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
            try:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(os.path.join(workdir, "tb", name))
            except Exception as err:  # pragma: no cover - tensorboardX is a dependency
                log.warning("TensorBoard logging disabled: %s", err)

    def log(self, step: int, metrics: Mapping[str, float], prefix: str = "") -> None:
        if not self.enabled:
            return
        values = {prefix + k: float(v) for k, v in metrics.items()}
        if self.stdout:
            shown = " ".join(f"{k}={_fmt(v)}" for k, v in values.items())
            self.write_line(f"[{self.name}] step {step}: {shown}")
        if self._jsonl is not None:
            self._jsonl.write(json.dumps({"stage": self.name, "step": step, "time": time.time(), **values}) + "\n")
            self._jsonl.flush()
        if self._tb is not None:
            for k, v in values.items():
                if math.isfinite(v):
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def _fmt(v: float) -> str:
    return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"


# --------------------------------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------------------------------
def _abstract_state(state: TrainState) -> TrainState:
    return ckpt_lib.abstract_like(state)


def run(
    step_fn: Callable[[TrainState, Any], tuple[TrainState, dict]],
    state: TrainState,
    data: Iterator[Mapping[str, np.ndarray]],
    cfg: LoopConfig,
    *,
    workdir: str | None = None,
    checkpoint_dir: str | None = None,
    eval_fn: Callable[[TrainState], Mapping[str, float]] | None = None,
    layout: Layout = Layout(),
    pad_to: tuple[int | None, int | None] | None = None,
    pad_id: int = 0,
    meta: Mapping[str, Any] | None = None,
) -> LoopResult:
    """Runs `cfg.num_steps` optimizer steps of `step_fn` (see module doc).

    step_fn(state, device_batch) -> (state, metrics): a step from `steps.make_*_step` (bind the
    DPO reference with functools.partial or a lambda). eval_fn(state) -> metrics, logged with an
    `eval/` prefix. pad_to: (prompt_len, completion_len) for fixed shapes.
    """
    logger = MetricLogger(workdir, cfg.name)
    ckpt = None
    resumed_from = None
    if checkpoint_dir:
        ckpt = ckpt_lib.Checkpointer(checkpoint_dir, save_every=cfg.save_every, keep=cfg.keep,
                                     async_save=cfg.async_checkpointing)
        latest = ckpt.latest_step()
        if latest is not None:
            state, data_state, _ = ckpt.restore(_abstract_state(state), latest)
            resumed_from = latest
            if data_state is not None and hasattr(data, "set_state"):
                data.set_state(data_state)
            else:
                log.warning("resuming without a data position: skipping %d batches", latest)
                for _ in range(latest):
                    next(data)
            logger.write_line(f"[{cfg.name}] resumed from step {latest} ({checkpoint_dir})")

    start_step = int(jax.device_get(state.step))
    history: list[dict] = []
    eval_history: list[dict] = []
    injected = faults.for_stage(cfg.name)  # tests only
    meta = dict(meta or {}, stage=cfg.name, num_steps=cfg.num_steps)

    bar = None
    if cfg.progress and jax.process_index() == 0:
        from tqdm import tqdm

        bar = tqdm(total=cfg.num_steps, initial=start_step, desc=cfg.name, dynamic_ncols=True, file=sys.stderr,
                   mininterval=1.0)
        logger.write_line = lambda s: bar.write(s)

    def data_state():
        return data.get_state() if hasattr(data, "get_state") else None

    def do_eval(step):
        if eval_fn is None:
            return
        metrics = {k: float(v) for k, v in eval_fn(state).items()}
        eval_history.append({"step": step, **metrics})
        logger.log(step, metrics, prefix="eval/")

    t_start = time.perf_counter()
    t_window, tokens_window, tokens_total = t_start, 0, 0
    pending: list[tuple[int, dict]] = []  # device metrics not yet fetched (keeps dispatch async)
    step = start_step
    stop_vote = distributed.StopVote()
    stop_requested = False  # sticky: JAX's preemption sync point is True at one step only
    try:
        with ckpt_lib.PreemptionGuard() as guard:
            while step < cfg.num_steps:
                try:
                    batch = next(data)
                except StopIteration:
                    log.warning("data exhausted after %d steps (planned %d)", step, cfg.num_steps)
                    break
                if pad_to is not None:
                    batch = pad_to_lengths(batch, pad_to[0], pad_to[1], pad_id)
                n_tokens = count_tokens(batch)
                tokens_window += n_tokens
                tokens_total += n_tokens
                position = data_state()
                state, metrics = step_fn(state, put_batch(batch, layout))
                step += 1
                pending.append((step, metrics))

                if step % max(1, cfg.log_every) == 0 or step == cfg.num_steps:
                    fetched = jax.device_get(pending)
                    pending.clear()
                    now = time.perf_counter()
                    for s, m in fetched:
                        row = {k: float(v) for k, v in m.items()}
                        history.append({"step": s, **row})
                    row = dict(history[-1])
                    row.pop("step")
                    row["tokens_per_sec"] = tokens_window / max(now - t_window, 1e-9)
                    logger.log(step, row)
                    if bar is not None:
                        bar.set_postfix(loss=f"{row.get('loss', float('nan')):.4f}",
                                        tok_s=f"{row['tokens_per_sec']:.0f}", refresh=False)
                    t_window, tokens_window = now, 0
                if bar is not None:
                    bar.update(1)

                if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.num_steps:
                    do_eval(step)
                if ckpt is not None:
                    ckpt.save(state, data_state=position, meta=meta, step=step)
                injected.after_step(step)
                stop_requested = guard.should_stop(step) or stop_requested
                if stop_vote.decided(stop_requested, last=step == cfg.num_steps):
                    if ckpt is not None:
                        ckpt.save(state, data_state=position, meta=meta, force=True)
                        ckpt.wait()
                        logger.write_line(f"[{cfg.name}] preempted: saved step {step}, exiting")
                    raise ckpt_lib.Preempted(step)
                injected.after_save(step, ckpt.wait if ckpt is not None else None)
            if pending:
                for s, m in jax.device_get(pending):
                    history.append({"step": s, **{k: float(v) for k, v in m.items()}})
                pending.clear()
            if eval_fn is not None:
                do_eval(step)
            if ckpt is not None and cfg.save_at_end:
                ckpt.save(state, data_state=data_state(), meta=meta, force=True)
    finally:
        if bar is not None:
            bar.close()
        if ckpt is not None:
            ckpt.close()
        logger.close()
    jax.block_until_ready(state)
    return LoopResult(
        state=state,
        steps=step - start_step,
        final_step=step,
        resumed_from=resumed_from,
        history=history,
        eval_history=eval_history,
        seconds=time.perf_counter() - t_start,
        tokens=tokens_total,
    )


# --------------------------------------------------------------------------------------------------
# evaluation helpers
# --------------------------------------------------------------------------------------------------
def evaluate_sft(eval_step, params, batches, *, layout: Layout = Layout(), pad_to=None, pad_id: int = 0) -> dict:
    """Mean target-token NLL (and perplexity) of params over an iterable of batches."""
    nll, tokens = 0.0, 0.0
    for batch in batches:
        if pad_to is not None:
            batch = pad_to_lengths(batch, pad_to[0], pad_to[1], pad_id)
        out = jax.device_get(eval_step(params, put_batch(batch, layout)))
        nll += float(out["nll_sum"])
        tokens += float(out["tokens"])
    loss = nll / max(tokens, 1.0)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": tokens}


def evaluate_dpo(eval_step, params, batches, ref_params=None, *, layout: Layout = Layout(), pad_to=None,
                 pad_id: int = 0) -> dict:
    """DPO metrics (mean over valid pairs) of params over an iterable of pair batches."""
    sums: dict[str, float] = {}
    for batch in batches:
        if pad_to is not None:
            batch = pad_to_lengths(batch, pad_to[0], pad_to[1], pad_id)
        out = jax.device_get(eval_step(params, put_batch(batch, layout), ref_params))
        for k, v in out.items():
            sums[k] = sums.get(k, 0.0) + float(v)
    pairs = max(sums.pop("pairs", 0.0), 1.0)
    chosen_tokens = max(sums.pop("chosen_tokens", 0.0), 1.0)
    out = {k: v / pairs for k, v in sums.items() if k != "nll"}
    out["nll"] = sums.get("nll", 0.0) / chosen_tokens
    out["pairs"] = pairs
    return out
