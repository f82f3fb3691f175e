"""Prompt and target text per model family (protocol: "Formatting per model family").

T5 (encoder-decoder): the question as is; the rationale rewritten by ``t5_rationale`` so that
annotations read ``[ 48 / 2 = 24 ] 24``. Llama (decoder-only): an Alpaca-style prompt and the
rationale unchanged. Special tokens are *not* added here: the tokenizing caller
(``dpost.data.pipeline``) prepends BOS to Llama prompts and appends EOS to every target (and to T5
encoder inputs), so the texts here stay comparable across tokenizers (Jaccard, de-duplication).
"""

from __future__ import annotations

import re

from dpost import calculator
from dpost.data.gsm8k import Example

FAMILIES = ("llama", "t5")

LLAMA_PROMPT_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{question}\n\n### Response:\n"
)

_LL_OPEN, _LL_CLOSE = calculator.markers("llama")
_T5_OPEN, _T5_CLOSE = calculator.markers("t5")

# Steps 1-4 as ordered substitutions. They are the release's own regular expressions: each runs
# once, left to right, without overlap, so in a chain of one-digit operands only every other
# operator gets spaces ("1+2+3" -> "1 + 2+3"). Multi-digit chains ("30+25+38") are fully spaced.
# We keep that quirk on purpose: these are the targets the release trained on.
_T5_REWRITES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(re.escape(_LL_OPEN) + r"\d+=\d+" + re.escape(_LL_CLOSE)), ""),  # 1. <<12=12>>
    (re.compile(r"(\D):(\d)"), r"\1: \2"),  # 2. colon between non-digit and digit
    (re.compile(re.escape(_LL_OPEN)), _T5_OPEN + " "),  # 3. << -> "[ "
    (re.compile(re.escape(_LL_CLOSE)), _T5_CLOSE + " "),  #    >> -> "] "
    (re.compile(r"\$(\S)"), r"$ \1"),  # 4. $5 -> $ 5
    (re.compile(r"(\S)\+(\S)"), r"\1 + \2"),
    (re.compile(r"(\S)-(\S)"), r"\1 - \2"),
    (re.compile(r"(\S)\*(\S)"), r"\1 * \2"),
    (re.compile(r"(\S)/(\S)"), r"\1 / \2"),
    (re.compile(r"(\S)=(\S)"), r"\1 = \2"),
)
_WHITESPACE = re.compile(r"\s+")


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; expected one of {FAMILIES}")


def t5_rationale(answer: str) -> str:
    """Rewrite a GSM8K rationale into the T5 target (protocol steps 1-6, in order).

    5. every line not starting with ``####`` (the release tests ``##``) and not ending with ``.``
       gets a ``.``; 6. lines joined with single spaces. Finally runs of whitespace become one
    space and the ends are stripped (T5's SentencePiece normaliser collapses whitespace anyway,
    so the tokens match the release's; the text is just cleaner for Jaccard and comparisons).
    """
    text = answer
    for pattern, repl in _T5_REWRITES:
        text = pattern.sub(repl, text)
    lines = [line if line.startswith("##") or line.endswith(".") else line + "."
             for line in text.split("\n")]
    return _WHITESPACE.sub(" ", " ".join(lines)).strip()


def format_prompt(family: str, question: str) -> str:
    """Model input text for a question (no special tokens)."""
    _check_family(family)
    return LLAMA_PROMPT_TEMPLATE.format(question=question) if family == "llama" else question


def format_target(family: str, answer: str) -> str:
    """Training target for a gold rationale (no EOS: the tokenizing caller appends it)."""
    _check_family(family)
    return answer if family == "llama" else t5_rationale(answer)


def format_example(family: str, example: Example) -> tuple[str, str]:
    """(prompt_text, target_text) of a GSM8K example for a model family."""
    return format_prompt(family, example.question), format_target(family, example.answer)
