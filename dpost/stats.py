"""Paired statistics for comparing two methods run on the same seeds and the same test questions.

Inputs are correctness arrays of shape [seeds, questions] (1 = correct), one per method, rows paired
by seed and columns by question. Two intervals (95% unless a level is given) for the mean accuracy
difference A - B:

* paired t over seeds: the per-seed accuracy differences with Student's t (seeds - 1 degrees of
  freedom). It treats the test set as fixed and needs two seeds or more.
* hierarchical bootstrap over seeds and questions (the primary one): each resample draws seeds with
  replacement and, independently, test questions with replacement, the same draws for both methods
  and for every drawn seed (the seeds share one test set, so its questions are drawn once);
  the statistic is the mean over the drawn seeds of the accuracy difference on the drawn questions,
  and the interval is the central percentile range (2.5-97.5 at 95%). It counts both sources of
  chance: training randomness (seeds) and the finite test set (questions).

With them, the detectable difference: the smallest true difference the t test would find with 80%
probability, given the seeds' spread; a "no difference" rules out differences of about that size only.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np
from scipy import stats as scipy_stats

LEVEL = 0.95
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
BOOTSTRAP_METHOD = "bootstrap over seeds and questions"
T_METHOD = "t over seeds"
_CHUNK = 500  # resamples per vectorised block: bounds memory at ~chunk x questions counts


@dataclasses.dataclass(frozen=True)
class Interval:
    """A mean with its interval at `level`; low/high are None where the interval is undefined (one
    seed, t)."""

    mean: float
    low: float | None
    high: float | None
    method: str
    level: float = LEVEL

    def scaled(self, factor: float) -> "Interval":
        low, high = (None, None) if self.low is None else (self.low * factor, self.high * factor)
        return dataclasses.replace(self, mean=self.mean * factor, low=low, high=high)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def t_interval(values: Sequence[float], level: float = LEVEL) -> Interval:
    """Student t interval for the mean of `values`: mean ± t_{(1+level)/2, n-1} · sd / √n."""
    x = np.asarray(values, dtype=np.float64)
    mean = float(x.mean())
    if x.size < 2:
        return Interval(mean, None, None, T_METHOD, level)
    half = scipy_stats.t.ppf((1 + level) / 2, x.size - 1) * x.std(ddof=1) / np.sqrt(x.size)
    return Interval(mean, float(mean - half), float(mean + half), T_METHOD, level)


def _paired(correct_a, correct_b) -> np.ndarray:
    a = np.asarray(correct_a, dtype=np.float64)
    b = np.asarray(correct_b, dtype=np.float64)
    if a.ndim != 2 or a.shape != b.shape or a.size == 0:
        raise ValueError(f"paired correctness arrays must have one non-empty shape [seeds, questions], "
                         f"got {a.shape} and {b.shape}")
    return a - b


def paired_t_interval(correct_a, correct_b, level: float = LEVEL) -> Interval:
    """t interval over seeds of acc_A - acc_B, each seed's accuracy the mean over its questions."""
    return t_interval(_paired(correct_a, correct_b).mean(axis=1), level)


POWER = 0.8


def detectable_difference(values: Sequence[float], level: float = LEVEL, power: float = POWER) -> float | None:
    """The smallest true mean difference that the paired t test over these per-seed differences would
    declare at `level` with probability `power`, given their spread:
    (t_{(1+level)/2, n-1} + t_{power, n-1}) · sd / √n (the usual approximation, central t for both).
    What a "no difference" can rule out; None with fewer than two seeds."""
    x = np.asarray(values, dtype=np.float64)
    if x.size < 2:
        return None
    quantiles = scipy_stats.t.ppf((1 + level) / 2, x.size - 1) + scipy_stats.t.ppf(power, x.size - 1)
    return float(quantiles * x.std(ddof=1) / np.sqrt(x.size))


def paired_detectable_difference(correct_a, correct_b, level: float = LEVEL, power: float = POWER) -> float | None:
    """detectable_difference of the per-seed accuracy differences acc_A - acc_B."""
    return detectable_difference(_paired(correct_a, correct_b).mean(axis=1), level, power)


def _resample_counts(rng: np.random.Generator, n: int, rows: int) -> np.ndarray:
    """[rows, n]: how often each of n items is drawn in each row of n draws with replacement."""
    draws = rng.integers(0, n, size=(rows, n)) + n * np.arange(rows)[:, None]
    return np.bincount(draws.ravel(), minlength=rows * n).reshape(rows, n)


def bootstrap_differences(correct_a, correct_b, resamples: int = BOOTSTRAP_RESAMPLES,
                          seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """[resamples] bootstrap replicates of the mean difference (seeds and questions drawn as above)."""
    diff = _paired(correct_a, correct_b)
    num_seeds, num_questions = diff.shape
    rng = np.random.default_rng(seed)
    out = []
    for start in range(0, resamples, _CHUNK):
        rows = min(_CHUNK, resamples - start)
        seed_counts = _resample_counts(rng, num_seeds, rows)
        question_counts = _resample_counts(rng, num_questions, rows)
        # sum over drawn seeds s and drawn questions q of diff[s, q], by multiplicities
        totals = ((seed_counts @ diff) * question_counts).sum(axis=1)
        out.append(totals / (num_seeds * num_questions))
    return np.concatenate(out)


def paired_bootstrap_interval(correct_a, correct_b, resamples: int = BOOTSTRAP_RESAMPLES,
                              seed: int = BOOTSTRAP_SEED, level: float = LEVEL) -> Interval:
    """Percentile interval of the hierarchical bootstrap; the mean is the observed mean difference."""
    replicates = bootstrap_differences(correct_a, correct_b, resamples, seed)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(replicates, [tail, 100 - tail])
    return Interval(float(_paired(correct_a, correct_b).mean()), float(low), float(high), BOOTSTRAP_METHOD, level)


# -- verdicts ---------------------------------------------------------------------------------------

def pair_verdict(a: str, b: str, interval: Interval) -> str:
    """'a > b' or 'a < b' when the interval of a - b excludes zero, 'no difference' when it contains
    zero, 'undetermined' when there is no interval (a t interval from one seed)."""
    if interval.low is None:
        return "undetermined"
    if interval.low > 0:
        return f"{a} > {b}"
    if interval.high < 0:
        return f"{a} < {b}"
    return "no difference"


def level_name(level: float) -> str:
    """'95%', '97.5%'."""
    return f"{100 * level:g}%"


def describe(interval: Interval, unit: str = "points", digits: int = 1) -> str:
    """'+3.0 points, 95% CI [0.5, 6.1]' (at the interval's level)."""
    if interval.low is None:
        return f"{interval.mean:+.{digits}f} {unit}, no interval (one seed)"
    return (f"{interval.mean:+.{digits}f} {unit}, {level_name(interval.level)} CI "
            f"[{interval.low:+.{digits}f}, {interval.high:+.{digits}f}]")


def ordering_verdict(chain: Sequence[str], intervals: Mapping[tuple[str, str], Interval],
                     unit: str = "points", digits: int = 1) -> tuple[bool, str]:
    """Whether chain[0] > chain[1] > ... holds: each adjacent difference's interval lies above zero.

    `intervals[(a, b)]` is the interval of a - b for each adjacent pair. A difference whose interval
    contains zero is reported as "no difference"; one below zero as the reverse ordering.
    """
    claim = " > ".join(chain)
    parts, holds = [], True
    for a, b in zip(chain, chain[1:]):
        interval = intervals[(a, b)]
        verdict = pair_verdict(a, b, interval)
        holds = holds and verdict == f"{a} > {b}"
        where = {f"{a} > {b}": " above zero", f"{a} < {b}": " below zero", "no difference": " contains zero"}
        label = f"{verdict}:" if verdict in (f"{a} > {b}", f"{a} < {b}") else f"{a} vs {b}: {verdict},"
        parts.append(f"{label} {describe(interval, unit, digits)}{where.get(verdict, '')}")
    return holds, f"Ordering {claim}: {'holds' if holds else 'does not hold'}. " + "; ".join(parts) + "."
