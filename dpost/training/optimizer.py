"""Optimizer and learning-rate schedule (the release's transformers `Trainer` settings, in optax).

AdamW with decoupled weight decay (not applied to norm scales and biases, as transformers'
`Trainer`), global-norm gradient clipping, and a linear warm-up over `warmup_ratio` of the steps
followed by a cosine decay to `min_lr_rate` x peak (transformers'
`cosine_with_min_lr`). Parameters stay fp32 masters; the compute dtype is the model's business.

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
from typing import Any

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


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
    """Clipping (if `max_grad_norm`) then AdamW (or SGD) on the schedule.

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
    return optax.chain(*parts)
