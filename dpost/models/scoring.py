"""Log-probabilities of completions under a model (used by evaluation, DPO and tests)."""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dpost.data.batching import bucket_length, pad_rows
from dpost.models.bundle import ModelBundle


def token_logprobs_from_logits(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """log p(target) per position, log-softmax in fp32 without a second full-vocabulary copy."""
    return _logprobs_and_lse(logits, targets)[0]


def _logprobs_and_lse(logits, targets):
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    return jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0] - lse, lse


def is_decoder_only(module) -> bool:
    """Decoder-only families expose hidden_states/logits; encoder-decoders (T5) have `encode`."""
    return hasattr(module, "hidden_states") and hasattr(module, "logits") and not hasattr(module, "encode")


def check_logits_chunk(chunk: int | None) -> None:
    if chunk is not None and (not isinstance(chunk, int) or chunk < 0):
        raise ValueError(f"logits_chunk must be a whole number of positions >= 0 (0 or None: all at once), got {chunk!r}")


def head_logprobs(module, params, hidden: jax.Array, targets: jax.Array, chunk: int | None = None) -> jax.Array:
    """log p(targets) [B, L] from final hidden states [B, L, D] through the family's vocab head.

    The log-softmax is fp32 (`scoring.token_logprobs_from_logits`). With `chunk` (decoder-only
    families, which expose `vocab_head`), at most about `chunk` positions' worth of logits
    ([B, chunk, V] floats) exist at once, in the forward *and* the backward pass: see
    `_chunked_head_bwd` for how the gradient is split so that the head's own gradient is computed
    last, after the layers' backward pass has finished with its activations.
    """
    check_logits_chunk(chunk)
    b, length, d = hidden.shape
    if not chunk or chunk >= length:
        return token_logprobs_from_logits(module.apply({"params": params}, hidden, method="logits"), targets)
    n = -(-length // chunk)
    pad = n * chunk - length
    h = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(b, n, chunk, d).swapaxes(0, 1)
    t = jnp.pad(targets, ((0, 0), (0, pad))).reshape(b, n, chunk).swapaxes(0, 1)
    logps = _chunked_head(module, params, h, t)  # [n, B, chunk]
    return logps.swapaxes(0, 1).reshape(b, n * chunk)[:, :length]


# The chunked head. Rows of the head (`module.vocab_head`, [V, D] fp32 masters) are cast to the
# compute dtype once per pass (not per chunk) and multiplied as `Llama.logits` does; the
# log-softmax and its gradient are fp32.
def _rows(module, params):
    return module.apply({"params": params}, method="vocab_head")


def _logits(hidden, rows):
    return (hidden @ rows.T).astype(jnp.float32)


def _softmax_cotangent(logits, lse, ct, targets, first_row=0):
    """d(sum ct * log p(target)) / d logits = ct * (onehot(target) - softmax), all fp32, for the
    head rows first_row .. first_row + logits.shape[-1]."""
    onehot = targets[..., None] == first_row + jnp.arange(logits.shape[-1])
    return ct[..., None] * (onehot.astype(jnp.float32) - jnp.exp(logits - lse[..., None]))


def _chunked_head_fwd(module, params, h, t):
    head = _rows(module, params).astype(module.config.compute_dtype)

    def piece(_, x):
        hc, tc = x
        return None, _logprobs_and_lse(_logits(hc, head), tc)

    _, (logps, lse) = jax.lax.scan(piece, None, (h, t))
    return logps, (params, h, t, lse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _chunked_head(module, params, h, t):
    return _chunked_head_fwd(module, params, h, t)[0]


def _chunked_head_bwd(module, residuals, ct):
    """Two passes that each recompute the logits, block by block:

    1. over position chunks: d hidden (small), which the layers' backward pass needs next;
    2. over vocabulary blocks of about the same size: d head, each block of rows written once.

    Nothing in pass 2 feeds the layers' backward pass, so XLA schedules it after that pass: the
    head's [V, D] gradient is not held while the layers' gradients and activations are (the usual
    single pass would hold it from the first backward op to the optimizer update), and no
    [V, D] partial product is added per chunk. The price is one more head matmul per step.
    """
    params, h, t, lse = residuals
    rows = _rows(module, params)
    dt = module.config.compute_dtype
    vocab = rows.shape[0]
    head = rows.astype(dt)

    def d_hidden(_, x):
        hc, tc, lc, cc = x
        d_logits = _softmax_cotangent(_logits(hc, head), lc, cc, tc)
        return None, d_logits.astype(dt) @ head

    _, d_h = jax.lax.scan(d_hidden, None, (h, t, lse, ct))

    # Pass 2 over every position at once, `block` rows of the head at a time (each block cast on
    # its own, so no compute-dtype copy of the whole head is held at the end of the step).
    flat_h, flat_t = h.reshape(-1, h.shape[-1]), t.reshape(-1)
    flat_lse, flat_ct = lse.reshape(-1), ct.reshape(-1)
    block = max(1, vocab // h.shape[0])

    def d_rows(start, size):
        sub = jax.lax.dynamic_slice_in_dim(rows, start, size).astype(dt)
        d_logits = _softmax_cotangent(_logits(flat_h, sub), flat_lse, flat_ct, flat_t, start)
        return (d_logits.astype(dt).T @ flat_h).astype(jnp.float32)

    def block_step(d_head, i):
        start = i * block
        return jax.lax.dynamic_update_slice_in_dim(d_head, d_rows(start, block), start, 0), None

    n_blocks, rest = divmod(vocab, block)
    d_head, _ = jax.lax.scan(block_step, jnp.zeros(rows.shape, jnp.float32), jnp.arange(n_blocks))
    if rest:
        d_head = jax.lax.dynamic_update_slice_in_dim(d_head, d_rows(n_blocks * block, rest), n_blocks * block, 0)
    d_params = jax.vjp(lambda p: _rows(module, p), params)[1](d_head.astype(rows.dtype))[0]
    return d_params, d_h.astype(h.dtype), None


_chunked_head.defvjp(_chunked_head_fwd, _chunked_head_bwd)


def completion_token_logprobs(module, params, prompt, prompt_mask, completion, completion_mask,
                              chunk: int | None = None, rngs=None) -> jax.Array:
    """[B, C] fp32 log-probs of each completion token (0 at padding). Pure; jit it at the call site.

    Without `chunk` (or for encoder-decoders) this is the family's `completion_logits`; with it, a
    decoder-only model runs the same computation with its vocab head `chunk` positions at a time
    (see head_logprobs). `rngs`: {"dropout": key} for a module built with dropout (training)."""
    if not chunk or not is_decoder_only(module):
        logits = module.apply(
            {"params": params}, prompt, prompt_mask, completion, completion_mask, rngs=rngs, method="completion_logits"
        )
        return token_logprobs_from_logits(logits, completion) * completion_mask
    hidden = module.apply({"params": params}, prompt, prompt_mask, completion, completion_mask, rngs=rngs,
                          method="completion_hidden")
    return head_logprobs(module, params, hidden, completion, chunk) * completion_mask


@functools.partial(jax.jit, static_argnums=(0, 6))
def _sequence_logprobs(module, params, prompt, prompt_mask, completion, completion_mask, chunk=None):
    return completion_token_logprobs(module, params, prompt, prompt_mask, completion, completion_mask, chunk).sum(-1)


# Ragged scoring calls are few rows of short sequences; a smaller floor than collation's.
SCORING_MIN_BUCKET = 8


def _pad_ragged(rows: Sequence[Sequence[int]], pad_id: int, *, left: bool):
    length = bucket_length(max((len(r) for r in rows), default=1), minimum=SCORING_MIN_BUCKET)
    return pad_rows(rows, length, pad_id, left=left)


def sequence_logprobs(bundle: ModelBundle, prompt_ids, completion_ids) -> np.ndarray:
    """[B] sum over completion tokens of log p(token | prompt, earlier completion tokens).

    prompt_ids / completion_ids: lists of token-id lists (ragged). Prompts are left-padded and
    completions right-padded to power-of-two buckets, so repeated calls reuse compiled programs.
    """
    pad = bundle.pad_token_id
    prompt, prompt_mask = _pad_ragged(prompt_ids, pad, left=True)
    completion, completion_mask = _pad_ragged(completion_ids, pad, left=False)
    return padded_sequence_logprobs(bundle, prompt, prompt_mask, completion, completion_mask)


def padded_sequence_logprobs(bundle: ModelBundle, prompt, prompt_mask, completion, completion_mask,
                             chunk: int | None = None) -> np.ndarray:
    """`sequence_logprobs` of already padded arrays (prompt left-padded, completion right-padded);
    `chunk` bounds the vocab-sized logits held at once (decoder-only, see head_logprobs)."""
    out = _sequence_logprobs(bundle.module, bundle.params, prompt, prompt_mask, completion, completion_mask, chunk)
    return np.asarray(out, dtype=np.float64)
