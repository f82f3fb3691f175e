"""The DPO-ST stages' own logic on hand-made inputs (the stages end to end: test_driver.py)."""

from __future__ import annotations

import numpy as np

from dpost import stages
from dpost.data import gsm8k
from dpost.data.builders import build_pairs


def test_production_pooling_merges_rounds_by_question():
    """stages.question_samples pools the sampled texts of several rounds per question, in round order."""
    ex = [gsm8k.Example("Q1?", "g1 #### 1", 1.0, "q1"), gsm8k.Example("Q2?", "", 2.0, "q2")]
    r1 = {"q1": [{"text": "A #### 1"}], "q2": [{"text": "B #### 2"}]}
    r2 = {"q2": [{"text": "C #### 5"}], "q1": [{"text": "D #### 3"}, {"text": "E #### 1"}]}
    pooled = stages.question_samples(ex, [r1, r2])
    assert [(x.id, x.gold_rationale, x.samples) for x in pooled] == [
        ("q1", "g1 #### 1", ["A #### 1", "D #### 3", "E #### 1"]), ("q2", "", ["B #### 2", "C #### 5"])]
    assert stages.question_samples(ex, [])[0].samples == []
    # Neither question has a negative in round 1 alone; pooled, q1 has gold + 2 correct vs 1 wrong.
    assert build_pairs(stages.question_samples(ex, [r1]), "llama") == []
    pairs = build_pairs(pooled, "llama")
    assert [(p.id, p.rejected) for p in pairs] == [("q1", "D #### 3")] * 3 + [("q2", "C #### 5")]


def test_dpo_eval_batches_are_the_first_pairs_with_an_invalid_filler():
    arrays = {"prompt": np.arange(10).reshape(5, 2), "valid": np.ones(5, np.int32)}
    batches = stages._eval_batches(arrays, n_eval=5, batch_size=2)
    assert [b["prompt"][:, 0].tolist() for b in batches] == [[0, 2], [4, 6], [8, 8]]
    assert [b["valid"].tolist() for b in batches] == [[1, 1], [1, 1], [1, 0]]
    assert [b["prompt"][:, 0].tolist() for b in stages._eval_batches(arrays, n_eval=3, batch_size=4)] == [[0, 2, 4, 4]]


def test_a_stage_has_one_shape_from_its_longest_rows():
    items = [{"prompt": [1] * 3, "chosen": [1] * 20, "rejected": [1] * 5}, {"prompt": [1] * 17, "chosen": [1], "rejected": [1]}]
    assert stages._stage_lengths(items, ["chosen", "rejected"], max_p=256, max_c=24) == (32, 24)


def test_dpo_counts_each_side_through_its_first_wrong_step(tmp_path):
    """`dpo.count=through_wrong_step`, on the CPU default's kind of tokenizer: each side's loss mask
    keeps exactly the tokens of its text through its first step that differs from the other side's
    (decoded, they are that text); a side whose sampler ids are not its text's tokens counts whole."""
    from dpost.data import formatting, synthetic
    from dpost.data.builders import QuestionSamples
    from dpost.models.bundle import ModelBundle

    question = "Eli has 12 apples. He gets 5 more, then 3 times as many. How many?"
    gold = "Eli has 5+12=<<5+12=17>>17 apples.\nWith 3 times as many, 17*3=<<17*3=51>>51.\n#### 51"
    wrong = "At first 12.\nAfter 5 more, 12+5=<<12+5=17>>17.\nAfter 4 more, 17+4=<<17+4=21>>21.\n#### 21"
    tok = synthetic.train_tokenizer([formatting.format_prompt("llama", question), gold, wrong], tmp_path, 300)
    bundle = ModelBundle("llama", None, None, tok, None)
    (pair,) = build_pairs([QuestionSamples("q1", question, gold, 51.0, [wrong])], "llama", rejected="wrong_step")
    # Step 1 agrees (17), step 2 does not (51 against 21): the graft is gold's first line, then wrong's rest.
    through = {"chosen": "Eli has 5+12=<<5+12=17>>17 apples.\nWith 3 times as many, 17*3=<<17*3=51>>51.\n",
               "rejected": "Eli has 5+12=<<5+12=17>>17 apples.\nAfter 4 more, 17+4=<<17+4=21>>21.\n"}
    assert pair.rejected == through["rejected"] + "#### 21"
    row = {"id": "q1", "question": question, "chosen": pair.chosen, "rejected": pair.rejected,
           "chosen_step_end": pair.chosen_step_end, "rejected_step_end": pair.rejected_step_end}
    char_ids = [tok.convert_tokens_to_ids(c) for c in "Eli"] + [tok.eos_token_id]  # not the text's tokens
    rows = [row, dict(row, chosen_ids=char_ids)]
    items, _, kept = stages._pair_items(bundle, rows, 256, 256)
    p_len, c_len = stages._stage_lengths(items, ["chosen", "rejected"], 256, 256)
    arrays = stages._pair_arrays(items, bundle.pad_token_id, p_len, c_len)
    masks = {k: v.astype(bool) for k, v in stages._wrong_step_loss_masks(bundle, kept, items, arrays).items()}
    arrays = {k: v.astype(bool) if k.endswith("_mask") else v for k, v in arrays.items()}
    for side in ("chosen", "rejected"):
        counted = arrays[side][0][masks[side + "_loss_mask"][0]]
        assert tok.decode(counted.tolist()) == through[side]
        assert masks[side + "_loss_mask"][0].sum() < arrays[side + "_mask"][0].sum()
    assert (masks["chosen_loss_mask"][1] == arrays["chosen_mask"][1]).all()  # counted whole
    assert tok.decode(arrays["rejected"][1][masks["rejected_loss_mask"][1]].tolist()) == through["rejected"]
