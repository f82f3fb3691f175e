"""Compiled sampling (greedy, temperature, top-k, top-p) with calculator-assisted decoding.

    samples = sampling.generate(bundle, prompts, num_samples=5, temperature=0.7, calculator=True)
    samples[i][j]  # Sample(text, token_ids, token_logprobs, finish_reason) of prompt i, sample j

Prompts: ``list[str]`` or ``list[list[int]]``. Text prompts are tokenized with the bundle's
tokenizer with its default special tokens: for Llama the caller's text is used as is, plus BOS
when the tokenizer adds one (Llama-2 does; SmolLM2's does not), for T5 the tokenizer's EOS ends
the encoder input. Pass token ids to control special tokens exactly.

Outputs per sample: ``token_ids`` are the generated tokens only (no prompt), including the EOS
token when one was emitted (``finish_reason == "eos"``; otherwise ``"length"``: ``max_new_tokens``
reached). ``token_logprobs[k]`` is log p(token_ids[k] | prompt, token_ids[:k]) under the model's
untempered distribution (fp32; calculator-forced tokens included), so ``sum(token_logprobs)``
equals ``models.sequence_logprobs`` of the completion. ``text`` decodes ``token_ids`` without the
EOS and without special tokens.

Determinism: the randomness of sample j of prompt i is keyed on (seed, i, j) only, never on
batching, slots, companions or device count, so its tokens are equal wherever its logits are
bitwise equal. They are when the compiled shapes match (padded prompt width, cache length, rows
per step); otherwise (static chunks are padded to their own longest prompt, continuous slots to
the call's; slot counts and chunk sizes differ) they differ by fp32 rounding, which on a real
model can flip a draw near a token boundary and let the sample continue differently (README,
"Determinism"). Calculator-forced tokens count toward ``max_new_tokens``.

Batching (``dpost.sampling.continuous``): ``batch_size`` prompts' rows (default: up to 64 rows of
``num_samples`` each, times the mesh's batch shards; fewer rows: a power of two) decode in a fixed
number of slots; a finished row's slot is refilled with the next waiting (prompt, sample) row, so
decode steps go to live rows. Results come back in the order of ``prompts``. Prompts are padded to
2^k x (1, 1.25, 1.5 or 1.75) (>= 16) or to the smallest of ``length_buckets`` that fits the call's
longest prompt, so a run compiles a handful of programs. ``batching="static"``: length-sorted chunks
of ``batch_size`` prompts, each padded to its own longest prompt and decoded to its longest row
(the same samples up to fp32 rounding). Under a ``mesh``
(default: the bundle's) rows are sharded over ``data``/``fsdp`` and heads over ``tensor``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import Sequence

import jax
import numpy as np

from dpost import sharding as sharding_lib
from dpost.models.bundle import ModelBundle
from dpost.data.batching import pad_rows, quarter_octave_bucket
from dpost.sampling import continuous, forcing
from dpost.sampling.progress import Progress
from dpost.sampling.sampler import StaticOptions, compiled_program_count, decode_program, prefill_program

__all__ = ["generate", "Sample", "compiled_program_count", "prompt_length_bucket"]

DEFAULT_MAX_ROWS = 64  # default rows (prompts x samples) in flight per batch shard
MIN_PROMPT_BUCKET = 16
QUEUE_SIZE = 32  # most tokens one calculator result (+ closing marker) may force
BATCHING = ("continuous", "static")


@dataclasses.dataclass
class Sample:
    text: str
    token_ids: list[int]
    token_logprobs: list[float]
    finish_reason: str  # "eos" | "length"


def _tokenize(bundle: ModelBundle, prompts) -> list[list[int]]:
    prompts = list(prompts)
    if not prompts:
        return []
    if all(isinstance(p, str) for p in prompts):
        if bundle.tokenizer is None:
            raise ValueError("text prompts need a bundle with a tokenizer; pass token ids instead")
        rows = [list(ids) for ids in bundle.tokenizer(prompts)["input_ids"]]
    elif all(not isinstance(p, str) for p in prompts):
        rows = [[int(t) for t in p] for p in prompts]
    else:
        raise ValueError("prompts must be all strings or all token-id lists")
    for i, row in enumerate(rows):
        if not row:
            raise ValueError(f"prompt {i} is empty after tokenization")
    return rows


def prompt_length_bucket(length: int, buckets: Sequence[int] | None = None) -> int:
    """The padded prompt length `generate` uses for a chunk whose longest prompt has `length` tokens:
    the smallest of `buckets` that fits, else the quarter-octave bucket (>= MIN_PROMPT_BUCKET)."""
    if buckets:
        fitting = [int(b) for b in buckets if int(b) >= length]
        if fitting:
            return min(fitting)
    return quarter_octave_bucket(length, MIN_PROMPT_BUCKET)


def _batch_bucket(count: int, cap: int, shards: int) -> int:
    size = min(1 << max(0, count - 1).bit_length(), max(cap, count))
    return int(math.ceil(size / shards) * shards)


def _params_on(bundle: ModelBundle, layout: sharding_lib.Layout):
    if layout.mesh is None or layout == bundle.layout:
        return bundle.params
    from dpost.models import registry, sources

    boxed = sources.abstract_params(registry.get_family(bundle.family), bundle.config)
    return jax.device_put(bundle.params, layout.params(boxed))


def decode_layout(module, params):
    """The params in the layout the module's `decode_step` reads fastest (its `decode_layout`
    hook, made once per call outside the decode loop), or the params themselves."""
    layout = getattr(type(module), "decode_layout", None)
    return params if layout is None else _jitted_layout(layout)(params, module.config.compute_dtype)


@functools.lru_cache(maxsize=None)
def _jitted_layout(layout):
    """One jit object (and compile cache) per family's layout; the compute dtype is static."""
    return jax.jit(layout, static_argnums=1)


def _put(x, layout: sharding_lib.Layout, batch: bool):
    if layout.mesh is None:
        return x
    return jax.device_put(x, layout.batch(np.ndim(x)) if batch else layout.replicated())


def generate(
    bundle: ModelBundle,
    prompts,
    *,
    num_samples: int = 1,
    max_new_tokens: int = 300,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    calculator: bool = False,
    mesh=None,
    layout: sharding_lib.Layout | None = None,
    batch_size: int | None = None,
    progress: bool = False,
    ignore_eos: bool = False,
    length_buckets: Sequence[int] | None = None,
    batching: str = "continuous",
) -> list[list[Sample]]:
    """Samples `num_samples` completions per prompt; one inner list per prompt (see module doc).

    temperature == 0 is greedy (top-k / top-p then do nothing). ``ignore_eos`` keeps decoding past
    EOS (benchmarks); ``length_buckets`` replaces the power-of-two prompt-length buckets;
    ``batching="static"`` runs length-sorted chunks to their longest row instead of refilling
    slots (same outputs; kept as the reference and for benchmarks).

    ``layout`` (a `dpost.sharding.Layout`: mesh + logical-axis rules) places the params, batches
    and activation constraints; neither: the bundle's own layout (`models.load(..., layout=)`);
    ``mesh=`` alone is kept for compatibility and means the bundle's rules on that mesh.
    """
    if batching not in BATCHING:
        raise ValueError(f"batching={batching!r}: expected one of {BATCHING}")
    if num_samples < 1 or max_new_tokens < 1:
        raise ValueError("num_samples and max_new_tokens must be >= 1")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError("need temperature >= 0, 0 < top_p <= 1, top_k >= 0")
    rows = _tokenize(bundle, prompts)
    if not rows:
        return []
    if layout is not None and mesh is not None:
        raise ValueError("generate: pass layout= or mesh=, not both (a layout holds its mesh)")
    layout = layout or (bundle.layout.on(mesh) if mesh is not None else bundle.layout)
    params = _params_on(bundle, layout)
    params = (params, decode_layout(bundle.module, params))  # prefill reads the first, decoding the second
    vocab = int(bundle.config.vocab_size)
    greedy = temperature == 0
    opts = StaticOptions(
        max_new_tokens=int(max_new_tokens),
        num_samples=int(num_samples),
        greedy=greedy,
        top_k=0 if greedy or top_k >= vocab else int(top_k),
        top_p=(not greedy) and top_p < 1.0,
        calculator=bool(calculator),
        ignore_eos=bool(ignore_eos),
        eos_id=bundle.eos_token_id,
        pad_id=bundle.pad_token_id,
        queue_size=QUEUE_SIZE,
        layout=layout,
    )
    tokenizer = bundle.tokenizer
    if calculator:
        if tokenizer is None:
            raise ValueError("calculator=True needs a bundle with a tokenizer")
        tables = forcing.tables_for(tokenizer, bundle.family, vocab)
        next_table, event_table, calc_start = tables.next_state, tables.event, tables.start
    else:
        next_table, event_table, calc_start = np.zeros((1, 1), np.int32), np.zeros((1, 1), bool), 0
    next_table, event_table = _put(next_table, layout, False), _put(event_table, layout, False)
    temperature_arr = np.float32(temperature if not greedy else 1.0)
    top_p_arr = np.float32(top_p)
    seed_arr = np.uint32(int(seed) % (1 << 32))

    shards = layout.batch_shards
    if batch_size is None:
        batch_size = max(1, DEFAULT_MAX_ROWS // num_samples) * shards
    batch_size = max(1, int(batch_size))
    bar = Progress(len(rows), progress)
    traced = (temperature_arr, top_p_arr, seed_arr, next_table, event_table, calc_start)
    # Static chunks of similar prompt lengths pad less (prefill and every decode step's cache read
    # scale with the chunk's longest prompt). Rows keep their index in `prompts`, which is all their
    # randomness depends on, so the order changes no sample.
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    try:
        if batching == "continuous":
            plan = continuous.plan_slots(len(rows) * num_samples, batch_size * num_samples, shards, num_samples)
            return continuous.run(
                bundle, params, opts, rows, order, plan, lambda n: prompt_length_bucket(n, length_buckets), traced,
                bar, functools.partial(_sample, tokenizer), lambda x, batch: _put(x, layout, batch))
        results: list[list[Sample] | None] = [None] * len(rows)
        for start in range(0, len(rows), batch_size):
            indices = order[start : start + batch_size]
            chunk_samples = _run_chunk(
                bundle, params, opts, [rows[i] for i in indices], indices, batch_size, shards, length_buckets,
                traced, bar)
            for i, samples in zip(indices, chunk_samples):
                results[i] = samples
        return results
    finally:
        bar.close()


def _sample(tokenizer, ids: list[int], logprobs: list[float], eos: bool) -> Sample:
    text_ids = ids[:-1] if eos else ids
    text = tokenizer.decode(text_ids, skip_special_tokens=True) if tokenizer is not None else ""
    return Sample(text, ids, logprobs, "eos" if eos else "length")


def _run_chunk(bundle, params, opts: StaticOptions, chunk, indices, batch_size, shards, length_buckets, traced, bar):
    """Samples one chunk of prompts (`indices`: their positions in the `generate` call)."""
    temperature, top_p, seed, next_table, event_table, calc_start = traced
    n = opts.num_samples
    layout = opts.layout
    b = _batch_bucket(len(chunk), batch_size, shards)
    p = prompt_length_bucket(max(len(r) for r in chunk), length_buckets)
    padded = chunk + [chunk[0]] * (b - len(chunk))
    prompt, prompt_mask = pad_rows(padded, p, bundle.pad_token_id, left=True)
    valid = np.arange(b) < len(chunk)
    prompt_index = np.repeat(np.pad(np.asarray(indices, np.int32), (0, b - len(chunk))), n)  # filler rows: 0
    sample_index = np.tile(np.arange(n, dtype=np.int32), b)
    row_valid = np.repeat(valid, n)
    rows = b * n
    vocab = int(bundle.config.vocab_size)

    params, decode_params = params
    state, flags = prefill_program(
        bundle.module, opts.for_prefill(), params, _put(prompt, layout, True), _put(prompt_mask, layout, True),
        _put(prompt_index, layout, True), _put(sample_index, layout, True), _put(row_valid, layout, True),
        np.int32(calc_start),
    )
    queue = np.zeros((rows, opts.queue_size), np.int32)
    queue_len = np.zeros((rows,), np.int32)
    while True:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*donated buffers were not usable.*")
            state, flags = decode_program(
                bundle.module, opts, decode_params, state, _put(queue, layout, True), _put(queue_len, layout, True),
                temperature, top_p, seed, next_table, event_table,
            )
        _, _, any_event, emitted = (int(x) for x in np.asarray(flags))
        if not any_event:
            break
        bar.update(0, 0, pending=emitted)
        events, tokens, length = jax.device_get((state["event"], state["tokens"], state["length"]))
        queue[:] = 0
        queue_len[:] = 0
        forcing.fill_queues(bundle.tokenizer, bundle.family, tokens, length, np.flatnonzero(events), queue, queue_len,
                            vocab)

    tokens, logprobs, length, eos = jax.device_get((state["tokens"], state["logprobs"], state["length"], state["eos"]))
    out = [[_sample(bundle.tokenizer, tokens[r, : length[r]].tolist(), logprobs[r, : length[r]].tolist(), bool(eos[r]))
            for r in range(i * n, (i + 1) * n)] for i in range(len(chunk))]
    bar.update(len(chunk), int(length[: len(chunk) * n].sum()))
    return out
