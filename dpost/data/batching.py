"""Batch shapes: the one padding and bucketing policy of training, scoring and sampling.

A jitted function compiles once per input shape, and padding costs compute, so lengths are rounded
up to a few buckets:

* ``bucket_length``: the next power of two (at least a minimum), for batches whose shape follows
  their own longest row (collation, scoring);
* ``quarter_octave_bucket``: the smallest 2^k * (1, 1.25, 1.5, 1.75) that fits, for sampler
  prompts: prefill and the KV cache every decode step reads scale with it, so it pads at most 25%;
* ``stage_length``: a multiple of 16 that fits a whole training stage's longest row, so a stage
  compiles one program.

Prompts are padded on the left (generation and the completion continue from their last token),
completions (``COMPLETION_KEYS``) on the right; masks are 1 on real tokens. A batch is filled up to
its size with filler rows that nothing counts: ``valid`` 0 (``fill_batch``: copies of its last row,
so every row stays a well-formed sequence).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

COMPLETION_KEYS = ("completion", "chosen", "rejected")
MIN_BUCKET = 16
STAGE_MULTIPLE = 16


def completion_keys(batch_or_item: Mapping) -> list[str]:
    """The completion keys present (``completion``, or ``chosen`` and ``rejected``), in order."""
    return [k for k in COMPLETION_KEYS if k in batch_or_item]


def bucket_length(n: int, cap: int | None = None, minimum: int = MIN_BUCKET) -> int:
    """Smallest power of two >= n (at least ``minimum``), capped at ``cap``."""
    size = max(minimum, 1 << max(0, int(n) - 1).bit_length())
    return size if cap is None else min(size, cap)


def quarter_octave_bucket(n: int, minimum: int = MIN_BUCKET) -> int:
    """The smallest of 2^k * (1, 1.25, 1.5, 1.75) that is >= n (>= minimum)."""
    n = max(int(n), minimum)
    power = 1 << max(0, n - 1).bit_length()  # 2^k >= n
    for quarters in (5, 6, 7):  # 1.25, 1.5, 1.75 of the octave below
        size = power // 8 * quarters
        if power >= 8 and size >= n:
            return size
    return power


def stage_length(n: int, cap: int, multiple: int = STAGE_MULTIPLE) -> int:
    """``n`` rounded up to a multiple of ``multiple``, capped at ``cap``."""
    return min(cap, -(-int(n) // multiple) * multiple)


def pad_rows(rows: Sequence[Sequence[int]], length: int, pad_id: int, *, left: bool) -> tuple[np.ndarray, np.ndarray]:
    """Ragged token rows -> (ids [B, length] int32, mask [B, length] int32), padded on the left or
    the right; a row longer than ``length`` is an error (callers filter or truncate first)."""
    ids = np.full((len(rows), length), pad_id, dtype=np.int32)
    mask = np.zeros((len(rows), length), dtype=np.int32)
    for i, row in enumerate(rows):
        n = len(row)
        if n > length:
            raise ValueError(f"sequence of {n} tokens does not fit length {length}")
        if n:
            sl = slice(length - n, length) if left else slice(0, n)
            ids[i, sl] = row
            mask[i, sl] = 1
    return ids, mask


def pad_to_lengths(batch: Mapping[str, np.ndarray], prompt_len: int | None = None,
                   completion_len: int | None = None, pad_id: int = 0) -> dict[str, np.ndarray]:
    """A padded batch widened to fixed lengths: prompts (and masks) on the left, completions on the
    right; None leaves that side as it is."""
    out = dict(batch)
    if prompt_len is not None and "prompt" in batch:
        out["prompt"], out["prompt_mask"] = _widen(batch, "prompt", prompt_len, pad_id, left=True)
    if completion_len is not None:
        for k in completion_keys(batch):
            out[k], out[k + "_mask"] = _widen(batch, k, completion_len, pad_id, left=False)
    return out


def _widen(batch, key: str, length: int, pad_id: int, *, left: bool) -> tuple[np.ndarray, np.ndarray]:
    extra = length - batch[key].shape[1]
    if extra < 0:
        raise ValueError(f"{key} length {batch[key].shape[1]} exceeds pad_to {length}")
    width = ((0, 0), (extra, 0) if left else (0, extra))
    return np.pad(batch[key], width, constant_values=pad_id), np.pad(batch[key + "_mask"], width)


def fill_batch(batch: Mapping[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """A batch of fewer than ``size`` rows filled up to ``size`` with copies of its last row, marked
    ``valid`` 0 when the batch has a ``valid`` column (callers without one drop the filler outputs)."""
    batch = dict(batch)
    short = size - len(next(iter(batch.values())))
    if short < 0:
        raise ValueError(f"a batch of {size - short} rows does not fit batch size {size}")
    if not short:
        return batch
    batch = {k: np.concatenate([v, np.repeat(v[-1:], short, 0)]) for k, v in batch.items()}
    if "valid" in batch:
        batch["valid"][-short:] = 0
    return batch
