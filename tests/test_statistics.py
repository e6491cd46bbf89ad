"""The statistics layer against cases computed by hand or by scipy; each check is also shown to
reject a plausibly broken implementation."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from experiments.core import statistics
from experiments.core.statistics import (
    TIE_BREAK_RULE,
    Interval,
    PairedTest,
    SeedSummary,
    accuracy_interval,
    auroc,
    bootstrap_interval,
    mcnemar_exact,
    one_image_worth,
    seed_summary,
    seeds_paired_test,
    tie_set,
    versus_reference,
    widen,
)

Z = stats.norm.ppf(0.975)


def _wilson_by_hand(k: int, n: int) -> tuple[float, float]:
    """The Wilson score interval, written out: (p + z²/2n ± z sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)."""
    p = k / n
    centre = p + Z**2 / (2 * n)
    spread = Z * math.sqrt(p * (1 - p) / n + Z**2 / (4 * n**2))
    return (centre - spread) / (1 + Z**2 / n), (centre + spread) / (1 + Z**2 / n)


def check_wilson(fn) -> None:
    """`fn(correct, total)` gives the Wilson interval of hand-computed cases."""
    for k, n in ((57, 100), (591, 600), (3420, 6000)):
        interval = fn(k, n)
        low, high = _wilson_by_hand(k, n)
        assert interval.estimate == pytest.approx(k / n, abs=1e-12)
        assert interval.low == pytest.approx(low, abs=1e-9), (k, n)
        assert interval.high == pytest.approx(high, abs=1e-9), (k, n)
        assert interval.n == n
    # 57/100 by hand: p = 0.57, z = 1.95996 -> [0.4722, 0.6627]
    assert fn(57, 100).format() == "0.5700 [0.4722, 0.6627]"


def _wald(correct: int, total: int, level: float = 0.95) -> Interval:
    """A broken interval: the normal (Wald) approximation instead of Wilson."""
    p = correct / total
    half = Z * math.sqrt(p * (1 - p) / total)
    return Interval(p, p - half, p + half, total, level)


def _clopper_pearson(correct: int, total: int, level: float = 0.95) -> Interval:
    """A broken interval: the exact (Clopper-Pearson) interval instead of Wilson."""
    ci = stats.binomtest(correct, total).proportion_ci(confidence_level=level, method="exact")
    return Interval(correct / total, ci.low, ci.high, total, level)


def test_accuracy_interval_is_wilsons():
    check_wilson(accuracy_interval)


@pytest.mark.parametrize("broken", [_wald, _clopper_pearson])
def test_the_wilson_check_rejects_a_broken_interval(broken):
    with pytest.raises(AssertionError):
        check_wilson(broken)


def test_the_interval_shrinks_as_one_over_the_square_root_of_the_images():
    small, large = accuracy_interval(342, 600), accuracy_interval(3420, 6000)
    assert small.half_width / large.half_width == pytest.approx(math.sqrt(10), rel=0.01)
    # near 1 the Wilson interval is skewed on few images, so the ratio is only close
    small, large = accuracy_interval(591, 600), accuracy_interval(5910, 6000)
    assert small.half_width / large.half_width == pytest.approx(math.sqrt(10), rel=0.05)
    # 0.57 on 6,000 images: about 1.25 points either side
    assert accuracy_interval(3420, 6000).half_width == pytest.approx(0.0125, abs=0.0003)
    assert small.low <= small.estimate <= small.high


def test_accuracy_interval_refuses_impossible_counts():
    for correct, total in ((1, 0), (-1, 10), (11, 10)):
        with pytest.raises(ValueError):
            accuracy_interval(correct, total)


def test_bootstrap_interval_agrees_with_wilson_on_a_mean_and_is_reproducible():
    correct = np.zeros(600)
    correct[:591] = 1.0
    interval = bootstrap_interval(correct, seed=3)
    wilson = accuracy_interval(591, 600)
    assert interval.estimate == pytest.approx(591 / 600)
    assert interval.n == 600
    assert interval.low == pytest.approx(wilson.low, abs=0.004)
    assert interval.high == pytest.approx(wilson.high, abs=0.004)
    assert bootstrap_interval(correct, seed=3) == interval


def test_bootstrap_interval_resamples_labels_and_scores_together():
    rng = np.random.default_rng(0)
    labels = rng.random(300) < 0.5
    scores = rng.random(300) + 0.4 * labels
    interval = bootstrap_interval((labels, scores), auroc, n_resamples=500)
    assert interval.estimate == pytest.approx(auroc(labels, scores))
    assert interval.low < interval.estimate < interval.high
    expected = stats.bootstrap(
        (labels, scores),
        auroc,
        n_resamples=500,
        paired=True,
        method="percentile",
        rng=np.random.default_rng(0),
    ).confidence_interval
    assert (interval.low, interval.high) == pytest.approx((expected.low, expected.high))


def test_auroc_is_the_probability_a_positive_outscores_a_negative():
    labels = np.array([0, 0, 1, 1, 0, 1], dtype=bool)
    scores = np.array([0.1, 0.4, 0.35, 0.8, 0.5, 0.5])
    # positives 0.35, 0.8, 0.5 against negatives 0.1, 0.4, 0.5: 0.35 beats one, 0.8 beats
    # three, 0.5 beats two and ties one (a half): 6.5 of 9 pairs
    pairs = [(p > q) + 0.5 * (p == q) for p in scores[labels] for q in scores[~labels]]
    assert auroc(labels, scores) == pytest.approx(sum(pairs) / 9) == pytest.approx(6.5 / 9)


def _paired(n01: int, n10: int, both: int = 80, neither: int = 8) -> tuple[np.ndarray, ...]:
    """Per-image correctness of a and b with the given discordant counts."""
    a = np.array([False] * n01 + [True] * n10 + [True] * both + [False] * neither)
    b = np.array([True] * n01 + [False] * n10 + [True] * both + [False] * neither)
    return a, b


def check_mcnemar(fn) -> None:
    """`fn(a_correct, b_correct)` gives the exact McNemar test of hand-computed cases."""
    # n01 = 10, n10 = 2: p = 2 * (C(12,0) + C(12,1) + C(12,2)) / 2**12 = 158 / 4096
    a, b = _paired(n01=10, n10=2)
    result = fn(a, b)
    assert result.p_value == pytest.approx(158 / 4096, abs=1e-12)
    assert (result.n01, result.n10, result.n) == (10, 2, 100)
    assert result.difference == pytest.approx(-8 / 100)
    assert result.verdict == "worse"
    assert result.low < result.difference < result.high
    swapped = fn(b, a)
    assert swapped.p_value == pytest.approx(158 / 4096, abs=1e-12)
    assert swapped.verdict == "better"
    # n01 = 3, n10 = 7: p = 2 * (1 + 10 + 45 + 120) / 1024 = 0.34375
    result = fn(*_paired(n01=3, n10=7))
    assert result.p_value == pytest.approx(352 / 1024, abs=1e-12)
    assert result.verdict == "no detectable difference"
    result = fn(*_paired(n01=0, n10=0))
    assert result.p_value == 1.0
    assert result.verdict == "no detectable difference"
    assert result.difference == result.low == result.high == 0.0


def _one_sided(a_correct, b_correct) -> PairedTest:
    """A broken test: the one-sided p-value (half the two-sided one)."""
    real = mcnemar_exact(a_correct, b_correct)
    n01, n10 = real.n01, real.n10
    p = (
        stats.binomtest(min(n01, n10), n01 + n10, 0.5, alternative="less").pvalue
        if n01 + n10
        else 1
    )
    verdict = statistics._verdict(real.difference, p, 0.05)
    return PairedTest(real.difference, real.low, real.high, p, verdict, real.n, "", n01, n10)


def _chi_square(a_correct, b_correct) -> PairedTest:
    """A broken test: McNemar's chi-square approximation instead of the exact binomial."""
    real = mcnemar_exact(a_correct, b_correct)
    n01, n10 = real.n01, real.n10
    p = stats.chi2.sf((n01 - n10) ** 2 / (n01 + n10), 1) if n01 + n10 else 1.0
    verdict = statistics._verdict(real.difference, p, 0.05)
    return PairedTest(real.difference, real.low, real.high, p, verdict, real.n, "", n01, n10)


def _swapped_counts(a_correct, b_correct) -> PairedTest:
    """A broken test: a's and b's discordant counts confused, so the verdict points backwards."""
    return mcnemar_exact(b_correct, a_correct)


def test_mcnemar_exact_matches_hand_computed_cases():
    check_mcnemar(mcnemar_exact)


@pytest.mark.parametrize("broken", [_one_sided, _chi_square, _swapped_counts])
def test_the_mcnemar_check_rejects_a_broken_test(broken):
    with pytest.raises(AssertionError):
        check_mcnemar(broken)


def test_mcnemar_interval_is_a_paired_bootstrap_of_the_difference():
    a, b = _paired(n01=10, n10=2)
    result = mcnemar_exact(a, b, seed=5)
    expected = stats.bootstrap(
        (a.astype(float) - b.astype(float),),
        np.mean,
        n_resamples=2000,
        method="percentile",
        rng=np.random.default_rng(5),
    ).confidence_interval
    # resampling images in pairs is resampling the per-image differences
    assert result.low == pytest.approx(expected.low, abs=0.02)
    assert result.high == pytest.approx(expected.high, abs=0.02)
    assert mcnemar_exact(a, b, seed=5) == result
    assert result.format().endswith("p = 0.03857: worse")


def test_mcnemar_refuses_arrays_of_different_lengths():
    with pytest.raises(ValueError):
        mcnemar_exact(np.ones(3, bool), np.ones(4, bool))


def test_seeds_paired_test_is_scipys_t_test():
    a, b = [0.9805, 0.9858, 0.9840], [0.9790, 0.9801, 0.9835]
    result = seeds_paired_test(a, b)
    expected = stats.ttest_rel(a, b)
    assert result.p_value == pytest.approx(expected.pvalue)
    assert (result.low, result.high) == pytest.approx(tuple(expected.confidence_interval()))
    assert result.difference == pytest.approx(np.mean(a) - np.mean(b))
    assert result.n == 3 and result.n_b is None and "paired" in result.method
    assert result.verdict == "no detectable difference"  # p = 0.23 by scipy
    welch = seeds_paired_test(a, b[:2])
    expected = stats.ttest_ind(a, b[:2], equal_var=False)
    assert welch.p_value == pytest.approx(expected.pvalue) and welch.n_b == 2
    assert "Welch" in welch.method


def test_seeds_paired_test_gives_verdicts_and_needs_two_seeds():
    assert seeds_paired_test([0.99, 0.991, 0.989], [0.95, 0.953, 0.951]).verdict == "better"
    assert seeds_paired_test([0.95, 0.953, 0.951], [0.99, 0.991, 0.989]).verdict == "worse"
    same = seeds_paired_test([0.98, 0.99], [0.98, 0.99])
    assert same.p_value == 1.0 and same.verdict == "no detectable difference"
    with pytest.raises(ValueError):
        seeds_paired_test([0.98], [0.97, 0.96])


def check_seed_summary(fn) -> None:
    """`fn(values)` gives the mean and the sample sd (ddof=1) as numpy computes them."""
    values = [0.9805, 0.9858, 0.9840]
    summary = fn(values)
    assert summary.mean == pytest.approx(np.mean(values), abs=1e-12)
    # by hand: deviations -0.00293, 0.00237, 0.00057; sum of squares / (3 - 1)
    deviations = np.asarray(values) - sum(values) / 3
    assert summary.sd == pytest.approx(math.sqrt((deviations**2).sum() / 2), abs=1e-12)
    assert summary.sd == pytest.approx(np.std(values, ddof=1), abs=1e-12)
    assert summary.n == 3 and summary.values == tuple(values)
    assert summary.format() == "0.9834 ± 0.0027 (3 seeds)"
    single = fn([0.9861])
    assert single.sd is None and single.n == 1
    assert single.format() == "0.9861 (1 seed)"


def _population_sd(values) -> SeedSummary:
    """A broken summary: the population sd (ddof=0)."""
    array = np.asarray(values, dtype=float)
    sd = float(np.std(array)) if array.size > 1 else None
    return SeedSummary(float(array.mean()), sd, array.size, tuple(values))


def _nan_for_one_seed(values) -> SeedSummary:
    """A broken summary: numpy's nan (and a warning) for a single seed's sd."""
    array = np.asarray(values, dtype=float)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        sd = float(np.std(array, ddof=1))
    return SeedSummary(float(array.mean()), sd, array.size, tuple(values))


def test_seed_summary_matches_numpy():
    check_seed_summary(seed_summary)


@pytest.mark.parametrize("broken", [_population_sd, _nan_for_one_seed])
def test_the_seed_summary_check_rejects_a_broken_summary(broken):
    with pytest.raises(AssertionError):
        check_seed_summary(broken)


def test_seed_summary_refuses_no_seed_or_a_missing_value():
    for values in ([], [0.98, float("nan")]):
        with pytest.raises(ValueError):
            seed_summary(values)


def _candidates() -> pd.DataFrame:
    """Task 2-like candidates on 600 selection images (the best's Wilson low is 0.9855)."""
    return pd.DataFrame(
        {
            "name": ["vgg", "resnet", "hybrid", "ensemble", "efficientnet", "tiny"],
            "select_acc": [0.9950, 0.9917, 0.9900, 0.9900, 0.9867, 0.9700],
            "select_n": [600] * 6,
            "members": [1, 1, 1, 3, 1, 1],
            "params": [900_000, 200_000, 150_000, 1_050_000, 150_000, 10_000],
        }
    )


def test_tie_set_holds_the_candidates_inside_the_best_interval_in_tie_break_order():
    tied = tie_set(_candidates())
    best_low = accuracy_interval(597, 600).low
    assert best_low == pytest.approx(0.98543, abs=1e-4)
    # efficientnet (0.9867) and the others are inside; tiny (0.97) is not
    assert tied["name"].to_list() == ["ensemble", "efficientnet", "hybrid", "resnet", "vgg"]
    assert (tied["select_acc"] >= best_low).all()
    assert tied.loc[0, "select_acc_low"] == pytest.approx(accuracy_interval(594, 600).low)
    assert "more members" in TIE_BREAK_RULE and "parameters" in TIE_BREAK_RULE


def test_tie_set_is_the_best_alone_when_selection_can_tell_the_rest_apart():
    frame = _candidates().assign(select_n=60_000)
    assert tie_set(frame)["name"].to_list() == ["vgg"]


def test_tie_set_breaks_equal_members_and_params_by_name():
    frame = _candidates().assign(members=1, params=1)
    assert tie_set(frame)["name"].to_list() == [
        "efficientnet",
        "ensemble",
        "hybrid",
        "resnet",
        "vgg",
    ]


@pytest.mark.parametrize("column", ["test2_acc", "TEST_acc", "acc_TEST2", "eval_acc", "Evaluated"])
def test_tie_set_reads_no_evaluation_label(column):
    frame = _candidates().assign(**{column: [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]})
    with pytest.raises(ValueError, match=column):
        tie_set(frame)
    # the same candidates without the column give a ranking that no evaluation number moved
    assert tie_set(_candidates())["name"].iloc[0] == "ensemble"


def test_tie_set_names_a_missing_tie_break_column():
    with pytest.raises(ValueError, match="params"):
        tie_set(_candidates().drop(columns="params"))


def test_versus_reference_marks_noise_above_and_below():
    interval = accuracy_interval(3378, 6000)  # 0.563 [0.5504, 0.5755]
    assert versus_reference(interval, 0.57) == "within noise"
    assert versus_reference(interval, 0.59) == "below"
    assert versus_reference(interval, 0.54) == "above"
    # the noise on a side: ours, the reference's own binomial half-width and the seeds', in
    # quadrature, plus half a unit of its last digit; 0.59 is 0.027 above 0.563
    side = interval.high - interval.estimate
    theirs = Z * math.sqrt(0.59 * 0.41 / 6000)
    assert math.hypot(side, theirs) + 0.005 < 0.027  # images alone: below
    assert versus_reference(interval, 0.59, seed_sd=0.015) == "within noise"
    assert versus_reference(interval, 0.59, seed_sd=0.005) == "below"
    # a reference printed to 2 digits stands for +-0.005 of rounding: 0.020 away is outside
    # both noises in quadrature but inside once the rounding is added
    assert math.hypot(side, Z * math.sqrt(0.583 * 0.417 / 6000)) < 0.020 < 0.0226
    assert versus_reference(interval, 0.583) == "within noise"
    assert versus_reference(interval, 0.583, reference_digits=3) == "below"
    widened = widen(interval, 0.015)
    assert widened.high - widened.estimate == pytest.approx(math.hypot(side, Z * 0.015))
    # with a seed count: Student's t times sqrt(1 + 1/k), where one more run may land
    k = 3
    multiplier = stats.t.ppf(0.975, k - 1) * math.sqrt(1 + 1 / k)
    widened = widen(interval, 0.015, n_seeds=k)
    assert widened.high - widened.estimate == pytest.approx(math.hypot(side, multiplier * 0.015))
    assert widen(accuracy_interval(5994, 6000), 0.003).high == 1.0  # clipped to [0, 1]
    assert widen(interval, None) == interval
    with pytest.raises(ValueError):
        versus_reference(interval, float("nan"))


def test_one_image_is_worth_one_over_the_set_size():
    assert one_image_worth(600) == pytest.approx(0.001667, abs=1e-6)
    with pytest.raises(ValueError):
        one_image_worth(0)


def test_auroc_scores_many_resamples_at_once_as_sklearn_scores_each():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(1)
    labels = rng.random((5, 40)) < 0.4
    scores = np.round(rng.random((5, 40)) + 0.3 * labels, 1)  # rounded: ties in every row
    labels[4] = True  # one class only: no area
    rows = auroc(labels, scores)
    assert rows.shape == (5,) and np.isnan(rows[4])
    expected = [roc_auc_score(labels[i], scores[i]) for i in range(4)]
    assert rows[:4] == pytest.approx(expected)
