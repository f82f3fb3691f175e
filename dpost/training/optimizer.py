"""Optimizer and learning-rate schedule (the release's transformers `Trainer` settings, in optax).

AdamW with decoupled weight decay (not applied to norm scales and biases, as transformers'
`Trainer`), global-norm gradient clipping, and a linear warm-up over `warmup_ratio` of the steps
followed by a cosine decay to `min_lr_rate` x peak (transformers'
`cosine_with_min_lr`). Parameters stay fp32 masters; the compute dtype is the model's business.

`average_last=f` (0 < f <= 1) also keeps the uniform average of the parameters after each of the
last ceil(f x total_steps) updates (Polyak-Ruppert tail averaging) in the optimizer state, so it is
checkpointed and resumed with the run; `final_params` returns it as the stage's trained model. The
last iterate of a short fine-tune depends on the order of its final batches; the tail average
depends on it less (the release trains without it: f = 0).

`moments_dtype="bfloat16"` stores AdamW's first moment in bf16 (optax's `mu_dtype`), saving a
quarter of the optimizer state; this changes the numerics: each step computes the new first moment
in fp32 from the bf16-stored one and the fp32 gradient, applies it unrounded, then stores it rounded
to bf16. The second moment stays fp32 (optax has no dtype option for it, and its squared gradients
span a range bf16's 8-bit mantissa would coarsen most where the update divides by them).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Hyper-parameters of one stage's optimizer (defaults live in configs/, not here)."""

    learning_rate: float
    total_steps: int
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    min_lr_rate: float = 0.0
    max_grad_norm: float | None = 1.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    kind: str = "adamw"  # "adamw" | "sgd" (sgd: plain `p -= lr * g`, for tests and ablations)
    schedule: str = "cosine"  # "cosine" (warm-up + cosine to min_lr_rate) | "constant"
    no_decay_pattern: str = r"(bias|norm)"  # params whose path matches get no weight decay
    moments_dtype: str = "float32"  # AdamW's first moment: MOMENTS_DTYPES (the second stays fp32)
    average_last: float = 0.0  # > 0: the trained params are the average over this fraction of the last steps


MOMENTS_DTYPES = ("float32", "bfloat16")


def warmup_steps(cfg: OptimizerConfig) -> int:
    """transformers' `get_warmup_steps`: ceil(ratio x total)."""
    return int(math.ceil(cfg.total_steps * cfg.warmup_ratio))


def make_schedule(cfg: OptimizerConfig) -> optax.Schedule:
    """lr(step) for step = 0, 1, ... (the update count before the update, as torch's LambdaLR)."""
    peak = float(cfg.learning_rate)
    if cfg.schedule == "constant":
        return optax.constant_schedule(peak)
    if cfg.schedule != "cosine":
        raise ValueError(f"unknown schedule {cfg.schedule!r}; expected 'cosine' or 'constant'")
    warm = warmup_steps(cfg)
    decay = max(1, cfg.total_steps - warm)
    floor = float(cfg.min_lr_rate)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        ramp = step / max(1, warm)
        progress = (step - warm) / decay
        cosine = 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        cosine = jnp.maximum(0.0, cosine * (1.0 - floor) + floor)
        return peak * jnp.where(step < warm, ramp, cosine)

    return schedule


def decay_mask(params: Any, pattern: str = OptimizerConfig.no_decay_pattern) -> Any:
    """True for params that get weight decay: everything whose '/'-joined path misses `pattern`."""
    regex = re.compile(pattern, re.IGNORECASE)
    flat = traverse_util.flatten_dict(dict(params))
    mask = {path: regex.search("/".join(str(p) for p in path)) is None for path in flat}
    return traverse_util.unflatten_dict(mask)


class TailAverageState(NamedTuple):
    updates: jax.Array  # int32 scalar: updates seen so far
    average: Any  # params pytree: mean of the params after each update in the tail (params before it starts)


def averaged_steps(cfg: OptimizerConfig) -> int:
    """How many final updates `average_last` averages over: ceil(fraction x total), at least 1."""
    return max(1, int(math.ceil(cfg.total_steps * cfg.average_last)))


def tail_average(total_steps: int, num_averaged: int) -> optax.GradientTransformation:
    """Leaves the updates alone; its state keeps the uniform average of the params after each of the
    last `num_averaged` of `total_steps` updates (chain it last, so `updates` are the final ones)."""
    first = total_steps - num_averaged + 1  # the first update (counted from 1) that enters the average

    def init(params):
        return TailAverageState(updates=jnp.zeros((), jnp.int32), average=jax.tree.map(jnp.copy, params))

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("tail_average needs the params: call update(updates, state, params)")
        count = state.updates + 1
        new_params = optax.apply_updates(params, updates)
        seen = count - first + 1  # updates in the tail so far, this one included
        weight = jnp.where(seen >= 1, 1.0 / jnp.maximum(seen, 1).astype(jnp.float32), 0.0)
        average = optax.incremental_update(new_params, state.average, weight)
        return updates, TailAverageState(updates=count, average=average)

    return optax.GradientTransformation(init, update)


def final_params(params: Any, opt_state: Any) -> Any:
    """A stage's trained params: the tail average where the optimizer keeps one, else `params`."""
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, TailAverageState))
             if isinstance(s, TailAverageState)]
    return found[0].average if found else params


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
    """Clipping (if `max_grad_norm`) then AdamW (or SGD) on the schedule, then (if `average_last`)
    the tail average of the params.

    The current learning rate is recoverable from the optimizer state (see `current_lr`) and the
    step builders log it as `learning_rate`.
    """
    schedule = make_schedule(cfg)
    if cfg.moments_dtype not in MOMENTS_DTYPES:
        raise ValueError(f"unknown moments_dtype {cfg.moments_dtype!r}; expected one of {MOMENTS_DTYPES}")
    parts = []
    if cfg.max_grad_norm:
        parts.append(optax.clip_by_global_norm(cfg.max_grad_norm))
    if cfg.kind == "adamw":
        parts.append(
            optax.adamw(
                schedule,
                b1=cfg.b1,
                b2=cfg.b2,
                eps=cfg.eps,
                weight_decay=cfg.weight_decay,
                mask=lambda p: decay_mask(p, cfg.no_decay_pattern),
                mu_dtype=jnp.dtype(cfg.moments_dtype),
            )
        )
    elif cfg.kind == "sgd":
        parts.append(optax.sgd(schedule))
    else:
        raise ValueError(f"unknown optimizer kind {cfg.kind!r}; expected 'adamw' or 'sgd'")
    if not 0.0 <= cfg.average_last <= 1.0:
        raise ValueError(f"average_last {cfg.average_last!r} must lie in [0, 1] (0: the last iterate)")
    if cfg.average_last > 0:
        parts.append(tail_average(cfg.total_steps, averaged_steps(cfg)))
    return optax.chain(*parts)
