"""The safe calculator: GSM8K-style arithmetic, the release's result formatting, and refusal
(None, never an exception, always fast) of anything else."""

from __future__ import annotations

import json
import os
import random
import re
import time

import pytest

from tests.conftest import data_dir
from dpost import calculator
from dpost.calculator import evaluate, evaluate_number

TABLE = [
    ("3/5*90", "54"),
    ("15+7", "22"),
    ("30+25+38", "93"),
    ("120-93", "27"),
    ("(600*2)*2", "2400"),
    ("(1/3)*15+7", "12"),
    ("110*(110/100)", "121"),
    ("1/3", "0.33"),
    ("2/3", "0.67"),
    ("5/2", "2.5"),
    ("50*.01", "0.5"),
    (".5/100", "0.01"),
    ("2.75+1.5+11.5", "15.75"),
    ("20/100*50", "10"),
    ("0.1+0.2", "0.3"),  # 0.30000000000000004 -> round(x, 2)
    ("560//10", "56"),
    ("7//2", "3"),
    ("2**10", "1024"),
    ("2**-1", "0.5"),
    ("-2**2", "-4"),  # Python precedence: ** binds tighter than unary minus
    ("2**3**2", "512"),  # right-associative
    ("-5+3", "-2"),
    ("+4", "4"),
    ("--4", "4"),
    ("1,234+1", "1235"),
    ("1,234,567.5*2", "2469135"),
    ("$5*3", "15"),
    ("$1,200/4", "300"),
    ("50%*80", "40"),
    ("100-20%*100", "80"),
    (" 48 / 2 ", "24"),  # T5 annotations are spaced: "[ 48 / 2 = 24 ]"
    ("12 * ( 3 + 4 )", "84"),
    ("7", "7"),
    ("0.00001", "0"),  # |int(x) - x| < 1e-4
    ("0.0001", "0.0"),  # not < 1e-4: round(x, 2)
    ("2.99999", "3.0"),  # the release's quirk: int() truncates, then round(x, 2)
    ("-1/3", "-0.33"),
    ("1e3", None),  # exponent notation is not GSM8K arithmetic
    ("1,23", None),  # not a thousands group
    ("2 3", None),
    ("3+", None),
    ("(3+4", None),
    ("3+4)", None),
    ("()", None),
    ("", None),
    ("   ", None),
    ("1/0", None),
    ("1//0", None),
    ("0**-1", None),
    ("(-8)**(1/3)", None),  # complex
    ("2**65", None),  # exponent bound
    ("10**15*10", None),  # magnitude bound
    ("x+1", None),
    ("2 x 3", None),
]


@pytest.mark.parametrize("expr,expected", TABLE)
def test_table(expr, expected):
    assert evaluate(expr) == expected


ADVERSARIAL = [
    "__import__('os')",
    "__import__('os').system('echo hi')",
    "().__class__",
    "().__class__.__bases__[0].__subclasses__()",
    "lambda: 1",
    "open('/etc/passwd').read()",
    "9**9**9",
    "9**9**9**9",
    "(" * 10_000 + "1" + ")" * 10_000,
    "-" * 10_000 + "1",
    "1" * 10_000,
    "1+" * 5_000 + "1",
    "9" * 400,
    "9" * 16 + "*9",
    "1/0",
    "",
    None,
    b"1+1",
    "1" + "\x00",
    "１+１",  # full-width digits are not ASCII arithmetic
    "nan",
    "inf",
    "1e308*10",
    "2**64**64",
    "(2**60)**2",
    "%%%",
    "$$$",
]


def test_adversarial_inputs_return_none_fast():
    worst = 0.0
    for text in ADVERSARIAL:
        for _ in range(3):
            start = time.perf_counter()
            out = evaluate(text)  # type: ignore[arg-type]
            worst = max(worst, time.perf_counter() - start)
        assert out is None, (text if not isinstance(text, str) else text[:40], out)
    # Timing is reported, not asserted (no timed assertions in tests; the machine may be loaded).
    print(f"worst adversarial evaluate(): {worst * 1e3:.3f} ms")


def test_depth_limit_boundary():
    assert evaluate("(" * calculator.MAX_DEPTH + "1" + ")" * calculator.MAX_DEPTH) == "1"
    assert evaluate("(" * (calculator.MAX_DEPTH + 1) + "1" + ")" * (calculator.MAX_DEPTH + 1)) is None


def test_random_junk_never_raises():
    rng = random.Random(0)
    alphabet = "0123456789+-*/().,%$ x=_'\"[]<>e**//"
    worst = 0.0
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        start = time.perf_counter()
        out = evaluate(text)
        worst = max(worst, time.perf_counter() - start)
        assert out is None or isinstance(out, str)
    print(f"worst random-junk evaluate(): {worst * 1e3:.3f} ms")


def test_markers():
    assert calculator.markers("llama") == ("<<", ">>")
    assert calculator.markers("t5") == ("[", "]")
    with pytest.raises(ValueError):
        calculator.markers("gpt")


def _gsm8k_annotations(split: str) -> list[str]:
    path = os.path.join(data_dir(), "gsm8k", f"{split}.jsonl")
    with open(path, encoding="utf-8") as f:
        return [a for line in f for a in re.findall(r"<<(.*?)>>", json.loads(line)["answer"])]


def test_agrees_with_all_gsm8k_train_annotations():
    """evaluate(lhs) equals the annotation's stated result, for (almost) every annotation.

    A disagreement within 0.005 is the release's 2-decimal rounding of the stated value
    (``.125`` -> "0.12"); larger ones would be evaluator bugs or annotation errors.
    """
    annotations = _gsm8k_annotations("train")
    assert len(annotations) > 20_000
    exact, rounding, failures = 0, 0, []
    start = time.perf_counter()
    for ann in annotations:
        lhs, _, rhs = ann.rpartition("=")
        out, stated = evaluate(lhs), evaluate_number(rhs)
        if out is not None and stated is not None and abs(float(out) - stated) < 1e-4:
            exact += 1
        elif out is not None and stated is not None and abs(float(out) - stated) <= 0.005 + 1e-9:
            rounding += 1
        else:
            failures.append((ann, out))
    per_call = (time.perf_counter() - start) / len(annotations)
    print(f"{len(annotations)} annotations: {exact} exact, {rounding} 2-decimal rounding, "
          f"{len(failures)} failures {failures[:20]}; {per_call * 1e6:.1f} us per call")
    assert exact / len(annotations) >= 0.99
    assert not failures
