"""stages.bootstrap: percentile bootstrap intervals over prompts (clusters) and training seeds.

Pure numpy, no models: the whole file runs in about a second.
"""

from __future__ import annotations

import numpy as np
import pytest

from stages.bootstrap import (
    Interval,
    as_scores,
    difference_interval,
    mean_interval,
    verdict,
    win_rate_interval,
)


def width(interval: Interval) -> float:
    return interval.high - interval.low


# --------------------------------------------------------------------------------------------------
# Known answers
# --------------------------------------------------------------------------------------------------
def test_interval_collapses_when_every_prompt_and_seed_has_the_same_mean():
    """Each (seed, prompt) holds a permutation of [0, 0.5, 1]: its mean is 0.5 whatever is drawn.

    A cluster resample of prompts (and of seeds) therefore gives 0.5 in every replicate, so
    low == high == estimate == 0.5 exactly (all sums are of multiples of 0.5, exact in binary).
    Resampling single samples instead of prompts would give replicates other than 0.5 and fail this.
    """
    rng = np.random.default_rng(7)
    scores = np.stack([np.stack([rng.permutation([0.0, 0.5, 1.0]) for _ in range(6)]) for _ in range(2)])
    assert scores.shape == (2, 6, 3)
    interval = mean_interval(scores, resamples=500)
    assert interval.estimate == interval.low == interval.high == 0.5


def test_large_sample_interval_matches_the_normal_approximation():
    """P = 2000, K = 1, scores ~ N(0.3, 1): the mean's standard error is 1 / sqrt(2000) = 0.02236.

    The 95% percentile interval then spans about 2 * 1.96 * 0.02236 = 0.0877 and, with this fixed
    numpy seed, contains the true mean 0.3.
    """
    scores = np.random.default_rng(1234).normal(0.3, 1.0, size=(1, 2000, 1))
    interval = mean_interval(scores)
    assert interval.low < 0.3 < interval.high
    assert width(interval) == pytest.approx(2 * 1.96 / np.sqrt(2000), rel=0.15)
    assert interval.estimate == pytest.approx(scores.mean(), abs=0)


def test_paired_prompt_resampling_cancels_the_prompts_difficulty():
    """b = a + 0.1 + noise(std 0.001), with per-prompt levels that vary with std 1 across P = 400 prompts.

    Each policy's own mean interval is about 2 * 1.96 * 1 / sqrt(400) = 0.196 wide (> 0.1), and an
    unpaired bootstrap of the difference would be sqrt(2) times that, 0.28. Paired, the prompt levels
    cancel: what is left is the noise, 2 * 1.96 * 0.001 / sqrt(400 * 2) ~ 0.00014 wide (< 0.05),
    around 0.1 and clear of zero.
    """
    rng = np.random.default_rng(3)
    prompts = rng.normal(0.0, 1.0, size=(1, 400, 1))
    a = prompts + rng.normal(0.0, 0.1, size=(1, 400, 2))
    b = a + 0.1 + rng.normal(0.0, 0.001, size=a.shape)
    difference = difference_interval(b, a)
    assert width(difference) < 0.05
    assert difference.low < 0.1 < difference.high
    assert difference.excludes_zero()
    assert difference.estimate == pytest.approx(b.mean() - a.mean(), abs=1e-12)
    assert width(mean_interval(a)) > 0.1
    assert width(mean_interval(b)) > 0.1


def test_a_policy_against_itself_gives_exactly_zero_when_paired():
    """a - a with S = 1: every replicate draws the same prompts for both sides, so every replicate is 0."""
    a = np.random.default_rng(5).normal(size=(1, 50, 3))
    assert difference_interval(a, a, resamples=200).to_dict() == {"estimate": 0.0, "ci95": [0.0, 0.0]}


def test_copies_of_a_sample_add_no_information():
    """K = 4 identical copies of each prompt's score against K = 1: the same data, four times over.

    The prompt draws (same seed, same P) are identical and a cluster of copies has the copy's value as
    its mean, so the replicates and the width are the same (ratio 1, asserted within 0.9 .. 1.1).
    An i.i.d. bootstrap over the 4 * P samples would halve the width (ratio 1 / sqrt(4) = 0.5).
    """
    single = np.random.default_rng(11).normal(0.0, 1.0, size=(1, 300, 1))
    copies = np.repeat(single, 4, axis=2)
    ratio = width(mean_interval(copies, seed=2)) / width(mean_interval(single, seed=2))
    assert 0.9 < ratio < 1.1


def test_training_seeds_whose_levels_differ_widen_the_interval():
    """S = 3 training runs on the same samples, offset by -0.2, 0, +0.2, against the same runs without offsets.

    Without offsets the three seeds are identical, so resampling them changes nothing: the width is
    the prompts' alone, 2 * 1.96 * (1 / sqrt(2)) / sqrt(200) ~ 0.196 (K = 2 samples of std 1 per
    prompt). With offsets, the mean of 3 seeds drawn with replacement has its own spread,
    std = 0.163 / sqrt(3) = 0.094 (0.163 is the population std of the offsets), adding about
    2 * 1.96 * 0.094 = 0.37: the total, about sqrt(0.196^2 + 0.37^2) = 0.42, is well over 1.5 times
    the width without offsets. Both estimates are equal: the offsets average to 0.
    """
    base = np.random.default_rng(13).normal(0.5, 1.0, size=(1, 200, 2))
    same = np.repeat(base, 3, axis=0)
    offset = same + np.array([-0.2, 0.0, 0.2])[:, None, None]
    plain, spread = mean_interval(same), mean_interval(offset)
    assert spread.estimate == pytest.approx(plain.estimate, abs=1e-12)
    assert width(spread) > 1.5 * width(plain)


def test_each_policy_s_seeds_are_resampled_independently_in_a_difference():
    """a against itself when a has 3 seeds at different levels (-0.2, 0, +0.2).

    Prompts are paired, so with the seed draws shared the difference would be 0 in every replicate;
    drawn independently (the two training campaigns are unrelated) the two seed means differ, and
    the interval has a width of about sqrt(2) * 2 * 1.96 * 0.094 = 0.52. The estimate stays 0.
    """
    base = np.random.default_rng(17).normal(size=(1, 100, 2))
    a = np.repeat(base, 3, axis=0) + np.array([-0.2, 0.0, 0.2])[:, None, None]
    difference = difference_interval(a, a)
    assert difference.estimate == 0.0
    assert width(difference) > 0.3


# --------------------------------------------------------------------------------------------------
# Win rate
# --------------------------------------------------------------------------------------------------
def test_win_rate_of_a_hand_made_example():
    """a = [1, 0, 0.5], b = [0, 0, 0.5] (P = 3, K = 1): a wins prompt 0, ties prompts 1 and 2.

    estimate = (1 + 0.5 + 0.5) / 3 = 2/3. A replicate draws 3 of the per-prompt values [1, 0.5, 0.5],
    so every replicate, hence every bound, lies in [0.5, 1].
    """
    a, b = np.array([1.0, 0.0, 0.5]).reshape(1, 3, 1), np.array([0.0, 0.0, 0.5]).reshape(1, 3, 1)
    interval = win_rate_interval(a, b, resamples=300)
    assert interval.estimate == pytest.approx(2 / 3)
    assert 0.5 <= interval.low <= interval.estimate <= interval.high <= 1.0


def test_win_rate_compares_every_pair_of_seeds():
    """a's seeds score [2] and [0], b's [1] and [3] (P = K = 1): of the 4 seed pairs only (2, 1) is a win.

    estimate = (1 + 0 + 0 + 0) / 4 = 1/4; comparing only matching seed indices, (2, 1) and (0, 3),
    would give 1/2. Against b's first seed alone the pairs are (2, 1) and (0, 1): (1 + 0) / 2 = 1/2.
    """
    a, b = np.array([2.0, 0.0]).reshape(2, 1, 1), np.array([1.0, 3.0]).reshape(2, 1, 1)
    assert win_rate_interval(a, b, resamples=100).estimate == 0.25
    assert win_rate_interval(a, b[:1], resamples=100).estimate == 0.5


def test_win_rate_is_one_when_a_is_always_above_b():
    """a ~ U(1, 2) and b ~ U(0, 1) (Sa = 2, Sb = 3, P = 200, K = 4): every comparison is a win.

    Every replicate is a count-weighted mean of ones, exactly 1, so the interval is [1, 1].
    """
    rng = np.random.default_rng(19)
    a, b = rng.uniform(1.0, 2.0, size=(2, 200, 4)), rng.uniform(0.0, 1.0, size=(3, 200, 4))
    interval = win_rate_interval(a, b)
    assert (interval.estimate, interval.low, interval.high) == (1.0, 1.0, 1.0)


def test_win_rates_of_a_over_b_and_b_over_a_sum_to_one_ties_included():
    """Scores on a 1..5 judge scale tie often; a tie counts 0.5 for each side, so win(a, b) + win(b, a) = 1.

    With S = 1 both calls draw the same prompts, replicate r of one is 1 minus replicate r of the
    other, and the (symmetric) percentiles mirror: low(b, a) = 1 - high(a, b).
    """
    rng = np.random.default_rng(23)
    a, b = rng.integers(1, 6, size=(1, 80, 3)), rng.integers(1, 6, size=(1, 80, 3))
    ab, ba = win_rate_interval(a, b), win_rate_interval(b, a)
    assert ab.estimate + ba.estimate == pytest.approx(1.0)
    assert ba.low == pytest.approx(1.0 - ab.high)
    assert ba.high == pytest.approx(1.0 - ab.low)


# --------------------------------------------------------------------------------------------------
# Input handling and refusals
# --------------------------------------------------------------------------------------------------
def test_as_scores_reshapes_flat_prompt_major_scores():
    """(N,) with N = P * K, prompt-major: [0..5] with K = 3 is prompt 0 = [0, 1, 2], prompt 1 = [3, 4, 5]."""
    flat = as_scores([0, 1, 2, 3, 4, 5], samples_per_prompt=3)
    assert flat.dtype == np.float64
    np.testing.assert_array_equal(flat, [[[0, 1, 2], [3, 4, 5]]])
    per_seed = as_scores(np.arange(12).reshape(2, 6), samples_per_prompt=2)
    assert per_seed.shape == (2, 3, 2)
    np.testing.assert_array_equal(per_seed[1, 0], [6, 7])
    cube = np.ones((2, 3, 4))
    np.testing.assert_array_equal(as_scores(cube, samples_per_prompt=4), cube)


def test_as_scores_refuses_a_count_that_is_not_a_multiple_of_samples_per_prompt():
    with pytest.raises(ValueError, match="samples_per_prompt"):
        as_scores(np.zeros(7), samples_per_prompt=3)
    with pytest.raises(ValueError, match="samples_per_prompt"):
        as_scores(np.zeros((2, 3, 4)), samples_per_prompt=3)
    with pytest.raises(ValueError, match="samples_per_prompt"):
        as_scores(np.zeros(6), samples_per_prompt=0)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_as_scores_refuses_non_finite_scores(bad):
    with pytest.raises(ValueError, match="non-finite"):
        as_scores([0.1, bad, 0.3, 0.4], samples_per_prompt=2)


def test_as_scores_refuses_empty_input_and_other_shapes():
    with pytest.raises(ValueError, match="empty"):
        as_scores([], samples_per_prompt=1)
    with pytest.raises(ValueError, match="shape"):
        as_scores(np.zeros((1, 2, 2, 2)), samples_per_prompt=2)


@pytest.mark.parametrize("function", [difference_interval, win_rate_interval])
def test_policies_on_different_samples_are_refused_naming_both_shapes(function):
    with pytest.raises(ValueError) as raised:
        function(np.zeros((1, 4, 2)), np.zeros((3, 5, 2)))
    assert "(1, 4, 2)" in str(raised.value) and "(3, 5, 2)" in str(raised.value)


def test_interval_functions_refuse_what_as_scores_would_refuse():
    with pytest.raises(ValueError, match=r"scores must have shape \(S, P, K\)"):
        mean_interval(np.zeros(10))
    with pytest.raises(ValueError, match="b contains 1 non-finite"):
        difference_interval(np.zeros((1, 2, 2)), np.array([[[0.0, np.nan], [0.0, 0.0]]]))


@pytest.mark.parametrize(("keyword", "value"), [("resamples", 99), ("resamples", 2.5), ("level", 0.0), ("level", 1.0)])
def test_a_too_small_budget_or_a_level_outside_0_1_is_refused(keyword, value):
    with pytest.raises(ValueError, match=keyword):
        mean_interval(np.zeros((1, 3, 1)), **{keyword: value})


# --------------------------------------------------------------------------------------------------
# Interval and verdict
# --------------------------------------------------------------------------------------------------
def test_interval_formats_and_serialises():
    interval = Interval(0.07, 0.03, 0.11)
    assert interval.format() == "0.070 [0.030, 0.110]"
    assert interval.format(digits=1) == "0.1 [0.0, 0.1]"
    assert interval.to_dict() == {"estimate": 0.07, "ci95": [0.03, 0.11]}
    assert interval.excludes_zero()
    assert Interval(-0.07, -0.11, -0.03).excludes_zero()
    assert not Interval(0.01, -0.02, 0.04).excludes_zero()
    assert not Interval(0.0, 0.0, 0.1).excludes_zero()  # a bound on zero does not exclude it
    with pytest.raises(ValueError, match="low"):
        Interval(0.0, 0.2, 0.1)


def test_verdict_sentences():
    assert verdict("dpo", "sft", Interval(0.07, 0.03, 0.11)) == "dpo ahead of sft by 0.070 [0.030, 0.110]"
    # Below zero: mean(sft) - mean(dpo) = 0.07 [0.03, 0.11] (negated, bounds swapped).
    assert verdict("dpo", "sft", Interval(-0.07, -0.11, -0.03)) == "sft ahead of dpo by 0.070 [0.030, 0.110]"
    assert verdict("dpo", "sft", Interval(0.01, -0.02, 0.04)) == (
        "no significant difference between dpo and sft at this budget (dpo - sft: 0.010 [-0.020, 0.040])"
    )


# --------------------------------------------------------------------------------------------------
# Determinism
# --------------------------------------------------------------------------------------------------
def test_same_seed_same_interval_other_seed_other_bounds():
    rng = np.random.default_rng(29)
    a, b = rng.normal(size=(3, 60, 2)), rng.normal(size=(2, 60, 2))
    for function, args in ((mean_interval, (a,)), (difference_interval, (a, b)), (win_rate_interval, (a, b))):
        first, again, other = function(*args, seed=4), function(*args, seed=4), function(*args, seed=5)
        assert first == again
        assert other.estimate == first.estimate
        assert (other.low, other.high) != (first.low, first.high)
