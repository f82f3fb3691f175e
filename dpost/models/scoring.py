"""Log-probabilities of completions under a model (used by evaluation, DPO and tests)."""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dpost.models.bundle import ModelBundle


def token_logprobs_from_logits(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """log p(target) per position, log-softmax in fp32 without a second full-vocabulary copy."""
    logits = logits.astype(jnp.float32)
    target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return target_logits - jax.nn.logsumexp(logits, axis=-1)


def completion_token_logprobs(module, params, prompt, prompt_mask, completion, completion_mask) -> jax.Array:
    """[B, C] fp32 log-probs of each completion token (0 at padding). Pure; jit it at the call site."""
    logits = module.apply(
        {"params": params}, prompt, prompt_mask, completion, completion_mask, method="completion_logits"
    )
    return token_logprobs_from_logits(logits, completion) * completion_mask


@functools.partial(jax.jit, static_argnums=0)
def _sequence_logprobs(module, params, prompt, prompt_mask, completion, completion_mask):
    return completion_token_logprobs(module, params, prompt, prompt_mask, completion, completion_mask).sum(-1)


def bucket_length(n: int, minimum: int = 8) -> int:
    """Next power of two >= n (>= minimum): a handful of shapes means a handful of compilations."""
    return max(minimum, 1 << max(0, int(n) - 1).bit_length())


def prompt_bucket(n: int, minimum: int = 16) -> int:
    """The sampler's prompt-length bucket: the smallest of 2^k * (1, 1.25, 1.5, 1.75) that is >= n
    (>= minimum). Quarter-octave steps pad at most 25%: prefill compute and the KV cache that every
    decode step reads scale with the bucket, and a run still compiles only a few prompt shapes."""
    n = max(int(n), minimum)
    power = 1 << max(0, n - 1).bit_length()  # 2^k >= n
    for quarters in (5, 6, 7):  # 1.25, 1.5, 1.75 of the octave below
        size = power // 8 * quarters
        if power >= 8 and size >= n:
            return size
    return power


def pad_batch(rows: Sequence[Sequence[int]], pad_id: int, left: bool, length: int | None = None):
    """Ragged token lists -> (ids [B, L] int32, mask [B, L] int32), padded left or right."""
    length = length or bucket_length(max((len(r) for r in rows), default=1))
    ids = np.full((len(rows), length), pad_id, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for i, row in enumerate(rows):
        row = list(row)[-length:] if left else list(row)[:length]
        sl = slice(length - len(row), length) if left else slice(0, len(row))
        ids[i, sl] = row
        mask[i, sl] = 1
    return ids, mask


def sequence_logprobs(bundle: ModelBundle, prompt_ids, completion_ids) -> np.ndarray:
    """[B] sum over completion tokens of log p(token | prompt, earlier completion tokens).

    prompt_ids / completion_ids: lists of token-id lists (ragged). Prompts are left-padded and
    completions right-padded to power-of-two buckets, so repeated calls reuse compiled programs.
    """
    pad = bundle.pad_token_id
    prompt, prompt_mask = pad_batch(prompt_ids, pad, left=True)
    completion, completion_mask = pad_batch(completion_ids, pad, left=False)
    return padded_sequence_logprobs(bundle, prompt, prompt_mask, completion, completion_mask)


def padded_sequence_logprobs(bundle: ModelBundle, prompt, prompt_mask, completion, completion_mask) -> np.ndarray:
    """`sequence_logprobs` of already padded arrays (prompt left-padded, completion right-padded)."""
    out = _sequence_logprobs(bundle.module, bundle.params, prompt, prompt_mask, completion, completion_mask)
    return np.asarray(out, dtype=np.float64)
