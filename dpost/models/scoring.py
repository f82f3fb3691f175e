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


def is_decoder_only(module) -> bool:
    """Decoder-only families expose hidden_states/logits; encoder-decoders (T5) have `encode`."""
    return hasattr(module, "hidden_states") and hasattr(module, "logits") and not hasattr(module, "encode")


def check_logits_chunk(chunk: int | None) -> None:
    if chunk is not None and (not isinstance(chunk, int) or chunk < 0):
        raise ValueError(f"logits_chunk must be a whole number of positions >= 0 (0 or None: all at once), got {chunk!r}")


def head_logprobs(module, params, hidden: jax.Array, targets: jax.Array, chunk: int | None = None) -> jax.Array:
    """log p(targets) [B, L] from final hidden states [B, L, D] through the family's vocab head.

    The log-softmax is fp32 (`scoring.token_logprobs_from_logits`). With `chunk`, positions are
    processed `chunk` at a time in a scan whose body is rematerialised, so at most one
    [B, chunk, V] block of logits exists at once, in the forward *and* the backward pass (at the
    price of recomputing the head matmul once in the backward pass).
    """
    check_logits_chunk(chunk)

    def piece(p, h, t):
        return token_logprobs_from_logits(module.apply({"params": p}, h, method="logits"), t)

    b, length, d = hidden.shape
    if not chunk or chunk >= length:
        return piece(params, hidden, targets)
    n = -(-length // chunk)
    pad = n * chunk - length
    h = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(b, n, chunk, d).swapaxes(0, 1)
    t = jnp.pad(targets, ((0, 0), (0, pad))).reshape(b, n, chunk).swapaxes(0, 1)
    body = jax.checkpoint(piece)
    _, out = jax.lax.scan(lambda carry, x: (carry, body(params, *x)), None, (h, t))
    return out.swapaxes(0, 1).reshape(b, n * chunk)[:, :length]


def completion_token_logprobs(module, params, prompt, prompt_mask, completion, completion_mask,
                              chunk: int | None = None) -> jax.Array:
    """[B, C] fp32 log-probs of each completion token (0 at padding). Pure; jit it at the call site.

    Without `chunk` (or for encoder-decoders) this is the family's `completion_logits`; with it, a
    decoder-only model runs the same computation with its vocab head `chunk` positions at a time
    (see head_logprobs)."""
    if not chunk or not is_decoder_only(module):
        logits = module.apply(
            {"params": params}, prompt, prompt_mask, completion, completion_mask, method="completion_logits"
        )
        return token_logprobs_from_logits(logits, completion) * completion_mask
    hidden = module.apply({"params": params}, prompt, prompt_mask, completion, completion_mask,
                          method="completion_hidden")
    return head_logprobs(module, params, hidden, completion, chunk) * completion_mask


@functools.partial(jax.jit, static_argnums=(0, 6))
def _sequence_logprobs(module, params, prompt, prompt_mask, completion, completion_mask, chunk=None):
    return completion_token_logprobs(module, params, prompt, prompt_mask, completion, completion_mask, chunk).sum(-1)


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


def padded_sequence_logprobs(bundle: ModelBundle, prompt, prompt_mask, completion, completion_mask,
                             chunk: int | None = None) -> np.ndarray:
    """`sequence_logprobs` of already padded arrays (prompt left-padded, completion right-padded);
    `chunk` bounds the vocab-sized logits held at once (decoder-only, see head_logprobs)."""
    out = _sequence_logprobs(bundle.module, bundle.params, prompt, prompt_mask, completion, completion_mask, chunk)
    return np.asarray(out, dtype=np.float64)
