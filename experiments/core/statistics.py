"""Uncertainty for every reported number: intervals, paired tests, seed summaries, tie sets.

Pure functions on counts and arrays (numpy, scipy, pandas only); scipy does the statistics:

| question                          | function             | method                            |
|-----------------------------------|----------------------|-----------------------------------|
| accuracy on n images              | `accuracy_interval`  | Wilson score interval             |
| AUROC or another statistic        | `bootstrap_interval` | bootstrap over images             |
| model a vs b on the same images   | `mcnemar_exact`      | exact McNemar, paired bootstrap   |
| arm a vs arm b over seeds         | `seeds_paired_test`  | paired t-test (Welch if unpaired) |
| several seeds of one cell         | `seed_summary`       | mean ± sample sd                  |
| candidates selection cannot split | `tie_set`            | best candidate's Wilson interval  |
| a number vs the original study's  | `versus_reference`   | interval widened by the seed sd   |
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

LEVEL = 0.95  # every interval's confidence level
ALPHA = 0.05  # every test's significance level
N_RESAMPLES = 2000  # bootstrap resamples: percentile limits stable to about 0.1 points
BETTER, WORSE, NO_DIFFERENCE = "better", "worse", "no detectable difference"
WITHIN_NOISE, ABOVE, BELOW = "within noise", "above", "below"

# The Task 2 champion's tie-break, fixed before any evaluation number is read. Each entry is
# (column, ascending); the candidate's name (ascending) always breaks what is left.
TIE_BREAK: tuple[tuple[str, bool], ...] = (("members", False), ("params", True))
TIE_BREAK_RULE = (
    "Candidates whose selection accuracy is at least the lower 95 % Wilson bound of the best "
    "candidate's form the tie set, ordered by more members first, then fewer "
    "parameters, then name; the first is the champion, and no evaluation label is read."
)
EVALUATION_COLUMN = re.compile(r"test|eval", re.IGNORECASE)  # names that carry evaluation data


@dataclass(frozen=True)
class Interval:
    """A point estimate with its two-sided interval, resting on `n` images (or samples)."""

    estimate: float
    low: float
    high: float
    n: int
    level: float = LEVEL

    @property
    def half_width(self) -> float:
        """Half the interval's width (Wilson intervals are asymmetric around the estimate)."""
        return (self.high - self.low) / 2

    def format(self, digits: int = 4) -> str:
        """E.g. "0.9875 [0.9823, 0.9913]"."""
        return f"{self.estimate:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


@dataclass(frozen=True)
class PairedTest:
    """a against b: difference (a - b), its interval, the p-value and the verdict for a.

    `n` is the number of paired units (images for McNemar, seed pairs for the paired t-test,
    a's seeds for Welch); `n_b` is b's count when the arms are unpaired. `n01` counts the
    images a gets wrong and b right, `n10` those a gets right and b wrong (McNemar only).
    """

    difference: float
    low: float
    high: float
    p_value: float
    verdict: str
    n: int
    method: str
    n01: int | None = None
    n10: int | None = None
    n_b: int | None = None
    level: float = LEVEL

    def format(self, digits: int = 4) -> str:
        """E.g. "+0.0133 [+0.0050, +0.0217], p = 0.0386: better"."""
        interval = f"[{self.low:+.{digits}f}, {self.high:+.{digits}f}]"
        p = p_text(self.p_value, 4)
        p = p if p.startswith("<") else f"= {p}"
        return f"{self.difference:+.{digits}f} {interval}, p {p}: {self.verdict}"


@dataclass(frozen=True)
class SeedSummary:
    """Several seeds of one cell: mean, sample sd (None for a single seed), the values."""

    mean: float
    sd: float | None
    n: int
    values: tuple[float, ...]

    def format(self, digits: int = 4) -> str:
        """E.g. "0.9861 ± 0.0019 (3 seeds)", or "0.9861 (1 seed)"."""
        if self.sd is None:
            return f"{self.mean:.{digits}f} (1 seed)"
        return f"{self.mean:.{digits}f} ± {self.sd:.{digits}f} ({self.n} seeds)"


def p_text(p: float, digits: int = 3) -> str:
    """A p-value as text: `digits` significant digits, "< 1e-10" below that (never "0"), ""
    for none."""
    if p is None or math.isnan(p):
        return ""
    return "< 1e-10" if p < 1e-10 else f"{p:.{digits}g}"


def accuracy_interval(correct: int, total: int, level: float = LEVEL) -> Interval:
    """The Wilson score interval of `correct` right answers out of `total` images."""
    if total <= 0 or not 0 <= correct <= total:
        raise ValueError(f"need 0 <= correct <= total and total > 0, got {correct}/{total}")
    ci = stats.binomtest(int(correct), int(total)).proportion_ci(
        confidence_level=level, method="wilson"
    )
    return Interval(correct / total, float(ci.low), float(ci.high), int(total), level)


def bootstrap_interval(
    data: np.ndarray | Sequence[np.ndarray],
    statistic: Callable[..., float] = np.mean,
    level: float = LEVEL,
    n_resamples: int = N_RESAMPLES,
    seed: int = 0,
    method: str = "percentile",
) -> Interval:
    """A bootstrap interval over images of `statistic`, reproducible through `seed`.

    `data` is one array (e.g. per-image correctness, `statistic=np.mean`) or a tuple of
    arrays resampled together, image by image (e.g. `(labels, scores)` with an AUROC
    statistic such as `auroc`). `method` is scipy's: "percentile" (default) or "BCa".
    A resample whose statistic is nan (e.g. an AUROC on a one-class resample) makes the
    interval nan, so give it enough images of each class.
    """
    samples = (data,) if isinstance(data, np.ndarray) else tuple(data)
    samples = tuple(np.asarray(sample) for sample in samples)
    sizes = {len(sample) for sample in samples}
    if len(sizes) != 1 or 0 in sizes:
        raise ValueError(f"need non-empty samples of one length, got lengths {sorted(sizes)}")
    estimate = float(statistic(*samples))
    result = stats.bootstrap(
        samples,
        statistic,
        n_resamples=n_resamples,
        batch=200,  # bounds memory on thousands of images
        paired=len(samples) > 1,
        confidence_level=level,
        method=method,
        rng=np.random.default_rng(seed),
    )
    ci = result.confidence_interval
    return Interval(estimate, float(ci.low), float(ci.high), sizes.pop(), level)


def auroc(labels: np.ndarray, scores: np.ndarray, axis: int = -1) -> float | np.ndarray:
    """The area under the ROC curve (positives: `labels` true), as the Mann-Whitney U / n1 n0:
    the positives' rank sum (ties at their mean rank, scipy's `rankdata`) less n1 (n1 + 1) / 2.
    Along `axis`, so that a bootstrap scores all its resamples in one call; nan where a row
    lacks either class."""
    labels = np.asarray(labels, dtype=bool)
    ranks = stats.rankdata(np.asarray(scores, dtype=float), axis=axis)
    positives = labels.sum(axis=axis)
    negatives = labels.shape[axis] - positives
    u = (ranks * labels).sum(axis=axis) - positives * (positives + 1) / 2
    with np.errstate(invalid="ignore", divide="ignore"):
        area = np.where((positives > 0) & (negatives > 0), u / (positives * negatives), np.nan)
    return float(area) if area.ndim == 0 else area


def _verdict(difference: float, p_value: float, alpha: float) -> str:
    if p_value < alpha and difference != 0:
        return BETTER if difference > 0 else WORSE
    return NO_DIFFERENCE


def mcnemar_exact(
    a_correct: np.ndarray,
    b_correct: np.ndarray,
    level: float = LEVEL,
    alpha: float = ALPHA,
    n_resamples: int = N_RESAMPLES,
    seed: int = 0,
) -> PairedTest:
    """Model a against model b on the same images: exact McNemar test, two-sided.

    The p-value is the exact binomial test of the discordant pairs (n10 of n01 + n10 at 1/2);
    no discordant pair gives p = 1. The difference of accuracies (a - b) gets a paired
    percentile bootstrap interval over images (scipy, fixed seed). The verdict comes from
    the p-value alone.
    """
    a = np.asarray(a_correct, dtype=bool)
    b = np.asarray(b_correct, dtype=bool)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"need two non-empty 1-d arrays of one length, got {a.shape}, {b.shape}")
    n10 = int(np.count_nonzero(a & ~b))
    n01 = int(np.count_nonzero(~a & b))
    p_value = stats.binomtest(n10, n01 + n10, 0.5).pvalue if n01 + n10 else 1.0
    difference = (n10 - n01) / a.size
    if n01 + n10:
        ci = stats.bootstrap(
            (a.astype(float), b.astype(float)),
            lambda x, y, axis=-1: np.mean(x, axis=axis) - np.mean(y, axis=axis),
            n_resamples=n_resamples,
            batch=200,
            paired=True,
            confidence_level=level,
            method="percentile",
            rng=np.random.default_rng(seed),
        ).confidence_interval
        low, high = float(ci.low), float(ci.high)
    else:
        low = high = 0.0  # the two models agree on every image
    return PairedTest(
        difference=difference,
        low=low,
        high=high,
        p_value=float(p_value),
        verdict=_verdict(difference, float(p_value), alpha),
        n=int(a.size),
        method="exact McNemar",
        n01=n01,
        n10=n10,
        level=level,
    )


def seeds_paired_test(
    a_accs: Sequence[float], b_accs: Sequence[float], level: float = LEVEL, alpha: float = ALPHA
) -> PairedTest:
    """Arm a against arm b over seeds: difference of mean accuracies with its t interval.

    Equal lengths pair seed i with seed i (scipy `ttest_rel`); unequal lengths use Welch's
    `ttest_ind`. Each arm needs at least two seeds. Identical differences on every seed pair
    give scipy's answer (p = 0 when they are non-zero; p = 1 when all are zero).
    """
    a = np.asarray(a_accs, dtype=float)
    b = np.asarray(b_accs, dtype=float)
    if a.size < 2 or b.size < 2:
        raise ValueError(f"need at least two seeds per arm, got {a.size} and {b.size}")
    if a.size == b.size:
        result = stats.ttest_rel(a, b)
        method, n_b = "paired t-test over seeds", None
    else:
        result = stats.ttest_ind(a, b, equal_var=False)
        method, n_b = "Welch t-test over seeds", int(b.size)
    ci = result.confidence_interval(confidence_level=level)
    p_value = 1.0 if math.isnan(result.pvalue) else float(result.pvalue)
    difference = float(a.mean() - b.mean())
    return PairedTest(
        difference=difference,
        low=float(ci.low),
        high=float(ci.high),
        p_value=p_value,
        verdict=_verdict(difference, p_value, alpha),
        n=int(a.size),
        method=method,
        n_b=n_b,
        level=level,
    )


def seed_summary(values: Sequence[float]) -> SeedSummary:
    """Mean and sample standard deviation (ddof=1) over seeds; sd is None for one seed."""
    array = np.asarray(values, dtype=float)
    if array.size == 0 or not np.isfinite(array).all():
        raise ValueError(f"need one or more finite seed values, got {list(values)}")
    sd = float(np.std(array, ddof=1)) if array.size > 1 else None
    return SeedSummary(float(array.mean()), sd, int(array.size), tuple(float(v) for v in array))


def tie_set(
    candidates: pd.DataFrame,
    score: str = "select_acc",
    n: str = "select_n",
    key: str = "name",
    tie_break: tuple[tuple[str, bool], ...] = TIE_BREAK,
) -> pd.DataFrame:
    """The candidates selection cannot tell from the best, ordered by `TIE_BREAK_RULE`.

    A candidate is tied when its `score` is at least the lower bound of the best candidate's
    Wilson interval (on that candidate's `n` selection images). The rows come back in
    tie-break order (`tie_break` columns, then `key` ascending), the champion first, with
    each row's own interval as `<score>_low` / `<score>_high`. A frame with any column whose
    name holds "test" or "eval" (any case) is refused: the rule reads no evaluation label.
    """
    leaked = [column for column in candidates.columns if EVALUATION_COLUMN.search(str(column))]
    if leaked:
        raise ValueError(f"the tie set reads no evaluation data; drop column(s) {leaked}")
    needed = [score, n, key, *(column for column, _ in tie_break)]
    missing = [column for column in needed if column not in candidates.columns]
    if missing:
        raise ValueError(f"candidates lack column(s) {missing}")
    if candidates.empty or candidates[score].isna().any():
        raise ValueError(f"need one or more candidates, each with a {score!r}")
    frame = candidates.copy()
    intervals = [
        accuracy_interval(int(round(acc * size)), int(size))
        for acc, size in zip(frame[score], frame[n], strict=True)
    ]
    frame[f"{score}_low"] = [interval.low for interval in intervals]
    frame[f"{score}_high"] = [interval.high for interval in intervals]
    # the best: the highest score; among equal scores the most images (the tightest bound)
    best = frame.sort_values([score, n], ascending=False, kind="stable").iloc[0]
    tied = frame[frame[score] >= best[f"{score}_low"]]
    columns = [column for column, _ in tie_break] + [key]
    ascending = [up for _, up in tie_break] + [True]
    return tied.sort_values(columns, ascending=ascending, kind="stable").reset_index(drop=True)


def _seed_multiplier(level: float, n_seeds: int | None) -> float:
    """How many sample sds one more run may land from the mean of `n_seeds` runs: Student's
    t quantile times sqrt(1 + 1/k) (a prediction interval); the normal quantile when the
    count is unknown."""
    quantile = (1 + level) / 2
    if n_seeds is None or n_seeds < 2:
        return float(stats.norm.ppf(quantile))
    return float(stats.t.ppf(quantile, n_seeds - 1) * math.sqrt(1 + 1 / n_seeds))


def widen(interval: Interval, seed_sd: float | None = None, n_seeds: int | None = None) -> Interval:
    """The interval with seed-to-seed noise added: each side becomes sqrt(side² + (m·sd)²),
    clipped to [0, 1].

    sd is the sample sd of single runs and m the prediction multiplier of `n_seeds` runs
    (t quantile times sqrt(1 + 1/k); the normal quantile without a count), so the result
    covers where one more run could land; no sd leaves the interval unchanged.
    """
    if not seed_sd:
        return interval
    spread = (_seed_multiplier(interval.level, n_seeds) * seed_sd) ** 2
    below = math.sqrt((interval.estimate - interval.low) ** 2 + spread)
    above = math.sqrt((interval.high - interval.estimate) ** 2 + spread)
    return Interval(
        interval.estimate,
        max(0.0, interval.estimate - below),
        min(1.0, interval.estimate + above),
        interval.n,
        interval.level,
    )


def versus_reference(
    interval: Interval,
    reference: float,
    seed_sd: float | None = None,
    n_seeds: int | None = None,
    reference_n: int | None = None,
    reference_digits: int = 2,
) -> str:
    """Where a published `reference` falls against this project's estimate: "within noise"
    when their difference is within the noise of both, else "above" or "below" (this
    project's estimate above or below the reference).

    The noise on each side: this estimate's interval side, the reference's own binomial
    95 % half-width on `reference_n` images (default: as many as ours), and the seed spread
    (`widen`), added in quadrature; plus half a unit of the reference's last printed digit
    (a reference of 0.57 stands for anything in [0.565, 0.575]).
    """
    if not math.isfinite(reference):
        raise ValueError(f"need a finite reference number, got {reference}")
    z = float(stats.norm.ppf((1 + interval.level) / 2))
    n = reference_n or interval.n
    theirs = z * math.sqrt(max(reference * (1 - reference), 0.0) / n) if n else 0.0
    seeds = _seed_multiplier(interval.level, n_seeds) * seed_sd if seed_sd else 0.0
    rounding = 0.5 * 10.0**-reference_digits
    below = math.sqrt((interval.estimate - interval.low) ** 2 + theirs**2 + seeds**2)
    above = math.sqrt((interval.high - interval.estimate) ** 2 + theirs**2 + seeds**2)
    if interval.estimate - below - rounding <= reference <= interval.estimate + above + rounding:
        return WITHIN_NOISE
    return ABOVE if interval.estimate > reference else BELOW


def one_image_worth(n: int) -> float:
    """What one image moves an accuracy on `n` images: 1 / n."""
    if n <= 0:
        raise ValueError(f"need a positive number of images, got {n}")
    return 1 / n
