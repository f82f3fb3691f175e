"""Continuous batching: a fixed number of slots decode in flight; a finished row's slot is refilled.

Compiled programs per (model, slot count, cache shape, static sampling options):

* ``empty_program``: the slot state (every slot finished), shaped like the model's ``prefill``
  state with ``num_slots`` rows.
* ``refill_program``: ``prefill`` of the prompts whose rows start now (all of a prompt's waiting
  samples at once, so each prompt is prefilled once; their count rounded up to a power of two, so
  one program per such count), its rows gathered for the (prompt, sample) rows that start now and
  written into their slots (rows whose slot is ``num_slots`` are dropped).
* ``decode_program``: the sampler's decode ``while_loop`` over the slots, one batched
  ``decode_step`` per step (the models keep a per-row cache slot, position and key mask, so slots
  at different positions share the step). It leaves when enough slots are free to refill
  (``refill_at``), when a calculator event needs the host, or when every slot is done.

The host loop (``run``) takes (prompt, sample) rows in order, refills free slots, harvests finished
ones and answers calculator events. A row's randomness is keyed on (seed, prompt index, sample
index, its own decode position) (``sampler.emit_tokens``), so what it samples does not depend on
its slot, its companions or when it started. Every slot is padded to the call's longest prompt,
so the outputs equal static batching's bit for bit where a static chunk has that width and as
many rows as there are slots, and up to fp32 rounding elsewhere (see the package doc).
"""

from __future__ import annotations

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from dpost.data.batching import pad_rows
from dpost.sampling import forcing
from dpost.sampling.sampler import Program, StaticOptions, emit_tokens, row_state, take_queue

REFILL_FRACTION = 8  # refill once this fraction (1/8) of the slots, and at least one, is free


def _prefill(module, opts: StaticOptions, params, prompt, prompt_mask):
    with opts.layout.activation_rules():
        return module.apply({"params": params}, prompt, prompt_mask, opts.max_new_tokens, 1, method="prefill")


def _empty(module, opts: StaticOptions, params, prompt):
    """Slot state with every slot finished; `prompt` [num_slots, P]: only its shape is read."""
    n = prompt.shape[0]
    logits, model = jax.eval_shape(lambda p: _prefill(module, opts, p, prompt, prompt), params)
    model = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), model)
    zeros = jnp.zeros((n,), jnp.int32)
    state = row_state(model, jnp.zeros(logits.shape, jnp.float32), zeros, zeros, jnp.ones((n,), bool), 0, opts)
    return _constrain_rows(state, opts)


def _constrain_rows(state, opts: StaticOptions):
    if opts.layout.mesh is None:
        return state
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, opts.layout.batch(x.ndim)), state)


def _refill(module, opts: StaticOptions, params, state, prompt, prompt_mask, source, slot, prompt_index,
            sample_index, calc_start):
    """Starts rows: `prompt` [G, P] (G fixed per call); row k continues prompt `source[k]` in slot
    `slot[k]` (== num_slots: no row)."""
    logits, model = _prefill(module, opts, params, prompt, prompt_mask)
    count = source.shape[0]
    model = jax.tree.map(lambda x: x[source], model)
    new = row_state(model, logits[source], prompt_index, sample_index, jnp.zeros((count,), bool), calc_start, opts)
    return jax.tree.map(lambda old, rows: old.at[slot].set(rows.astype(old.dtype), mode="drop"), state, new)


def _decode(module, opts: StaticOptions, params, state, queue, queue_len, temperature, top_p, seed,
            next_state_table, event_table, refill_at):
    state = take_queue(state, queue, queue_len)

    def cond(st):
        done = st["done"]
        return ~jnp.all(done) & ~jnp.any(st["event"]) & (jnp.sum(done.astype(jnp.int32)) < refill_at)

    def body(st):
        st, token = emit_tokens(st, temperature, top_p, seed, next_state_table, event_table, opts)
        with opts.layout.activation_rules():
            logits, st["model"] = module.apply({"params": params}, token, st["model"], method="decode_step")
        st["logits"] = logits.astype(jnp.float32)
        return st

    return jax.lax.while_loop(cond, body, state)


empty_program = Program(_empty)
refill_program = Program(_refill, donate=(3,))
decode_program = Program(_decode, donate=(3,))


def plan_slots(rows: int, cap: int, shards: int, num_samples: int) -> tuple[int, int, int]:
    """(slots, prompts per refill, rows per refill) for `rows` (prompt, sample) rows and at most
    `cap` slots: few rows get a power-of-two slot count; every count is a multiple of `shards`.
    A refill prefills a fixed number of prompts: enough for the rows that free up between refills."""
    slots = min(cap, 1 << max(0, rows - 1).bit_length())
    slots = max(shards, int(math.ceil(slots / shards) * shards))
    refill_at = max(1, slots // REFILL_FRACTION)
    prompts = 1 << ((refill_at + num_samples - 1) // num_samples).bit_length()  # > rows' prompts
    prompts = int(math.ceil(min(prompts, slots) / shards) * shards)
    return slots, prompts, min(slots, prompts * num_samples)


def _prompt_end(waiting, start: int) -> int:
    """Index after the waiting rows of the prompt of row `start` (a prompt's rows are consecutive)."""
    end = start
    while end < len(waiting) and waiting[end][0] == waiting[start][0]:
        end += 1
    return end


def _take(waiting, start: int, max_rows: int, max_prompts: int, fits: int) -> list[tuple[int, int]]:
    """The next waiting rows, whole prompts (all their waiting samples) only, so that a prompt is
    prefilled once: at most `max_rows` rows from at most `max_prompts` prompts. A prompt with more
    waiting samples than `fits` (the most rows one refill can start) is started in parts."""
    take: list[tuple[int, int]] = []
    end, prompts = start, 0
    while end < len(waiting) and prompts < max_prompts:
        stop = _prompt_end(waiting, end)
        if stop - end > fits and not take:
            return waiting[end : end + max_rows]
        if len(take) + stop - end > max_rows:
            break
        take += waiting[end:stop]
        end, prompts = stop, prompts + 1
    return take


def prefill_group(prompts: int, max_group: int, shards: int) -> int:
    """Prompts one refill prefills: the next power of two (a multiple of `shards`) at or above the
    prompts it starts, at most `max_group`; a few sizes, so a few compiled refill programs."""
    group = 1 << max(0, prompts - 1).bit_length()
    return min(max_group, int(math.ceil(group / shards) * shards))


def _refill_arrays(rows, take, slot, group: int, per_refill: int, width: int, pad_id: int, num_slots: int):
    """Host arrays of one refill: `group` prompts (left-padded to `width`; filler: the first again)
    and, per started row (filler rows: slot `num_slots`, dropped), its prompt in the group, its slot,
    prompt index and sample index."""
    prompts = list(dict.fromkeys(i for i, _ in take))
    padded = [rows[i] for i in prompts] + [rows[prompts[0]]] * (group - len(prompts))
    prompt, prompt_mask = pad_rows(padded, width, pad_id, left=True)

    def per_row(values, filler):
        return np.asarray(list(values) + [filler] * (per_refill - len(take)), np.int32)

    return (prompt, prompt_mask, per_row((prompts.index(i) for i, _ in take), 0), per_row(slot, num_slots),
            per_row((i for i, _ in take), 0), per_row((j for _, j in take), 0))


def run(bundle, params, opts: StaticOptions, rows, order, plan, bucket, traced, bar, make_sample, put):
    """Samples every (prompt, sample) row of `rows` (prompt token ids), prompts taken in `order`;
    returns results[prompt][sample]. `plan`: plan_slots(...); `bucket(length)`: the padded prompt
    length for a longest prompt of `length` tokens; `make_sample(ids, logprobs, eos)`; `put(x,
    batch)` places a host array for the mesh."""
    temperature, top_p, seed, next_table, event_table, calc_start = traced
    num_slots, group, per_refill = plan
    n, vocab = opts.num_samples, int(bundle.config.vocab_size)
    module, (prefill_params, decode_params) = bundle.module, params
    # Every slot's state (KV cache, encoder keys) has one shape: prompts are padded to the bucket
    # of the call's longest prompt.
    width = bucket(max(len(r) for r in rows))
    state = empty_program(module, opts.for_prefill(), prefill_params, put(np.zeros((num_slots, width), np.int32), True))
    waiting = [(i, j) for i in order for j in range(n)]
    next_row = 0
    holder = np.full(num_slots, -1, np.int64)  # the (prompt, sample) row in each slot; -1: free
    holder_sample = np.zeros(num_slots, np.int64)
    results: list[list] = [[None] * n for _ in rows]
    left = [n] * len(rows)
    queue = np.zeros((num_slots, opts.queue_size), np.int32)
    queue_len = np.zeros((num_slots,), np.int32)
    while True:
        free = np.flatnonzero(holder < 0)
        while next_row < len(waiting) and free.size:
            take = _take(waiting, next_row, min(free.size, per_refill), group, per_refill)
            if not take:  # the next prompt's samples wait until enough slots are free
                break
            next_row += len(take)
            slot = free[: len(take)]
            prompts = prefill_group(len({i for i, _ in take}), group, opts.layout.batch_shards)
            args = _refill_arrays(rows, take, slot, prompts, per_refill, width, bundle.pad_token_id, num_slots)
            state = refill_program(module, opts.for_prefill(), prefill_params, state, *(put(a, False) for a in args),
                                   np.int32(calc_start))
            holder[slot] = [i for i, _ in take]
            holder_sample[slot] = [j for _, j in take]
            free = free[len(take):]
        if (holder < 0).all():
            return results
        waiting_rows = len(waiting) - next_row
        refill_at = num_slots + 1
        if waiting_rows:
            whole = min(per_refill, _prompt_end(waiting, next_row) - next_row)
            refill_at = min(waiting_rows, max(1, num_slots // REFILL_FRACTION, whole))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*donated buffers were not usable.*")
            state = decode_program(module, opts, decode_params, state, put(queue, True), put(queue_len, True),
                                   temperature, top_p, seed, next_table, event_table, np.int32(refill_at))
        done, length, eos, event = jax.device_get((state["done"], state["length"], state["eos"], state["event"]))
        finished = np.flatnonzero(done & (holder >= 0))
        queue[:] = 0
        queue_len[:] = 0
        if finished.size or event.any():
            tokens, logprobs = jax.device_get((state["tokens"], state["logprobs"]))
        prompts_done = finished_tokens = 0
        for s in finished:
            i, j, k = int(holder[s]), int(holder_sample[s]), int(length[s])
            results[i][j] = make_sample(tokens[s, :k].tolist(), logprobs[s, :k].tolist(), bool(eos[s]))
            left[i] -= 1
            prompts_done += left[i] == 0
            finished_tokens += k
            holder[s] = -1
        bar.update(prompts_done, finished_tokens, pending=int(length[holder >= 0].sum()))
        forcing.fill_queues(bundle.tokenizer, bundle.family, tokens, length, np.flatnonzero(event), queue, queue_len,
                            vocab)
