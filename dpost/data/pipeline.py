"""Tokenization, fixed-shape numpy batches and grain input pipelines.

One place decides where special tokens go, so training, sampling and scoring agree:

* llama: prompt = BOS + tokens(prompt_text); completion = tokens(target_text) + EOS. The two are
  tokenized *jointly* and split, as the release (and TRL) do, so a completion's first token is the
  one the model sees after the prompt (SentencePiece would otherwise add a word-start marker).
  ``encode_completion`` is that rule alone, for completions whose prompt ids are already fixed
  (DPO pair sides that the sampler did not emit).
* t5: prompt (encoder input) = tokens(prompt_text) + EOS; completion (decoder targets) =
  tokens(target_text) + EOS, as ``T5TokenizerFast`` does by default. The decoder start token is the
  model's business, not part of the completion.

Tokenizers are always called with ``add_special_tokens=False`` and the specials added here, so a
tokenizer's own post-processor cannot double them. Lengths include the special tokens.

Batches are dicts of numpy arrays: ``prompt``/``prompt_mask`` [B, P] left-padded, and for each
completion key (``completion``, or ``chosen`` and ``rejected`` for preference pairs) ``X``/``X_mask``
[B, C] right-padded, plus ``valid`` [B] (0 for batch-filling rows). P and C are the
``batching.bucket_length`` of the longest row, capped at the configured maximum.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from dpost.data.batching import bucket_length, completion_keys, pad_rows
from dpost.data.formatting import FAMILIES

log = logging.getLogger(__name__)

Item = dict[str, np.ndarray]  # "prompt" and completions (batching.COMPLETION_KEYS); {} is a filler row


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; expected one of {FAMILIES}")


def special_ids(tokenizer: Any) -> tuple[int | None, int | None, int]:
    """(bos, eos, pad) ids; pad falls back to 0 when the tokenizer has none."""
    pad = tokenizer.pad_token_id
    return tokenizer.bos_token_id, tokenizer.eos_token_id, 0 if pad is None else pad


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_prompt(tokenizer: Any, family: str, prompt_text: str) -> list[int]:
    """Prompt ids with the family's special tokens (llama: BOS first; t5: EOS last)."""
    _check_family(family)
    bos = special_ids(tokenizer)[0]
    ids = _ids(tokenizer, prompt_text)
    if family == "llama":
        return ([bos] if bos is not None else []) + ids
    return ids + _eos(tokenizer)


def _eos(tokenizer: Any) -> list[int]:
    """What ends a completion: [EOS], or nothing for a tokenizer without one."""
    eos = special_ids(tokenizer)[1]
    return [eos] if eos is not None else []


def _joint(tokenizer: Any, prompt_text: str, target_text: str) -> tuple[list[int], list[int], bool]:
    """(prompt part, target part, merged) of ``prompt_text + target_text`` tokenized together;
    merged: the prompt's last token merged with the target's first, which then starts the target."""
    prompt = _ids(tokenizer, prompt_text)
    full = _ids(tokenizer, prompt_text + target_text)
    start = len(prompt) if full[: len(prompt)] == prompt else len(prompt) - 1
    return full[:start], full[start:], start < len(prompt)


def encode_completion(tokenizer: Any, family: str, prompt_text: str, target_text: str) -> list[int]:
    """Completion ids (EOS last) of ``target_text`` following ``encode_prompt(prompt_text)``: the ids
    SFT trains on and a sampler fed that prompt emits. llama: tokenized jointly with the prompt
    (SentencePiece gives a completion's first word no word-start marker there); alone only when
    the prompt's last token would merge with the target's first (the prompt ids must stay as
    given). t5: tokenized alone (the decoder's own sequence)."""
    _check_family(family)
    if family == "llama":
        _, target, merged = _joint(tokenizer, prompt_text, target_text)
        if not merged:
            return target + _eos(tokenizer)
    return _ids(tokenizer, target_text) + _eos(tokenizer)


def encode_example(tokenizer: Any, family: str, prompt_text: str,
                   target_text: str) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) with special tokens; completion ends with EOS. llama: when the
    prompt's last token merges with the target's first, the merged token starts the completion."""
    _check_family(family)
    if family == "t5":
        return (encode_prompt(tokenizer, family, prompt_text),
                encode_completion(tokenizer, family, prompt_text, target_text))
    bos = special_ids(tokenizer)[0]
    prompt, target, _ = _joint(tokenizer, prompt_text, target_text)
    return ([bos] if bos is not None else []) + prompt, target + _eos(tokenizer)


def collate(items: Sequence[Item], *, pad_id: int, max_prompt_len: int, max_completion_len: int,
            batch_size: int | None = None, keys: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Pad tokenized items into one fixed-shape batch (see module doc). Empty dicts are filler
    rows (``valid`` 0); ``batch_size`` pads the batch dimension with filler rows. ``keys``: the
    completion keys, inferred from the first real item (needed when every row is filler)."""
    items = list(items)
    if batch_size is not None:
        if len(items) > batch_size:
            raise ValueError(f"{len(items)} items do not fit batch_size {batch_size}")
        items += [{}] * (batch_size - len(items))
    real = [it for it in items if it]
    if keys is None:
        if not real:
            raise ValueError("cannot infer completion keys from a batch of filler rows; pass keys")
        keys = completion_keys(real[0])
    empty: list[int] = []
    p_len = bucket_length(max((len(it["prompt"]) for it in real), default=0), max_prompt_len)
    c_len = bucket_length(max((len(it[k]) for it in real for k in keys), default=0),
                          max_completion_len)
    batch: dict[str, np.ndarray] = {}
    batch["prompt"], batch["prompt_mask"] = pad_rows([it.get("prompt", empty) for it in items], p_len, pad_id, left=True)
    for k in keys:
        batch[k], batch[f"{k}_mask"] = pad_rows([it.get(k, empty) for it in items], c_len, pad_id, left=False)
    batch["valid"] = np.array([1 if it else 0 for it in items], dtype=np.int32)
    return batch


@dataclasses.dataclass
class Tokenized:
    """Tokenized items that fit the length limits, and how many were filtered out."""

    items: list[Item]
    num_filtered: int


def _fits(item: Item, max_prompt_len: int, max_completion_len: int) -> bool:
    return len(item["prompt"]) <= max_prompt_len and all(
        len(item[k]) <= max_completion_len for k in completion_keys(item))


def tokenize_item(tokenizer: Any, family: str, prompt_text: str, *completions: str,
                  keys: Sequence[str] = ("completion",)) -> Item:
    """One item: the prompt and each completion under ``keys`` (e.g. ("chosen", "rejected"))."""
    if completions and len(completions) != len(keys):
        raise ValueError(f"{len(completions)} completions for keys {keys}")
    if not completions:
        return {"prompt": np.asarray(encode_prompt(tokenizer, family, prompt_text), np.int32)}
    encoded = [encode_example(tokenizer, family, prompt_text, text) for text in completions]
    prompt = encoded[0][0]
    if any(p != prompt for p, _ in encoded):
        # Joint tokenization moved a merged token for some completion only; the prompt must be
        # shared, so keep it whole and tokenize each completion after it.
        prompt = encode_prompt(tokenizer, family, prompt_text)
        encoded = [(prompt, encode_completion(tokenizer, family, prompt_text, text)) for text in completions]
    item: Item = {"prompt": np.asarray(prompt, np.int32)}
    item.update({key: np.asarray(c, np.int32) for key, (_, c) in zip(keys, encoded)})
    return item


def tokenize_examples(examples: Sequence[tuple[str, str]], tokenizer: Any, family: str, *,
                      max_prompt_len: int, max_completion_len: int) -> Tokenized:
    """Tokenize (prompt_text, target_text) pairs; over-length examples are dropped and counted."""
    return _tokenize_all([tokenize_item(tokenizer, family, p, t) for p, t in examples],
                         max_prompt_len, max_completion_len, "examples")


def _tokenize_all(items: list[Item], max_prompt_len: int, max_completion_len: int, what: str) -> Tokenized:
    kept = [it for it in items if _fits(it, max_prompt_len, max_completion_len)]
    n_filtered = len(items) - len(kept)
    if n_filtered:
        log.info("filtered %d of %d %s longer than %d prompt / %d completion tokens",
                 n_filtered, len(items), what, max_prompt_len, max_completion_len)
    return Tokenized(kept, n_filtered)


def _shard(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
    if shard_index is None or shard_count is None:
        import grain

        opts = grain.sharding.ShardByJaxProcess(drop_remainder=True)
        return opts.shard_index, opts.shard_count
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} not in [0, {shard_count})")
    return shard_index, shard_count


def make_loader(items: Sequence[Item], *, batch_size: int, pad_id: int, max_prompt_len: int,
                max_completion_len: int, seed: int = 0, shuffle: bool = True,
                num_epochs: int | None = None, drop_remainder: bool = True,
                shard_index: int | None = None, shard_count: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """A grain iterator of per-host batches; checkpoint it with ``get_state()``/``set_state()``.

    The data are shuffled (every epoch, from ``seed``) and cut into global batches of
    ``batch_size * shard_count`` rows; each host takes its contiguous part of every global batch
    (``shard_index`` of ``shard_count``; default: the JAX process), the rows that
    ``jax.make_array_from_process_local_data`` places on its devices, so the global batches, and
    the training run, do not depend on the number of hosts. ``num_epochs=None`` repeats forever
    (step-driven training). Training (``drop_remainder``): the data are cut to a multiple of
    ``shard_count``, batches run on across epoch boundaries and a final partial batch is dropped,
    so every host runs the same number of steps. Evaluation
    (``drop_remainder=False``, usually ``shuffle=False``): the data are padded with filler rows
    (``valid`` 0) to whole batches on every host, so nothing is lost and hosts stay in lockstep.
    """
    import grain

    index, count = _shard(shard_index, shard_count)
    rows: list[Item] = list(items)
    keys = next((completion_keys(it) for it in rows if it), None)
    if keys is None:
        raise ValueError("make_loader needs at least one item")
    if drop_remainder:
        rows = rows[: len(rows) // count * count]
    else:
        rows += [{}] * (-len(rows) % (count * batch_size))
    ds = grain.MapDataset.source(rows)
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if num_epochs != 1:
        ds = ds.repeat(num_epochs)  # reshuffles each epoch with a seed derived from ``seed``

    def batch_fn(chunk: Sequence[Item]) -> dict[str, np.ndarray]:
        chunk = chunk[index * batch_size : (index + 1) * batch_size]  # this host's rows
        return collate(chunk, pad_id=pad_id, max_prompt_len=max_prompt_len,
                       max_completion_len=max_completion_len, batch_size=batch_size, keys=keys)

    ds = ds.batch(batch_size * count, drop_remainder=drop_remainder, batch_fn=batch_fn)
    # Items are tokenized up front; collation is cheap, so a small prefetch suffices.
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=4)))


def make_array_loader(arrays: Mapping[str, np.ndarray], *, batch_size: int, seed: int = 0,
                      shard_index: int | None = None, shard_count: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """A grain iterator of per-host batches of rows of ``arrays`` (equal-length columns, already
    padded to one shape, e.g. DPO pairs with their reference log-probs); repeats forever;
    checkpoint it with ``get_state()``/``set_state()``.

    Epoch ``e`` is the permutation ``default_rng([seed, e])`` of the rows, cut into whole global
    batches of ``batch_size * shard_count`` rows (an epoch's last partial batch is skipped, so a row
    is seen at most once per epoch); each host takes its contiguous part of every global batch
    (``shard_index`` of ``shard_count``; default: the JAX process), as ``make_loader`` does.
    """
    import grain

    index, count = _shard(shard_index, shard_count)
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    n = len(next(iter(arrays.values())))
    global_batch = batch_size * count
    if n < global_batch:
        raise ValueError(f"{n} rows do not fill one batch of {global_batch}")
    per_epoch = n // global_batch * global_batch

    @functools.lru_cache(maxsize=2)
    def order(epoch: int) -> np.ndarray:
        return np.random.default_rng([seed, epoch]).permutation(n)

    def batch_fn(rows: Sequence[int]) -> dict[str, np.ndarray]:
        mine = np.asarray(rows[index * batch_size : (index + 1) * batch_size])
        return {k: v[mine] for k, v in arrays.items()}

    ds = grain.MapDataset.source(range(per_epoch)).repeat(None)
    ds = ds.map_with_index(lambda position, j: int(order(position // per_epoch)[j]))
    ds = ds.batch(global_batch, drop_remainder=True, batch_fn=batch_fn)
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=4)))
