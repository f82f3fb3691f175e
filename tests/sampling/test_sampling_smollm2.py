"""SmolLM2-135M-Instruct (GGUF): greedy sampling equals transformers' `generate` token for token on
GSM8K prompts of different lengths batched together; log-probs equal `models.sequence_logprobs`;
calculator-assisted decoding on a real model and tokenizer."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest

from dpost import calculator, models, sampling
from dpost.data.formatting import LLAMA_PROMPT_TEMPLATE
from sampling_toys import gsm8k_questions
from tests.conftest import data_dir, smollm2_path

NEW_TOKENS = 64


@pytest.fixture(scope="module")
def prompts():
    questions = sorted(gsm8k_questions(data_dir(), 40), key=len)
    return [LLAMA_PROMPT_TEMPLATE.format(question=q) for q in questions[::5]]  # 8 prompts, varied lengths


@pytest.fixture(scope="module")
def hf_reference(smollm2_bundle, prompts):
    import torch
    import transformers

    folder, name = os.path.split(smollm2_path())
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    model.config.quantization_config = None
    tok = smollm2_bundle.tokenizer
    rows = [tok(p)["input_ids"] for p in prompts]
    width = max(len(r) for r in rows)
    pad, eos = smollm2_bundle.pad_token_id, smollm2_bundle.eos_token_id
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: robust on a busy 2-core machine (spinning OpenMP threads stall)
    try:
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                                 pad_token_id=pad, eos_token_id=eos, min_new_tokens=0)
    finally:
        torch.set_num_threads(threads)
    return [row[: row.index(eos) + 1] if eos in row else row for row in out[:, width:].tolist()]


@pytest.fixture(scope="module")
def greedy(smollm2_bundle, prompts):
    return sampling.generate(smollm2_bundle, prompts, max_new_tokens=NEW_TOKENS)


def test_greedy_equals_transformers(smollm2_bundle, prompts, hf_reference, greedy):
    lengths = [len(smollm2_bundle.tokenizer(p)["input_ids"]) for p in prompts]
    assert len(set(lengths)) == len(lengths)
    for i, ((s,), ref) in enumerate(zip(greedy, hf_reference)):
        assert s.token_ids == ref, (i, s.text)
        assert s.text == smollm2_bundle.tokenizer.decode(ref, skip_special_tokens=True)


def test_logprobs_equal_sequence_logprobs(smollm2_bundle, prompts, greedy):
    tok = smollm2_bundle.tokenizer
    prompt_ids = [tok(p)["input_ids"] for p in prompts]
    ref = models.sequence_logprobs(smollm2_bundle, prompt_ids, [s.token_ids for (s,) in greedy])
    np.testing.assert_allclose([sum(s.token_logprobs) for (s,) in greedy], ref, atol=1e-3, rtol=0)


ANNOTATION = re.compile(r"<<([^<>=]*)=([^<>]*)>>")


SHOTS = (
    "Question: Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?\nAnswer: Natalia sold 48/2 = <<48/2=24>>24 clips "
    "in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72\n\n"
    "Question: Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. How much "
    "did she earn?\nAnswer: Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nWorking 50 minutes, she earned "
    "0.2 x 50 = $<<0.2*50=10>>10.\n#### 10\n\n"
)


def test_calculator_on_real_model(smollm2_bundle):
    """A two-shot GSM8K prompt makes SmolLM2 write `<<expr=result>>` annotations; with the calculator
    every evaluable annotation carries the exact result, and forced tokens are scored by the model."""
    questions = gsm8k_questions(data_dir(), 6)
    prompts = [SHOTS + f"Question: {questions[i]}\nAnswer:" for i in (2, 3, 5)]
    tok = smollm2_bundle.tokenizer
    assert max(len(tok(p)["input_ids"]) for p in prompts) <= 288
    out = sampling.generate(smollm2_bundle, prompts, max_new_tokens=32, calculator=True, length_buckets=[288])
    forced = 0
    for (s,) in out:
        for expr, result in ANNOTATION.findall(s.text):
            value = calculator.evaluate(expr)
            if value is not None:
                assert result == value, (expr, result, s.text)
                forced += 1
    assert forced >= 2, [s.text for (s,) in out]
    ref = models.sequence_logprobs(smollm2_bundle, [tok(p)["input_ids"] for p in prompts],
                                   [s.token_ids for (s,) in out])
    np.testing.assert_allclose([sum(s.token_logprobs) for (s,) in out], ref, atol=1e-3, rtol=0)
