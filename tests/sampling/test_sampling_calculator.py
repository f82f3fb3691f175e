"""Calculator-assisted decoding: exact forced results (integer, decimal, negative, multi-token) in both
annotation formats, nothing forced on a failed evaluation, forced tokens scored by the model, the
per-token automaton on real tokenizers, and context-aware tokenization of the forced text.

A scripted model (sampling_toys.ScriptedLM) "wants" to write a fixed text with wrong results; the
calculator must replace exactly the results and the model then continues its script."""

from __future__ import annotations

import numpy as np
import pytest

from dpost import calculator, models, sampling
from dpost.sampling import forcing
from sampling_toys import byte_bpe_tokenizer, scripted_bundle, sentencepiece_tokenizer

# (script the model wants to write, text expected with the calculator on)
CASES = {
    "llama": [
        ("He has <<48/2=25>>25 apples.", "He has <<48/2=24>>25 apples."),  # integer
        ("So <<1/3=0.34>>0.34 and <<1234*10=12345>>12345.",  # decimal, then a multi-token result
         "So <<1/3=0.33>>0.34 and <<1234*10=12340>>12345."),
        ("x=<<2+x=5>>5 ok <<7-9=1>>", "x=<<2+x=5>>5 ok <<7-9=-2>>"),  # failed evaluation; negative
        ("<<10/4=2.6>>2.6 and <<3*(2+1)=8>>", "<<10/4=2.5>>2.6 and <<3*(2+1)=9>>"),
    ],
    "t5": [
        ("He has [ 48 / 2 = 25] 25 apples.", "He has [ 48 / 2 = 24] 25 apples."),
        ("so [ 1 / 3 = 0.34] 0.34 and [ 1234 * 10 = 12345] 12345.",
         "so [ 1 / 3 = 0.33] 0.34 and [ 1234 * 10 = 12340] 12345."),
        ("[ 2 + x = 5] 5 ok [ 7 - 9 = 1]", "[ 2 + x = 5] 5 ok [ 7 - 9 = -2]"),
        ("[ 10 / 4 = 2.6] 2.6 and [ 3 * (2 + 1) = 8]", "[ 10 / 4 = 2.5] 2.6 and [ 3 * (2 + 1) = 9]"),
    ],
}
TOKENIZERS = {"llama": byte_bpe_tokenizer, "t5": sentencepiece_tokenizer}


@pytest.fixture(scope="module", autouse=True)
def _fast_compile():
    """Tiny models: compile the sampler's programs without LLVM optimisation (faster tests)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DPOST_SAMPLER_FAST_COMPILE", "1")
        yield


@pytest.fixture(scope="module", params=["llama", "t5"])
def scripted(request):
    family = request.param
    tok = TOKENIZERS[family]()
    bundle, prompts = scripted_bundle(family, tok, [script for script, _ in CASES[family]])
    return family, tok, bundle, prompts


def test_forced_results_are_exact(scripted):
    family, tok, bundle, prompts = scripted
    off = sampling.generate(bundle, prompts, max_new_tokens=48)
    on = sampling.generate(bundle, prompts, max_new_tokens=48, calculator=True)
    for (script, expected), (s_off,), (s_on,) in zip(CASES[family], off, on):
        assert s_off.text == script  # the model writes its script; without calculator nothing changes
        assert s_on.text == expected, (s_on.text, expected)
        assert s_on.finish_reason == "eos"
    # the forced tokens are the tokenizer's own tokens for the result in context
    (s,) = on[0]
    open_m, close_m = calculator.markers(family)
    head = "He has <<48/2=" if family == "llama" else "He has [ 48 / 2 ="
    forced_text = "24>>" if family == "llama" else " 24]"
    n_head = len(tok.encode(head, add_special_tokens=False))
    want = tok.encode(head + forced_text, add_special_tokens=False)[n_head:]
    assert s.token_ids[n_head:n_head + len(want)] == want
    if family == "t5":
        assert tok.convert_ids_to_tokens(want) == ["▁24", "]"]
    # multi-token result
    (s,) = on[1]
    assert len(tok.encode(" 12340" if family == "t5" else "12340", add_special_tokens=False)) >= 2


def test_forced_tokens_are_scored_by_the_model(scripted):
    _, _, bundle, prompts = scripted
    out = sampling.generate(bundle, prompts, max_new_tokens=48, calculator=True)
    ref = models.sequence_logprobs(bundle, prompts, [s.token_ids for (s,) in out])
    np.testing.assert_allclose([sum(s.token_logprobs) for (s,) in out], ref, atol=1e-3)
    # forced tokens the model did not want have low log-probs (they were not sampled)
    assert min(min(s.token_logprobs) for (s,) in out) < -3


def test_max_new_tokens_cuts_forcing(scripted):
    family, tok, bundle, prompts = scripted
    head = "He has <<48/2=" if family == "llama" else "He has [ 48 / 2 ="
    n = len(tok.encode(head, add_special_tokens=False)) + 1  # room for one forced token only
    (s,), = sampling.generate(bundle, prompts[:1], max_new_tokens=n, calculator=True)
    assert len(s.token_ids) == n and s.finish_reason == "length"
    assert s.text == head + ("2" if family == "llama" else " 24")  # the first forced token only


def test_rows_with_events_at_different_steps_and_samples():
    tok = byte_bpe_tokenizer()
    texts = ["<<1+1=3>> then <<2*3=7>>", "a long preamble first, then <<5*5=24>>", "no annotation at all",
             list(tok.convert_tokens_to_ids(["<", "<", "9", "-", "4", "=", "6", ">>"]))]  # split open marker
    bundle, prompts = scripted_bundle("llama", tok, texts)
    out = sampling.generate(bundle, prompts, max_new_tokens=40, calculator=True, num_samples=2, batch_size=3)
    texts_on = [[s.text for s in samples] for samples in out]
    assert texts_on == [["<<1+1=2>> then <<2*3=6>>"] * 2, ["a long preamble first, then <<5*5=25>>"] * 2,
                        ["no annotation at all"] * 2, ["<<9-4=5>>"] * 2]


def test_automaton_on_smollm2_tokenizer(smollm2_bundle):
    tok = smollm2_bundle.tokenizer
    tables = forcing.tables_for(tok, "llama", smollm2_bundle.config.vocab_size)
    assert forcing.tables_for(tok, "llama", smollm2_bundle.config.vocab_size) is tables  # cached

    def events(text):
        ids = tok.encode(text, add_special_tokens=False)
        state, found = tables.start, []
        for k, i in enumerate(ids):
            if tables.event[state, i]:
                found.append(tok.decode(ids[: k + 1]))
            state = tables.next_state[state, i]
        return ids, found

    assert events("He has <<48/2=24>>24 apples, x=<<3*4=12>>12.")[1] == ["He has <<48/2=",
                                                                          "He has <<48/2=24>>24 apples, x=<<3*4="]
    assert events("a = b, <<5==5>> and 3 = 3, <<(3+5)*2=")[1] == ["a = b, <<5==5>> and 3 = 3, <<(3+5)*2="]
    assert events("no < < 3 = 4 here >> = 2")[1] == []
    for text, forced in (("He has <<48/2=", "24>>"), ("So <<1/3=", "0.33>>"), ("<<(3+5)*2=", "16>>"),
                         ("<<7-9=", "-2>>"), ("<<1,234*10=", "12340>>")):
        ids = forcing.forced_ids(tok, "llama", tok.encode(text, add_special_tokens=False))
        assert tok.decode(ids) == forced, (text, tok.decode(ids))
        ctx, joint = tok.encode(text, add_special_tokens=False), tok.encode(text + forced, add_special_tokens=False)
        if joint[: len(ctx)] == ctx:  # the tokenizer's own split of the continuation
            assert ids == joint[len(ctx):]
        else:  # "=-" is one SmolLM2 token: the "=" is already emitted, so "-2>>" is tokenized alone
            assert text.endswith("=") and forced.startswith("-")
            assert ids == tok.encode(forced, add_special_tokens=False)
    assert forcing.forced_ids(tok, "llama", tok.encode("<<2+x=", add_special_tokens=False)) is None
    assert forcing.forced_ids(tok, "llama", tok.encode("<<2+3=5>> and", add_special_tokens=False)) is None


def test_context_aware_tokenization_sentencepiece():
    tok = sentencepiece_tokenizer()
    ids = tok.encode("He has [ 48 / 2 =", add_special_tokens=False)
    assert tok.convert_ids_to_tokens(forcing.forced_ids(tok, "t5", ids)) == ["▁24", "]"]
    ids = tok.encode("[ 1 / 3 =", add_special_tokens=False)
    assert tok.decode(forcing.forced_ids(tok, "t5", ids)).strip() == "0.33]"
    # forced text tokenized alone would differ (no context): the result keeps its word-boundary piece
    assert forcing.tokenize_in_context(tok, "[ 7 =", " 7]") == tok.convert_tokens_to_ids(["▁7", "]"])


FORCED_SPANS = {"llama": [["24>>"], ["0.33>>", "12340>>"], ["-2>>"], ["2.5>>", "9>>"]],
                "t5": [["24]"], ["0.33]", "12340]"], ["-2]"], ["2.5]", "9]"]]}


def test_forced_positions_replay_what_the_sampler_forced(scripted):
    """`forcing.forced_positions` (dpo.mask_calculator) marks, in a sampled completion, exactly the
    tokens the calculator forced: each marked span decodes to a result and closing marker of CASES'
    expected texts; the failed evaluation (`2+x`) and everything the model wrote are unmarked."""
    family, tok, bundle, prompts = scripted
    on = sampling.generate(bundle, prompts, max_new_tokens=48, calculator=True)
    tables = forcing.tables_for(tok, family, bundle.config.vocab_size)
    for (s,), want in zip(on, FORCED_SPANS[family]):
        marked = forcing.forced_positions(tok, family, s.token_ids, tables)
        spans, current = [], []
        for token, is_forced in zip(s.token_ids, marked):
            if is_forced:
                current.append(token)
            elif current:
                spans.append(current)
                current = []
        spans += [current] if current else []
        assert [tok.decode(span).strip() for span in spans] == want, s.text
