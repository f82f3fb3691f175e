"""Per-family formatting. The T5 targets below were worked out by hand from the protocol's six
rules (and the release's regular expressions they paraphrase), not copied from the output."""

from __future__ import annotations

import pytest

from tests.conftest import data_dir
from dpost.data import formatting, gsm8k
from dpost.data.formatting import LLAMA_PROMPT_TEMPLATE, t5_rationale

# (raw GSM8K train rationale, T5 target). Comments: which rules the row exercises.
REAL_ROWS = [
    # rule 1 (<<6=6>> dropped), rule 4 spacing (x=x+24 -> x = x + 24), rule 5 (dots added),
    # a line already ending with "." untouched
    ("Let x be the number of red marbles.\n5*x=x+24\n4*x=24\nx=<<6=6>>6\n#### 6",
     "Let x be the number of red marbles. 5 * x = x + 24. 4 * x = 24. x = 6. #### 6"),
    # rule 2 (Dog:9 -> Dog: 9), rule 3 (<< -> "[ ", >> -> "] "), rule 4, rule 5
    ("Dog:9-3=<<9-3=6>>6 lives\nMouse:6+7=<<6+7=13>>13 lives\n#### 13",
     "Dog: 9 - 3 = [ 9 - 3 = 6] 6 lives. Mouse: 6 + 7 = [ 6 + 7 = 13] 13 lives. #### 13"),
    # mixed operators each spaced by its own pass; lines ending with "." keep theirs
    ("Kendra made 4+5*8=<<4+5*8=44>>44.\nSue made 44/2=<<44/2=22>>22.\n#### 22",
     "Kendra made 4 + 5 * 8 = [ 4 + 5 * 8 = 44] 44. Sue made 44 / 2 = [ 44 / 2 = 22] 22. #### 22"),
    # hyphenated words are spaced too ("pull - ups"): the rule is about characters, not arithmetic
    ("He does 5*2=<<5*2=10>>10 pull-ups a day\nSo he does 10*7=<<10*7=70>>70 pull-ups a week\n#### 70",
     "He does 5 * 2 = [ 5 * 2 = 10] 10 pull - ups a day. So he does 10 * 7 = [ 10 * 7 = 70] 70 pull - ups a week. "
     "#### 70"),
    # rule 4 dollars ($102 -> $ 102, $<< -> $ [ ), "%" untouched
    ("The ticket price increase is $102 - $85 = $<<102-85=17>>17\nSo there is 17/85 x 100% = 20% increase of price.\n"
     "#### 20",
     "The ticket price increase is $ 102 - $ 85 = $ [ 102 - 85 = 17] 17. So there is 17 / 85 x 100% = 20% increase "
     "of price. #### 20"),
]


@pytest.mark.parametrize("raw,expected", REAL_ROWS)
def test_t5_rationale_real_rows(raw, expected):
    assert t5_rationale(raw) == expected


def test_real_rows_are_in_the_release_train_set():
    answers = {ex.answer for ex in gsm8k.load_split("train", data_dir())}
    assert all(raw in answers for raw, _ in REAL_ROWS)


@pytest.mark.parametrize("raw,expected", [
    # The release's substitutions do not overlap: in a chain of one-digit operands every other
    # operator stays unspaced. Kept on purpose (these are the targets the release trained on).
    ("<<1+2+3=6>>6", "[ 1 + 2+3 = 6] 6."),
    ("<<12=12>>12 and <<1.5=1.5>>", "12 and [ 1.5 = 1.5] ."),  # only plain integers are trivial
    ("Time:5 hours, 10:30", "Time: 5 hours, 10:30."),  # colon rule needs a non-digit before
    ("a  b \n#### 3", "a b . #### 3"),  # whitespace runs normalised to one space
    ("x = 2 + 3", "x = 2 + 3."),  # already spaced: unchanged
    ("### 5\n## 6", "### 5 ## 6"),  # lines starting with ## are final-answer lines
])
def test_t5_rationale_rules(raw, expected):
    assert t5_rationale(raw) == expected


def test_t5_gold_still_extracts():
    for ex in gsm8k.load_split("dev", data_dir())[:200]:
        assert gsm8k.extract_answer(t5_rationale(ex.answer)) == ex.gold


def test_prompts_and_targets():
    ex = gsm8k.Example("How many?", "1+1=<<1+1=2>>2\n#### 2", 2.0, "x")
    assert LLAMA_PROMPT_TEMPLATE == (
        "Below is an instruction that describes a task. Write a response that appropriately completes "
        "the request.\n\n### Instruction:\n{question}\n\n### Response:\n")
    assert formatting.format_example("llama", ex) == (
        LLAMA_PROMPT_TEMPLATE.format(question="How many?"), "1+1=<<1+1=2>>2\n#### 2")
    assert formatting.format_example("t5", ex) == ("How many?", "1 + 1 = [ 1 + 1 = 2] 2. #### 2")
    with pytest.raises(ValueError, match="family"):
        formatting.format_prompt("gpt2", "q")
