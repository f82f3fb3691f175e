"""Tokenization per family, fixed-shape batches, and the grain loader (shuffling, sharding,
checkpointable position, lockstep evaluation padding)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from dpost.data import pipeline, synthetic
from dpost.data.formatting import format_example, format_prompt
from dpost.data.pipeline import collate, make_loader


@pytest.fixture(scope="module")
def splits():
    return synthetic.make_splits(seed=3, n_train=200, n_dev=10, n_test=10)


@pytest.fixture(scope="module")
def tok(splits, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    synthetic.train_tokenizer(synthetic.tokenizer_corpus(splits["train"]), out, vocab_size=400)
    return synthetic.load_tokenizer(out)


PAD, BOS, EOS = 0, 1, 2


def _batch(examples, tokenizer, family, keys=("completion",), batch_size=None):
    """Tokenized and collated texts: prompts alone, or a prompt and one text per key."""
    items = [pipeline.tokenize_item(tokenizer, family, *((ex,) if isinstance(ex, str) else ex), keys=keys)
             for ex in examples]
    pad = pipeline.special_ids(tokenizer)[2]
    return collate(items, pad_id=pad, max_prompt_len=256, max_completion_len=384, batch_size=batch_size,
                   keys=keys if isinstance(examples[0], tuple) else ())


def _rows(ids, mask):
    return [row[m == 1].tolist() for row, m in zip(ids, mask)]


def test_llama_batch(splits, tok):
    exs = [format_example("llama", e) for e in splits["dev"][:3]]
    batch = _batch(exs, tok, "llama", batch_size=4)
    assert set(batch) == {"prompt", "prompt_mask", "completion", "completion_mask", "valid"}
    assert all(v.dtype == np.int32 for v in batch.values())
    b, p = batch["prompt"].shape
    assert b == 4 and p in (16, 32, 64, 128, 256) and batch["completion"].shape[1] in (16, 32, 64, 128, 256, 384)
    assert batch["valid"].tolist() == [1, 1, 1, 0]
    for (prompt, target), pr, co in zip(exs, _rows(batch["prompt"], batch["prompt_mask"]),
                                        _rows(batch["completion"], batch["completion_mask"])):
        assert pr[0] == BOS and EOS not in pr and tok.decode(pr[1:]) == prompt
        assert co[-1] == EOS and BOS not in co and tok.decode(co[:-1]) == target
    # left-padded prompts, right-padded completions
    assert (batch["prompt_mask"][:, -1][:3] == 1).all() and (batch["completion_mask"][:, 0][:3] == 1).all()
    assert (batch["prompt"][batch["prompt_mask"] == 0] == PAD).all()
    assert batch["prompt_mask"][3].sum() == 0 and batch["completion_mask"][3].sum() == 0


def test_t5_batch(splits, tok):
    exs = [format_example("t5", e) for e in splits["dev"][:2]]
    batch = _batch(exs, tok, "t5")
    for (prompt, target), pr, co in zip(exs, _rows(batch["prompt"], batch["prompt_mask"]),
                                        _rows(batch["completion"], batch["completion_mask"])):
        assert pr[-1] == EOS and BOS not in pr and tok.decode(pr[:-1]) == prompt
        assert co[-1] == EOS and tok.decode(co[:-1]) == target


def test_prompt_only_and_pair_batches(splits, tok):
    prompts = [format_example("llama", e)[0] for e in splits["dev"][:2]]
    batch = _batch(prompts, tok, "llama")
    assert set(batch) == {"prompt", "prompt_mask", "valid"}
    assert _rows(batch["prompt"], batch["prompt_mask"])[0] == pipeline.encode_prompt(tok, "llama", prompts[0])
    pairs = _batch([(prompts[0], "a #### 1", "a much longer rejected answer #### 2")], tok, "llama",
                   keys=("chosen", "rejected"))
    assert set(pairs) == {"prompt", "prompt_mask", "chosen", "chosen_mask", "rejected", "rejected_mask", "valid"}
    assert pairs["chosen"].shape == pairs["rejected"].shape  # one completion length for both
    assert tok.decode(_rows(pairs["rejected"], pairs["rejected_mask"])[0][:-1]) == "a much longer rejected answer #### 2"


class MergingTokenizer:
    """Characters are tokens, except that "ab" is one token: a prompt ending in "a" followed by a
    target starting with "b" tokenizes differently jointly than apart (like SentencePiece)."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, None

    def __call__(self, text, add_special_tokens=True):
        ids, i = [], 0
        while i < len(text):
            if text.startswith("ab", i):
                ids.append(3)
                i += 2
            else:
                ids.append(ord(text[i]))
                i += 1
        return {"input_ids": ids}


def test_llama_joint_tokenization_moves_merged_token():
    t = MergingTokenizer()
    assert pipeline.encode_example(t, "llama", "xa", "bc") == ([1, ord("x")], [3, ord("c"), 2])
    assert pipeline.encode_example(t, "llama", "xy", "bc") == ([1, ord("x"), ord("y")], [ord("b"), ord("c"), 2])
    assert pipeline.encode_example(t, "t5", "xa", "bc") == ([ord("x"), ord("a"), 2], [ord("b"), ord("c"), 2])
    # chosen merges, rejected does not: the shared prompt falls back to separate tokenization
    item = pipeline.tokenize_item(t, "llama", "xa", "bc", "zz", keys=("chosen", "rejected"))
    assert item["prompt"].tolist() == [1, ord("x"), ord("a")]
    assert item["chosen"].tolist() == [ord("b"), ord("c"), 2] and item["rejected"].tolist() == [ord("z")] * 2 + [2]
    batch = _batch([("xa", "bc")], t, "llama")  # no pad token: pads with 0
    assert (batch["prompt"][batch["prompt_mask"] == 0] == 0).all()


def test_length_limits(splits, tok):
    long_prompt = " ".join(["word"] * 300)
    exs = [format_example("t5", e) for e in splits["dev"][:5]] + [(long_prompt, "x"), ("q", long_prompt)]
    tokenized = pipeline.tokenize_examples(exs, tok, "t5", max_prompt_len=200, max_completion_len=300)
    assert tokenized.num_filtered == 2 and len(tokenized.items) == 5


def _items(n):
    return [{"prompt": np.full(i % 5 + 1, 100 + i, np.int32), "completion": np.arange(i % 7 + 1, dtype=np.int32)}
            for i in range(n)]


def _ids(batch):
    return [int(row[m == 1][0]) - 100 for row, m, v in zip(batch["prompt"], batch["prompt_mask"], batch["valid"]) if v]


def _loader(items, **kw):
    args = dict(batch_size=4, pad_id=0, max_prompt_len=64, max_completion_len=64, seed=0,
                shard_index=0, shard_count=1)
    args.update(kw)
    return make_loader(items, **args)


def test_loader_shuffles_per_epoch_deterministically():
    items = _items(20)
    first = [_ids(b) for b in itertools.islice(_loader(items), 10)]  # two epochs of 5 batches
    again = [_ids(b) for b in itertools.islice(_loader(items), 10)]
    assert first == again
    epoch1, epoch2 = sum(first[:5], []), sum(first[5:], [])
    assert sorted(epoch1) == sorted(epoch2) == list(range(20)) and epoch1 != epoch2
    assert sum((_ids(b) for b in itertools.islice(_loader(items, seed=1), 5)), []) != epoch1
    batch = next(_loader(items))
    assert batch["prompt"].shape == (4, 16) and batch["completion"].shape == (4, 16)


def test_loader_state_restores_position():
    items = _items(30)
    it = _loader(items, num_epochs=2)
    for _ in range(3):
        next(it)
    state = it.get_state()
    rest = [_ids(b) for b in it]
    resumed = _loader(items, num_epochs=2)
    resumed.set_state(state)
    assert [_ids(b) for b in resumed] == rest
    assert len(rest) == 15 - 3  # 2 epochs of 30 items run on across the boundary: 15 full batches of 4


def test_loader_shards_are_disjoint_and_equal():
    items = _items(23)
    shards = [[_ids(b) for b in _loader(items, num_epochs=1, shard_index=i, shard_count=2)] for i in range(2)]
    assert len(shards[0]) == len(shards[1]) == 2  # 11 items per host (the 23rd dropped): 2 full batches of 4
    seen = [set(sum(s, [])) for s in shards]
    assert not seen[0] & seen[1]


def test_eval_loader_keeps_everything_in_lockstep():
    items = _items(11)
    shards = [[b for b in _loader(items, num_epochs=1, shuffle=False, drop_remainder=False,
                                  shard_index=i, shard_count=3)] for i in range(3)]
    assert [len(s) for s in shards] == [1, 1, 1]  # 11 items over 3 hosts: one padded batch of 4 each
    ids = sorted(i for s in shards for b in s for i in _ids(b))
    assert ids == list(range(11))
    assert all(b["prompt"].shape[0] == 4 for s in shards for b in s)
    # a shard of filler rows only still yields a well-formed batch
    (only,) = list(_loader(_items(1), num_epochs=1, shuffle=False, drop_remainder=False, shard_index=1, shard_count=2))
    assert only["valid"].tolist() == [0, 0, 0, 0] and set(only) >= {"completion", "completion_mask"}


def _array_batches(n_rows, batch_size, steps, **kw):
    arrays = {"row": np.arange(n_rows), "twice": np.arange(n_rows)[:, None] * np.array([[2, 2]])}
    it = pipeline.make_array_loader(arrays, batch_size=batch_size, **kw)
    return it, [next(it) for _ in range(steps)]


def test_array_loader_takes_whole_batches_of_each_epochs_permutation():
    _, batches = _array_batches(10, 4, 5, seed=5, shard_index=0, shard_count=1)
    # 10 rows, batches of 4: two batches per epoch, the last 2 rows of each epoch's order skipped
    orders = [np.random.default_rng([5, epoch]).permutation(10) for epoch in range(3)]
    want = [orders[0][:4], orders[0][4:8], orders[1][:4], orders[1][4:8], orders[2][:4]]
    assert [b["row"].tolist() for b in batches] == [w.tolist() for w in want]
    assert all((b["twice"] == 2 * b["row"][:, None]).all() for b in batches)  # rows stay whole


def test_array_loader_hosts_split_each_global_batch_and_resume():
    _, single = _array_batches(12, 4, 6, seed=1, shard_index=0, shard_count=1)
    hosts = [_array_batches(12, 2, 6, seed=1, shard_index=i, shard_count=2)[1] for i in range(2)]
    assert [np.concatenate([h0["row"], h1["row"]]).tolist() for h0, h1 in zip(*hosts)] == \
        [b["row"].tolist() for b in single]
    it, _ = _array_batches(12, 4, 4, seed=1, shard_index=0, shard_count=1)
    state = it.get_state()
    resumed, _ = _array_batches(12, 4, 0, seed=1, shard_index=0, shard_count=1)
    resumed.set_state(state)
    assert [next(resumed)["row"].tolist() for _ in range(2)] == [b["row"].tolist() for b in single[4:6]]
    with pytest.raises(ValueError, match="3 rows do not fill one batch of 4"):
        pipeline.make_array_loader({"row": np.arange(3)}, batch_size=4, shard_index=0, shard_count=1)


def test_collate_rejects_too_many_items():
    with pytest.raises(ValueError):
        collate(_items(5), pad_id=0, max_prompt_len=16, max_completion_len=16, batch_size=4)


# -- completions after a fixed prompt (DPO pair sides), under a SentencePiece-style tokenizer -------

QUESTION = "Natalia sold clips to 48 of her friends in April. How many clips did she sell?"
RATIONALE = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72"


def metaspace_tokenizer():
    """A Llama-2-like tokenizer built locally: Unigram pieces, word starts marked by '▁' (Metaspace),
    whole '▁word' pieces scored above characters, so a word tokenizes differently at the start of a
    text ('▁Natalia') than right after a newline ('N', 'a', ...), as in SentencePiece."""
    import tokenizers
    import transformers
    from tokenizers import decoders, models, pre_tokenizers

    text = " ".join([format_prompt("llama", QUESTION), RATIONALE, "He wrong answer is 50"])
    chars = sorted(set(text.replace(" ", "")))
    words = sorted({w for line in text.split("\n") for w in line.split()})
    pieces = [("<unk>", 0.0), ("<s>", 0.0), ("</s>", 0.0), ("▁", -3.0)]
    pieces += [(c, -5.0) for c in chars] + [("▁" + w, -2.0) for w in words]
    tok = tokenizers.Tokenizer(models.Unigram(pieces, unk_id=0, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>")


def test_completion_after_prompt_is_tokenized_as_sft_does():
    tok = metaspace_tokenizer()
    prompt_text = format_prompt("llama", QUESTION)
    for target in (RATIONALE, "wrong answer is 50\n#### 50"):
        (sft,) = pipeline.tokenize_examples([(prompt_text, target)], tok, "llama", max_prompt_len=256,
                                            max_completion_len=384).items
        side = pipeline.encode_completion(tok, "llama", prompt_text, target)
        assert side == sft["completion"].tolist()
        assert sft["prompt"].tolist() == pipeline.encode_prompt(tok, "llama", prompt_text)
        # tokenized alone, the first word would carry the word-start marker SFT never saw
        alone = tok(target, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert alone != side and tok.convert_ids_to_tokens(alone[0]).startswith("▁")
        assert not tok.convert_ids_to_tokens(side[0]).startswith("▁")
        assert tok.decode(pipeline.encode_prompt(tok, "llama", prompt_text) + side,
                          skip_special_tokens=True) == prompt_text + target
    # t5: the decoder's sequence is the target alone, in SFT and in pairs
    (sft,) = pipeline.tokenize_examples([(QUESTION, "He sold 24.")], tok, "t5", max_prompt_len=256,
                                        max_completion_len=384).items
    assert pipeline.encode_completion(tok, "t5", QUESTION, "He sold 24.") == sft["completion"].tolist()
    assert sft["completion"].tolist() == tok("He sold 24.", add_special_tokens=False)["input_ids"] + [2]


def test_pair_sides_without_sampler_ids_match_sft():
    from dpost import stages
    from dpost.models.bundle import ModelBundle

    tok = metaspace_tokenizer()
    bundle = ModelBundle("llama", None, None, tok, None)
    prompt_text = format_prompt("llama", QUESTION)
    wrong = "wrong answer is 50\n#### 50"
    harvested = [7, 8, 9, tok.eos_token_id]
    rows = [{"id": "q0", "question": QUESTION, "chosen": RATIONALE, "rejected": wrong,
             "chosen_ids": None, "rejected_ids": None, "chosen_ref": None, "rejected_ref": None},
            {"id": "q1", "question": QUESTION, "chosen": RATIONALE, "rejected": wrong,
             "chosen_ids": None, "rejected_ids": harvested, "chosen_ref": None, "rejected_ref": -3.5}]
    items, refs, kept = stages._pair_items(bundle, rows, 256, 384)
    sft = pipeline.tokenize_examples([(prompt_text, RATIONALE), (prompt_text, wrong)], tok, "llama",
                                     max_prompt_len=256, max_completion_len=384).items
    assert len(items) == 2 and kept == rows and refs == [[None, None], [None, -3.5]]
    for item in items:
        assert item["prompt"].tolist() == sft[0]["prompt"].tolist()
        assert item["chosen"].tolist() == sft[0]["completion"].tolist()
    assert items[0]["rejected"].tolist() == sft[1]["completion"].tolist()
    assert items[1]["rejected"].tolist() == harvested  # sampler ids are used as they are
