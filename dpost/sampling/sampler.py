"""The compiled sampling core: logits processing, loop state, the decode step, static batching.

Token selection (greedy, temperature, top-k, top-p) and ``emit_tokens``, the part of a decode step
shared by static and continuous batching (``dpost.sampling.continuous``): every live row's next
token (forced by the calculator queue, greedy, or sampled), recorded with its log-prob under the
untempered model distribution at the row's own position. Static batching's two programs per
(model, shapes, static sampling options):

* ``prefill_program``: the model's ``prefill`` (encode once / fill the KV cache for the left-padded
  prompts, expand to ``num_samples`` rows per prompt) and the initial loop state.
* ``decode_program``: a ``lax.while_loop`` of ``emit_tokens`` and one batched ``decode_step``. It
  exits when every row is done (EOS or ``max_new_tokens``) or when some row completes a calculator
  annotation's ``=``; the host (``dpost.sampling.forcing``) then fills that row's forced-token
  queue and re-enters the same compiled program with the state (KV cache included) on device.

Params, prompts, temperature, top-p, seed and calculator tables are traced arguments: new params of
the same shapes, other seeds or temperatures reuse the compiled programs. Static: the module, the
shapes (prompt length and batch are bucketed by the caller), ``max_new_tokens``, ``num_samples`` and
flags for greedy / top-k / top-p / calculator / ignore-EOS.

Randomness: row r's uniform at its decode position t (the number of tokens it has emitted) comes
from ``fold_in(fold_in(fold_in(key(seed), prompt_index[r]), sample_index[r]), t)``, where the
prompt index is the prompt's position in the whole ``generate`` call; so samples do not depend on
which batch, slot, start time or device a row gets. (In static batching every live row's position
is the loop's step.) Sampling is inverse-CDF with one uniform per row and step (a two-level block
cumsum, cheap on CPU); with top-k / top-p it runs over the top candidates only.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp

from dpost import sharding as sharding_lib

TOP_P_CANDIDATES = 64  # nucleus searched among this many top tokens first (exact fallback otherwise)
_BLOCK = 256  # block size of the two-level inverse-CDF sampler


@dataclasses.dataclass(frozen=True)
class StaticOptions:
    """Everything the compiled programs specialise on besides array shapes."""

    max_new_tokens: int
    num_samples: int = 1
    greedy: bool = True
    top_k: int = 0  # 0: off
    top_p: bool = False  # whether a nucleus cut is applied (its value is traced)
    calculator: bool = False
    ignore_eos: bool = False
    eos_id: int = 2
    pad_id: int = 0
    queue_size: int = 32
    layout: sharding_lib.Layout = sharding_lib.Layout()  # mesh + logical-axis rules (default: one device)

    def for_prefill(self) -> "StaticOptions":
        """The options prefill depends on (others reset, so sampling variants share its program)."""
        return StaticOptions(self.max_new_tokens, self.num_samples, pad_id=self.pad_id, queue_size=self.queue_size,
                             layout=self.layout)


# -- token selection ------------------------------------------------------------------------------

def row_uniforms(seed, prompt_index, sample_index, position):
    """[N] uniforms in [0, 1): one per row, from (seed, prompt index, sample index, the row's own
    decode position) only."""
    base = jax.random.key(seed)

    def one(p, s, t):
        key = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(base, p), s), t)
        return jax.random.uniform(key, (), jnp.float32)

    return jax.vmap(one)(prompt_index, sample_index, jnp.broadcast_to(position, prompt_index.shape))


def _inverse_cdf(weights, target):
    """Index of the first position whose running sum reaches `target` (weights [N, K] >= 0)."""
    c = jnp.cumsum(weights, axis=-1)
    idx = jnp.sum(c < target[:, None], axis=-1)
    # Rounding can push `target` past the last running sum: stay on a token with non-zero weight.
    last_nonzero = weights.shape[-1] - 1 - jnp.argmax(weights[:, ::-1] > 0, axis=-1)
    return jnp.minimum(idx, last_nonzero)


def sample_from_weights(weights, u):
    """Samples index ~ weights (unnormalised, >= 0) per row with uniform u in [0, 1); [N, V] -> [N].

    Two levels so that no full-vocabulary cumsum is needed: pick a block of `_BLOCK` tokens by its
    total, then a token inside it.
    """
    n, v = weights.shape
    if v <= _BLOCK:
        return _inverse_cdf(weights, (1.0 - u) * weights.sum(-1))
    pad = (-v) % _BLOCK
    if pad:
        weights = jnp.pad(weights, ((0, 0), (0, pad)))
    blocks = weights.reshape(n, -1, _BLOCK)
    sums = blocks.sum(-1)
    target = (1.0 - u) * sums.sum(-1)  # in (0, total]: a zero-weight token is never chosen
    blk = _inverse_cdf(sums, target)
    running = jnp.cumsum(sums, -1)
    before = jnp.where(blk > 0, jnp.take_along_axis(running, jnp.maximum(blk - 1, 0)[:, None], -1)[:, 0], 0.0)
    inner = jnp.take_along_axis(blocks, blk[:, None, None], axis=1)[:, 0]
    return blk * _BLOCK + _inverse_cdf(inner, target - before)


def _nucleus_keep(sorted_probs, top_p):
    """Keep mask over descending probabilities: tokens whose preceding mass is < top_p (>= 1 kept)."""
    before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
    keep = before < top_p
    return keep.at[:, 0].set(True)


def select_tokens(logits, u, temperature, top_p, opts: StaticOptions):
    """Next token per row from fp32 logits [N, V] (greedy or tempered / top-k / top-p sampling)."""
    if opts.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits / temperature
    if opts.top_k or opts.top_p:
        k = opts.top_k if opts.top_k else min(TOP_P_CANDIDATES, logits.shape[-1])
        k = min(k, logits.shape[-1])
        vals, idx = jax.lax.top_k(scaled, k)  # descending
        if opts.top_k:  # the top-k set is renormalised on its own (as transformers' warpers)
            lse = jax.nn.logsumexp(vals, axis=-1, keepdims=True)
        else:
            lse = jax.nn.logsumexp(scaled, axis=-1, keepdims=True)
        probs = jnp.exp(vals - lse)
        if opts.top_p:
            keep = _nucleus_keep(probs, top_p)
            probs = jnp.where(keep, probs, 0.0)
        choice = _inverse_cdf(probs, (1.0 - u) * probs.sum(-1))
        token = jnp.take_along_axis(idx, choice[:, None], axis=-1)[:, 0]
        if opts.top_p and not opts.top_k:
            # Rows whose nucleus is larger than the candidate set: exact threshold by bisection.
            covered = jnp.exp(vals - lse).sum(-1) >= top_p
            token = jax.lax.cond(
                jnp.all(covered),
                lambda: token,
                lambda: jnp.where(covered, token, _sample_nucleus_full(scaled, lse, u, top_p)),
            )
        return token.astype(jnp.int32)
    weights = jnp.exp(scaled - jnp.max(scaled, axis=-1, keepdims=True))
    return sample_from_weights(weights, u).astype(jnp.int32)


def _sample_nucleus_full(scaled, lse, u, top_p, iterations: int = 40):
    """Nucleus sampling over the full vocabulary: the threshold t* = the largest logit t such that the
    mass of {logit >= t} reaches top_p, found by bisection (no full-vocabulary sort)."""
    logp = scaled - lse
    lo = jnp.min(logp, axis=-1)  # mass(lo) = 1 >= top_p
    hi = jnp.max(logp, axis=-1)

    def body(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        mass = jnp.sum(jnp.where(logp >= mid[:, None], jnp.exp(logp), 0.0), axis=-1)
        ok = mass >= top_p
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    lo, _ = jax.lax.fori_loop(0, iterations, body, (lo, hi))
    weights = jnp.where(logp >= lo[:, None], jnp.exp(logp), 0.0)
    return sample_from_weights(weights, u)


# -- programs -------------------------------------------------------------------------------------

def _flags(state, opts: StaticOptions):
    """[4] int32 summary for the host: step, all done, any calculator event, tokens emitted."""
    return jnp.stack([
        state["step"],
        jnp.all(state["done"]).astype(jnp.int32),
        jnp.any(state["event"]).astype(jnp.int32),
        jnp.sum(state["length"]),
    ])


def row_state(model_state, logits, prompt_index, sample_index, done, calc_start, opts: StaticOptions):
    """Per-row loop state for rows that start a completion (`done`: filler rows)."""
    n = logits.shape[0]
    m, q = opts.max_new_tokens, opts.queue_size
    return {
        "model": model_state,
        "logits": logits.astype(jnp.float32),
        "tokens": jnp.full((n, m), opts.pad_id, jnp.int32),
        "logprobs": jnp.zeros((n, m), jnp.float32),
        "done": done,
        "eos": jnp.zeros((n,), bool),
        "length": jnp.zeros((n,), jnp.int32),
        "prompt_index": prompt_index,
        "sample_index": sample_index,
        "calc": jnp.full((n,), calc_start, jnp.int32),
        "event": jnp.zeros((n,), bool),
        "queue": jnp.zeros((n, q), jnp.int32),
        "qpos": jnp.zeros((n,), jnp.int32),
        "qlen": jnp.zeros((n,), jnp.int32),
    }


def _prefill(module, opts: StaticOptions, params, prompt, prompt_mask, prompt_index, sample_index, row_valid,
             calc_start):
    with opts.layout.activation_rules():
        logits, model_state = module.apply(
            {"params": params}, prompt, prompt_mask, opts.max_new_tokens, opts.num_samples, method="prefill"
        )
    state = row_state(model_state, logits, prompt_index, sample_index, ~row_valid, calc_start, opts)
    state["step"] = jnp.zeros((), jnp.int32)
    return state, _flags(state, opts)


def take_queue(state, queue, queue_len):
    """New forced tokens from the host replace the queue of the rows that got some; events reset."""
    fresh = queue_len > 0
    state = dict(state)
    state["queue"] = jnp.where(fresh[:, None], queue, state["queue"])
    state["qpos"] = jnp.where(fresh, 0, state["qpos"])
    state["qlen"] = jnp.where(fresh, queue_len, state["qlen"])
    state["event"] = jnp.zeros_like(state["event"])
    return state


def emit_tokens(st, temperature, top_p, seed, next_state_table, event_table, opts: StaticOptions):
    """Picks every live row's next token (forced, greedy or sampled) and records it with its log-prob
    at the row's own position (its length so far), which also keys its randomness. Returns the new
    state and the tokens the model reads next (pad for finished rows)."""
    m = opts.max_new_tokens
    logits, position = st["logits"], st["length"]
    active = ~st["done"]
    if opts.greedy:
        token = select_tokens(logits, None, temperature, top_p, opts)
    else:
        u = row_uniforms(seed, st["prompt_index"], st["sample_index"], position)
        token = select_tokens(logits, u, temperature, top_p, opts)
    st = dict(st)
    forced = jnp.zeros_like(active)
    if opts.calculator:
        forced = active & (st["qpos"] < st["qlen"])
        queued = jnp.take_along_axis(st["queue"], jnp.minimum(st["qpos"], opts.queue_size - 1)[:, None], -1)[:, 0]
        token = jnp.where(forced, queued, token)
        st["qpos"] = st["qpos"] + forced.astype(jnp.int32)
    token = jnp.where(active, token, opts.pad_id)
    target = jnp.take_along_axis(logits, token[:, None], axis=-1)[:, 0]
    logprob = jnp.where(active, target - jax.nn.logsumexp(logits, axis=-1), 0.0)
    rows = jnp.arange(token.shape[0])
    column = jnp.where(active, position, m)  # finished rows write nothing (out of range: dropped)
    st["tokens"] = st["tokens"].at[rows, column].set(token, mode="drop")
    st["logprobs"] = st["logprobs"].at[rows, column].set(logprob, mode="drop")
    st["length"] = position + active.astype(jnp.int32)
    done = st["done"] | (st["length"] >= m)
    if not opts.ignore_eos:
        hit_eos = active & (token == opts.eos_id)
        st["eos"] = st["eos"] | hit_eos
        done = done | hit_eos
    st["done"] = done
    if opts.calculator:
        calc = st["calc"]
        st["event"] = event_table[calc, token] & active & ~forced & ~done
        st["calc"] = jnp.where(active, next_state_table[calc, token], calc)
    return st, token


def _decode(module, opts: StaticOptions, params, state, queue, queue_len, temperature, top_p, seed,
            next_state_table, event_table):
    state = take_queue(state, queue, queue_len)

    def cond(st):
        return ~jnp.all(st["done"]) & ~jnp.any(st["event"])

    def body(st):
        st, token = emit_tokens(st, temperature, top_p, seed, next_state_table, event_table, opts)
        with opts.layout.activation_rules():
            new_logits, st["model"] = module.apply({"params": params}, token, st["model"], method="decode_step")
        st["logits"] = new_logits.astype(jnp.float32)
        st["step"] = st["step"] + 1
        return st

    state = jax.lax.while_loop(cond, body, state)
    return state, _flags(state, opts)


# Tiny test models: LLVM optimisation costs more compile time than it saves at run time. Opt in with
# DPOST_SAMPLER_FAST_COMPILE=1 (tests do); never the default, as real runs are decode-bound.
_FAST = {"xla_backend_optimization_level": 0}
_PROGRAMS: list["Program"] = []


class Program:
    """A sampler program (static: the module and the StaticOptions), jitted as configured and
    fast-compiling; a call picks one by DPOST_SAMPLER_FAST_COMPILE."""

    def __init__(self, fn, donate: tuple[int, ...] = ()):
        self.normal = jax.jit(fn, static_argnums=(0, 1), donate_argnums=donate)
        self.fast = jax.jit(fn, static_argnums=(0, 1), donate_argnums=donate, compiler_options=_FAST)
        _PROGRAMS.append(self)

    def __call__(self, *args):
        fast = os.environ.get("DPOST_SAMPLER_FAST_COMPILE", "").lower() in ("1", "true", "yes")
        return (self.fast if fast else self.normal)(*args)

    def cache_size(self) -> int:
        return self.normal._cache_size() + self.fast._cache_size()


prefill_program = Program(_prefill)
decode_program = Program(_decode, donate=(3,))


def compiled_program_count() -> int:
    """Programs compiled so far by the sampler (all its programs), for tests and diagnostics."""
    return sum(p.cache_size() for p in _PROGRAMS)
