"""dpost.stats on hand-computed numbers: the paired t interval, the paired hierarchical bootstrap
(degenerate cases with known answers, a binomial case against its normal approximation, pairing),
and the verdicts' wording."""

from __future__ import annotations

import numpy as np
import pytest

from dpost import stats

T_975_4 = 2.7764451  # Student t quantile t_{0.975, 4} (tables)


def correctness(accuracies, questions=10):
    """[seeds, questions] 0/1 array whose rows have the given accuracies (first questions correct)."""
    rows = np.zeros((len(accuracies), questions), dtype=np.int8)
    for i, acc in enumerate(accuracies):
        rows[i, : round(acc * questions)] = 1
    return rows


def test_paired_t_interval_by_hand():
    a = correctness([0.6, 0.5, 0.7, 0.6, 0.8])
    b = correctness([0.5, 0.5, 0.4, 0.6, 0.5])
    # differences 0.1, 0.0, 0.3, 0.0, 0.3: mean 0.14; squared deviations .0016 + .0196 + .0256 + .0196
    # + .0256 = .092, sample variance .092 / 4 = .023; half width t_{0.975,4} * sqrt(.023 / 5)
    half = T_975_4 * np.sqrt(0.023 / 5)  # = 0.18831
    interval = stats.paired_t_interval(a, b)
    assert interval.mean == pytest.approx(0.14)
    assert interval.low == pytest.approx(0.14 - half, abs=1e-6)
    assert interval.high == pytest.approx(0.14 + half, abs=1e-6)
    assert interval.low < 0 < interval.high
    assert stats.pair_verdict("a", "b", interval) == "no difference"


T_80_4 = 0.9409646  # Student t quantile t_{0.80, 4} (tables)


def test_detectable_difference_by_hand():
    a = correctness([0.6, 0.5, 0.7, 0.6, 0.8])
    b = correctness([0.5, 0.5, 0.4, 0.6, 0.5])
    # per-seed differences as above: sd sqrt(.023); (t_{0.975,4} + t_{0.80,4}) * sqrt(.023 / 5) = 0.25213
    assert stats.paired_detectable_difference(a, b) == pytest.approx((T_975_4 + T_80_4) * np.sqrt(0.023 / 5))
    assert stats.detectable_difference([0.1, 0.0, 0.3, 0.0, 0.3]) == pytest.approx(0.25213, abs=1e-5)
    # a higher level or power asks for a larger difference; one seed has none
    assert stats.detectable_difference([0.1, 0.0, 0.3, 0.0, 0.3], level=0.975) > 0.25213
    assert stats.detectable_difference([0.1, 0.0, 0.3, 0.0, 0.3], power=0.9) > 0.25213
    assert stats.detectable_difference([0.1]) is None


def test_t_interval_of_one_seed_is_undefined():
    interval = stats.paired_t_interval(correctness([0.6]), correctness([0.2]))
    assert interval.mean == pytest.approx(0.4)
    assert interval.low is None and interval.high is None
    assert stats.pair_verdict("a", "b", interval) == "undetermined"


def test_bootstrap_of_identical_methods_is_zero():
    rng = np.random.default_rng(3)
    a = (rng.random((3, 50)) < 0.4).astype(np.int8)
    interval = stats.paired_bootstrap_interval(a, a.copy())
    assert (interval.mean, interval.low, interval.high) == (0.0, 0.0, 0.0)


def test_bootstrap_of_constant_difference_is_that_constant():
    a, b = np.ones((4, 30)), np.zeros((4, 30))  # A right and B wrong on every question of every seed
    interval = stats.paired_bootstrap_interval(a, b)
    assert (interval.mean, interval.low, interval.high) == (1.0, 1.0, 1.0)
    assert stats.pair_verdict("a", "b", interval) == "a > b"


def test_bootstrap_resamples_seeds():
    # Seed 0: no difference on any question, seed 1: A better on every question. Questions then do not
    # matter and a resample's mean is 0, 1/2 or 1 (seeds drawn {0,0}, {0,1} or {1,0}, {1,1}) with
    # probabilities 1/4, 1/2, 1/4, so the 2.5% and 97.5% percentiles are exactly 0 and 1.
    a = np.array([[0] * 20, [1] * 20])
    b = np.zeros((2, 20))
    replicates = stats.bootstrap_differences(a, b)
    assert replicates.shape == (stats.BOOTSTRAP_RESAMPLES,)
    for value, probability in ((0.0, 0.25), (0.5, 0.5), (1.0, 0.25)):
        assert np.mean(replicates == value) == pytest.approx(probability, abs=0.02)
    interval = stats.paired_bootstrap_interval(a, b)
    assert (interval.mean, interval.low, interval.high) == (0.5, 0.0, 1.0)
    assert stats.pair_verdict("a", "b", interval) == "no difference"


def test_bootstrap_resamples_questions_like_the_binomial():
    # One seed; A - B is 1 on 100 of 400 questions, 0 elsewhere. A resample's mean is k/400 with k
    # binomial(400, 1/4): mean 0.25, sd sqrt(.25 * .75 / 400) = 0.02165, so the 95% interval is close
    # to 0.25 ± 1.96 * 0.02165 = [0.2076, 0.2924] and excludes zero.
    a = np.array([[1] * 100 + [0] * 300])
    b = np.zeros((1, 400))
    interval = stats.paired_bootstrap_interval(a, b)
    assert interval.mean == 0.25
    assert interval.low == pytest.approx(0.2076, abs=0.006)
    assert interval.high == pytest.approx(0.2924, abs=0.006)
    assert stats.pair_verdict("a", "b", interval) == "a > b"


def test_bootstrap_interval_contains_zero_for_opposite_wins():
    # On each of 3 seeds A wins the same 50 questions, B another 50, 100 ties. The seeds share one test
    # set, so a resample's mean is the mean of A - B over 200 drawn questions (in {-1, 0, 1}, variance
    # 0.5): sd sqrt(0.5 / 200) = 0.05, interval about ± 1.96 * 0.05 = ± 0.098, straddling zero.
    # (Drawing questions independently per seed would wrongly shrink it to about ± 0.057.)
    row = np.array([1] * 50 + [0] * 50 + [1] * 50 + [0] * 50)
    other = np.array([0] * 50 + [1] * 50 + [1] * 50 + [0] * 50)
    interval = stats.paired_bootstrap_interval(np.tile(row, (3, 1)), np.tile(other, (3, 1)))
    assert interval.mean == 0.0
    assert interval.low == pytest.approx(-0.098, abs=0.012)
    assert interval.high == pytest.approx(0.098, abs=0.012)
    assert stats.pair_verdict("a", "b", interval) == "no difference"


def test_bootstrap_is_paired_by_question():
    # A solves what B solves plus 10 more of 200 questions: A - B is 1 on 10 questions, 0 elsewhere,
    # so the paired interval is about 0.05 ± 1.96 * sqrt(.05 * .95 / 200) = [0.020, 0.080]. Resampling
    # the two methods' questions independently would give about ± 0.098 around 0.05, containing zero.
    b = np.array([[1] * 90 + [0] * 110])
    a = b.copy()
    a[0, 90:100] = 1
    interval = stats.paired_bootstrap_interval(a, b)
    assert interval.mean == pytest.approx(0.05)
    assert interval.low == pytest.approx(0.020, abs=0.006)
    assert interval.high == pytest.approx(0.080, abs=0.006)


def test_bootstrap_is_reproducible_with_its_fixed_seed():
    rng = np.random.default_rng(7)
    a, b = (rng.random((3, 60)) < 0.5), (rng.random((3, 60)) < 0.4)
    first, again = stats.paired_bootstrap_interval(a, b), stats.paired_bootstrap_interval(a, b)
    assert first == again
    other = stats.bootstrap_differences(a, b, seed=stats.BOOTSTRAP_SEED + 1)
    assert not np.array_equal(stats.bootstrap_differences(a, b), other)
    assert stats.bootstrap_differences(a, b, resamples=1234).shape == (1234,)  # not a whole number of blocks


def test_mismatched_shapes_are_refused():
    with pytest.raises(ValueError, match="shape"):
        stats.paired_bootstrap_interval(np.zeros((3, 10)), np.zeros((3, 11)))
    with pytest.raises(ValueError, match="shape"):
        stats.paired_t_interval(np.zeros(10), np.zeros(10))


def test_ordering_verdict_in_plain_words():
    interval = stats.Interval
    holds, text = stats.ordering_verdict(["dpo_st", "st", "sft"], {
        ("dpo_st", "st"): interval(-2.1, -8.0, 3.9, "bootstrap"), ("st", "sft"): interval(3.0, 0.5, 6.1, "bootstrap")})
    assert not holds
    assert text == ("Ordering dpo_st > st > sft: does not hold. "
                    "dpo_st vs st: no difference, -2.1 points, 95% CI [-8.0, +3.9] contains zero; "
                    "st > sft: +3.0 points, 95% CI [+0.5, +6.1] above zero.")
    holds, text = stats.ordering_verdict(["a", "b"], {("a", "b"): interval(4.0, 1.0, 7.0, "bootstrap")})
    assert holds and text == "Ordering a > b: holds. a > b: +4.0 points, 95% CI [+1.0, +7.0] above zero."
    holds, text = stats.ordering_verdict(["a", "b"], {("a", "b"): interval(-5.0, -9.0, -1.0, "bootstrap")})
    assert not holds and text == "Ordering a > b: does not hold. a < b: -5.0 points, 95% CI [-9.0, -1.0] below zero."
    holds, text = stats.ordering_verdict(["a", "b"], {("a", "b"): interval(-5.0, None, None, "t over seeds")})
    assert not holds
    assert text == "Ordering a > b: does not hold. a vs b: undetermined, -5.0 points, no interval (one seed)."
