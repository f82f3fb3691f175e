"""Calculator-assisted decoding: detecting annotations on device, forcing results from the host.

The protocol ("Calculator during decoding"): when a row has opened an annotation (``<<`` for Llama,
``[`` for T5), written an expression and then ``=``, the expression is evaluated with
``dpost.calculator.evaluate`` and the result is forced token by token, followed by the closing
marker; the model then continues freely. A failed evaluation forces nothing.

How the work is split so that decoding never becomes a per-token host loop:

* On device, every row runs a tiny finite automaton over its emitted tokens. ``build_tables``
  precomputes, once per (tokenizer, family), ``next_state[S, V]`` and ``event[S, V]``: the state
  after appending a token's text, and whether that token completes ``=`` as the first ``=`` of an
  open annotation. States record whether the text is outside an annotation, inside one without
  ``=``, or inside one after ``=``, plus how much of a two-character marker the text ends with,
  so markers split across tokens (``<`` ``<``) and tokens that merge text (`` <<``, ``=<<``,
  ``)*``) are handled from the real token texts of any tokenizer.
* The compiled decode loop exits as soon as some row has an event (a few times per rationale).
  The host then decodes that row's text, evaluates the expression and tokenizes the result plus the
  closing marker *in context* (``forced_ids``), and hands the ids back in a per-row queue; the loop
  resumes with the KV cache still on device and emits queued tokens instead of sampling them
  (their log-probs are still read from the model's distribution).

Forced text per family (what the formatted training targets contain after ``=``): Llama
``<<48/2=24>>`` -> ``24>>``; T5 ``[ 48 / 2 = 24] 24`` (``dpost.data.formatting.t5_rationale``)
-> `` 24]``, i.e. SentencePiece pieces ``▁24`` then ``]`` exactly as the release forced them.
"""

from __future__ import annotations

import dataclasses
import re
import threading
from typing import Any, Sequence

import numpy as np

from dpost import calculator as calc_lib

# Text forced after the model's "=": the result, then the closing marker, per family.
FORCED_TEMPLATES = {"llama": "{result}{close}", "t5": " {result}{close}"}
EQUALS = getattr(calc_lib, "EQUALS", "=")
_BYTE_PIECE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")  # SentencePiece byte-fallback pieces


def markers(family: str) -> tuple[str, str]:
    return calc_lib.markers(family)


@dataclasses.dataclass(frozen=True)
class _Key:
    mode: int  # 0 outside an annotation, 1 inside without "=", 2 inside after "="
    open_tail: int  # length of the longest proper prefix of the open marker the text ends with
    close_tail: int  # same for the close marker (only inside an annotation)


def _suffix_prefix(text: str, marker: str) -> int:
    for j in range(len(marker) - 1, 0, -1):
        if text.endswith(marker[:j]):
            return j
    return 0


def _key(text: str, open_m: str, close_m: str) -> _Key:
    o = text.rfind(open_m)
    if o < 0:
        mode = 0
    else:
        after = text[o + len(open_m):]
        mode = 0 if close_m in after else (2 if EQUALS in after else 1)
    return _Key(mode, _suffix_prefix(text, open_m), _suffix_prefix(text, close_m) if mode else 0)


def _is_event(text: str, open_m: str, close_m: str) -> bool:
    """Does `text` end with the first "=" of an open annotation?"""
    o = text.rfind(open_m)
    if o < 0:
        return False
    after = text[o + len(open_m):]
    return close_m not in after and after.rstrip().endswith(EQUALS) and after.count(EQUALS) == 1


@dataclasses.dataclass
class CalculatorTables:
    """Per-token automaton tables for one tokenizer and family (numpy; device_put by the sampler)."""

    next_state: np.ndarray  # [S, V] int32
    event: np.ndarray  # [S, V] bool
    start: int  # state at the start of a completion


def build_tables(tokenizer, family: str, vocab_size: int) -> CalculatorTables:
    open_m, close_m = markers(family)
    chars = set(open_m + close_m + EQUALS)
    # Only tokens whose text has a marker character or "=" can change the automaton's state; raw
    # pieces are scanned first (cheap) and only those candidates are decoded one by one, which
    # handles byte-level BPE (``Ġ<<``) and SentencePiece (``▁[``, byte fallback ``<0x3D>``) alike.
    n = min(vocab_size, len(tokenizer))
    pieces = tokenizer.convert_ids_to_tokens(list(range(n)))
    candidates: dict[int, str] = {}
    for i, piece in enumerate(pieces):
        if piece is None:
            continue
        if any(c in piece for c in chars) or _BYTE_PIECE.match(piece):
            text = tokenizer.decode([i], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            if any(c in text for c in chars):
                candidates[i] = text

    # Breadth-first over reachable automaton states, with one representative text per state.
    plain = "a"  # any non-empty text without marker characters
    texts = list(dict.fromkeys(candidates.values())) + [plain]
    start = _Key(0, 0, 0)
    reps: dict[_Key, str] = {start: ""}
    order = [start]
    frontier = [start]
    while frontier:
        new = []
        for k in frontier:
            s = reps[k]
            for t in texts:
                nk = _key(s + t, open_m, close_m)
                if nk not in reps:
                    reps[nk] = s + t
                    order.append(nk)
                    new.append(nk)
        frontier = new
    index = {k: i for i, k in enumerate(order)}
    num_states = len(order)
    next_state = np.zeros((num_states, vocab_size), np.int32)
    event = np.zeros((num_states, vocab_size), bool)
    for k, si in index.items():
        next_state[si, :] = index[_Key(k.mode, 0, 0)]  # plain text keeps the mode, clears the tails
        s = reps[k]
        for i, t in candidates.items():
            next_state[si, i] = index[_key(s + t, open_m, close_m)]
            event[si, i] = _is_event(s + t, open_m, close_m)
    return CalculatorTables(next_state, event, index[start])


_CACHE: dict[tuple, tuple[Any, CalculatorTables]] = {}
_LOCK = threading.Lock()


def tables_for(tokenizer, family: str, vocab_size: int) -> CalculatorTables:
    """Cached `build_tables` (one build per tokenizer object, family and vocabulary size)."""
    key = (id(tokenizer), family, int(vocab_size))
    with _LOCK:
        hit = _CACHE.get(key)
        if hit is not None and hit[0] is tokenizer:
            return hit[1]
    tables = build_tables(tokenizer, family, vocab_size)
    with _LOCK:
        if len(_CACHE) > 8:
            _CACHE.clear()
        _CACHE[key] = (tokenizer, tables)
    return tables


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def _decode(tokenizer, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def pending_expression(text: str, family: str) -> str | None:
    """The expression of the annotation that `text` has just completed with "=" (else None)."""
    open_m, close_m = markers(family)
    o = text.rfind(open_m)
    if o < 0 or not _is_event(text, open_m, close_m):
        return None
    return text[o + len(open_m):].rstrip()[: -len(EQUALS)]


def tokenize_in_context(tokenizer, context: str, forced_text: str) -> list[int]:
    """Token ids of `forced_text` as the tokenizer splits it when it follows `context`.

    The whole `context + forced_text` is tokenized and the ids after `context`'s own ids are taken
    when the two tokenizations agree on that prefix (they do whenever no token straddles the
    boundary: SmolLM2's ``<<48/2=`` + ``24>>``; T5's ``[ 48 / 2 =`` + `` 24]`` -> ``▁24 ]``).
    Otherwise, the shortest suffix of the joint tokenization that decodes to `forced_text` (up to
    surrounding spaces), and as a last resort `forced_text` tokenized alone without a lone leading
    word-boundary piece (SentencePiece's ``▁``).
    """
    ctx_ids = _encode(tokenizer, context)
    full_ids = _encode(tokenizer, context + forced_text)
    if full_ids[: len(ctx_ids)] == ctx_ids and len(full_ids) > len(ctx_ids):
        return full_ids[len(ctx_ids):]
    want = forced_text.strip()
    for k in range(len(full_ids) - 1, -1, -1):
        got = _decode(tokenizer, full_ids[k:]).strip()
        if got == want:
            return full_ids[k:]
        if len(got) > len(want):
            break
    ids = _encode(tokenizer, forced_text)
    if len(ids) > 1 and _decode(tokenizer, ids[:1]).strip() == "":
        ids = ids[1:]
    return ids


def forced_ids(tokenizer, family: str, completion_ids: Sequence[int]) -> list[int] | None:
    """Ids to force after a calculator event in a completion, or None (failed evaluation etc.)."""
    text = _decode(tokenizer, completion_ids)
    expr = pending_expression(text, family)
    if expr is None:
        return None
    result = calc_lib.evaluate(expr)
    if result is None:
        return None
    open_m, close_m = markers(family)
    forced_text = FORCED_TEMPLATES[family].format(result=result, close=close_m)
    context = text[text.rfind(open_m):]
    ids = tokenize_in_context(tokenizer, context, forced_text)
    return ids or None


def forced_positions(tokenizer, family: str, completion_ids: Sequence[int], tables: CalculatorTables) -> np.ndarray:
    """bool [len(completion_ids)]: the tokens the calculator forces when this completion is sampled
    (results and closing markers). A replay of the sampler: the automaton over the tokens, and at each
    event the ids it would force, marked where the completion continues with exactly them."""
    ids = [int(t) for t in completion_ids]
    forced = np.zeros(len(ids), bool)
    vocab = tables.event.shape[1]
    state, t = tables.start, 0
    while t < len(ids):
        token = ids[t]
        event = token < vocab and bool(tables.event[state, token])
        state = int(tables.next_state[state, token]) if token < vocab else state
        t += 1
        if not event:
            continue
        queue = forced_ids(tokenizer, family, ids[:t])
        if queue and ids[t : t + len(queue)] == queue:
            forced[t : t + len(queue)] = True
            for token in queue:
                state = int(tables.next_state[state, token])
            t += len(queue)
    return forced


def fill_queues(tokenizer, family: str, tokens, length, rows, queue, queue_len, vocab_size: int) -> None:
    """Writes the forced ids of each row in `rows` (rows with a calculator event; `tokens[r,
    :length[r]]` its completion so far) into the host arrays `queue` [R, Q] / `queue_len` [R]."""
    for r in rows:
        ids = forced_ids(tokenizer, family, tokens[r, : length[r]].tolist())
        if ids and len(ids) <= queue.shape[1] and all(0 <= t < vocab_size for t in ids):
            queue[r, : len(ids)] = ids
            queue_len[r] = len(ids)
