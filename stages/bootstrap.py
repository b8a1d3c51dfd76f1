"""Bootstrap confidence intervals for judge scores of policies evaluated on the same prompts.

Every policy is scored on the same held-out prompts: it samples ``K`` completions for each of ``P``
prompts with the same sampling seeds, so sample ``(p, k)`` of every policy answers the same prompt. A
policy may have been trained with several training seeds ``S`` (each seed a separate training run,
scored on the same ``P x K`` samples); the SFT baseline has ``S = 1``. A policy's per-sample judge
scores are therefore an array of shape ``(S, P, K)``.

Why not the textbook i.i.d. bootstrap over all ``S * P * K`` scores:

* The ``K`` samples of one prompt are not independent (an easy prompt gets high scores from all of
  them), so resampling single samples understates the uncertainty by up to ``sqrt(K)``. Prompts are
  the independent unit: they are resampled as clusters and a prompt's ``K`` samples move together
  [Davison 1997, section 3.8; Field 2007; Miller 2024].
* A training seed is a draw from the training procedure. Where ``S > 1`` the seeds are resampled too,
  independently of the prompts (seeds and prompts are crossed factors, the "pigeonhole" bootstrap of
  [Owen 2007]), so the interval covers seed-to-seed variation and not only the luck of the prompts
  [Bouthillier 2021; Agarwal 2021].
* A difference between two policies resamples the prompts PAIRED: one replicate uses the same prompt
  indices for both policies, so prompt difficulty, which both share, cancels [Koehn 2004; Miller
  2024]. Each policy's seeds are resampled independently, because their training runs are unrelated.

Intervals are percentile intervals [Efron 1993, chapter 13]: the ``(1 - level) / 2`` and
``1 - (1 - level) / 2`` quantiles of the replicates. The point estimate is the statistic on the full
data, not the mean of the replicates.

Shape letters: ``S`` training seeds, ``P`` prompts, ``K`` samples per prompt, ``R`` bootstrap
replicates. Free functions, numpy arrays in and out, nothing runs at import time.

References:

* [Efron 1993] B. Efron and R. J. Tibshirani, "An Introduction to the Bootstrap", Chapman & Hall, 1993.
* [Davison 1997] A. C. Davison and D. V. Hinkley, "Bootstrap Methods and their Application",
  Cambridge University Press, 1997.
* [Field 2007] C. A. Field and A. H. Welsh, "Bootstrapping clustered data", JRSS B 69(3), 2007.
* [Owen 2007] A. B. Owen, "The pigeonhole bootstrap", Annals of Applied Statistics 1(2), 2007.
* [Koehn 2004] P. Koehn, "Statistical Significance Tests for Machine Translation Evaluation",
  EMNLP 2004 (paired bootstrap resampling).
* [Bouthillier 2021] X. Bouthillier et al., "Accounting for Variance in Machine Learning Benchmarks",
  MLSys 2021.
* [Agarwal 2021] R. Agarwal et al., "Deep Reinforcement Learning at the Edge of the Statistical
  Precipice", NeurIPS 2021.
* [Miller 2024] E. Miller, "Adding Error Bars to Evals: A Statistical Approach to Language Model
  Evaluations", arXiv:2411.00640.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike


# --------------------------------------------------------------------------------------------------
# Result
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Interval:
    """A point estimate with its percentile bootstrap interval.

    estimate: the statistic on the full data (not the bootstrap mean).
    low, high: the bounds of the interval, ``low <= high``.
    level: the coverage the interval was built for.
    """

    estimate: float
    low: float
    high: float
    level: float = 0.95

    def __post_init__(self) -> None:
        if not self.low <= self.high:
            raise ValueError(f"Interval: low ({self.low}) must be <= high ({self.high})")
        if not 0.0 < self.level < 1.0:
            raise ValueError(f"Interval: level must be strictly between 0 and 1, got {self.level}")

    def excludes_zero(self) -> bool:
        """True when the whole interval lies on one side of zero (a significant difference)."""
        return self.low > 0 or self.high < 0

    def to_dict(self) -> dict:
        """``{"estimate": e, "ci95": [low, high]}``, for JSON reports (key ``ci95`` whatever the level)."""
        return {"estimate": self.estimate, "ci95": [self.low, self.high]}

    def format(self, digits: int = 3) -> str:
        """``"0.070 [0.030, 0.110]"``: the estimate, then the bounds, each with ``digits`` decimals."""
        return f"{self.estimate:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


# --------------------------------------------------------------------------------------------------
# Input handling
# --------------------------------------------------------------------------------------------------
def as_scores(values: ArrayLike, samples_per_prompt: int) -> np.ndarray:
    """Per-sample judge scores in the ``(S, P, K)`` layout the interval functions take.

    Args:
        values: flat prompt-major scores ``(N,)`` with ``N = P * K`` (one policy, one training seed;
            the ``K`` samples of prompt 0 first), or ``(S, N)`` (one row per training seed), or
            ``(S, P, K)``, which passes through.
        samples_per_prompt: ``K``, the number of completions sampled for each prompt.

    Returns:
        (S, P, K) float64 array.

    Raises:
        ValueError: empty input, non-finite values, ``N`` not divisible by ``samples_per_prompt``, a
            ``(S, P, K)`` input whose last axis is not ``samples_per_prompt``, or another number of axes.
    """
    if isinstance(samples_per_prompt, bool) or not isinstance(samples_per_prompt, int | np.integer):
        raise ValueError(f"samples_per_prompt must be a positive int, got {samples_per_prompt!r}")
    if samples_per_prompt < 1:
        raise ValueError(f"samples_per_prompt must be a positive int, got {samples_per_prompt}")
    scores = np.asarray(values, dtype=np.float64)
    if scores.ndim == 1:
        scores = scores[None, :]  # a single training seed
    if scores.ndim == 2:
        seeds, samples = scores.shape
        if samples % samples_per_prompt:
            raise ValueError(
                f"values has {samples} samples per seed, which is not a multiple of samples_per_prompt "
                f"({samples_per_prompt}); it must be P * samples_per_prompt for some number of prompts P"
            )
        scores = scores.reshape(seeds, samples // samples_per_prompt, samples_per_prompt)
    elif scores.ndim == 3 and scores.shape[2] != samples_per_prompt:
        raise ValueError(
            f"values has shape {scores.shape}, whose last axis (K) is not samples_per_prompt ({samples_per_prompt})"
        )
    elif scores.ndim != 3:
        raise ValueError(f"values must have shape (N,), (S, N) or (S, P, K), got shape {scores.shape}")
    return _checked("values", scores)


def _checked(name: str, scores: ArrayLike) -> np.ndarray:
    """``scores`` as a float64 ``(S, P, K)`` array; ValueError naming ``name`` if it is not a valid one."""
    array = np.asarray(scores, dtype=np.float64)
    if array.ndim != 3:
        raise ValueError(f"{name} must have shape (S, P, K) (see as_scores), got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"{name} is empty (shape {array.shape}); it needs at least one seed, prompt and sample")
    if not np.isfinite(array).all():
        bad = np.count_nonzero(~np.isfinite(array))
        raise ValueError(f"{name} contains {bad} non-finite score(s) (NaN or inf); all scores must be finite")
    return array


def _checked_pair(a: ArrayLike, b: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """``a`` and ``b`` checked, and refused unless they share ``P`` and ``K`` (the same samples)."""
    a, b = _checked("a", a), _checked("b", b)
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(
            f"a has shape {a.shape} and b has shape {b.shape}: they must have the same prompts and samples per "
            "prompt (P, K), only the number of seeds S may differ"
        )
    return a, b


def _check_budget(resamples: int, level: float) -> None:
    """Refuse too few replicates for the tail quantiles, or a level outside (0, 1)."""
    if isinstance(resamples, bool) or not isinstance(resamples, int | np.integer) or resamples < 100:
        raise ValueError(f"resamples must be an int >= 100 (2000 is usual for a 95% interval), got {resamples!r}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be strictly between 0 and 1 (e.g. 0.95), got {level!r}")


# --------------------------------------------------------------------------------------------------
# Resampling
# --------------------------------------------------------------------------------------------------
def _draw_counts(rng: np.random.Generator, n: int, resamples: int) -> np.ndarray:
    """How often each of ``n`` units is drawn in each replicate of ``n`` draws with replacement.

    Returns (R, n) int counts, each row summing to ``n``. Working with counts rather than the drawn
    indices is exact (a mean over the drawn units is a count-weighted mean) and keeps memory at
    ``R * n`` where fancy indexing the win table would need ``R * Sa * Sb * P``.
    """
    if n == 1:
        return np.ones((resamples, 1), dtype=np.int64)  # the only draw is unit 0; spend no randomness
    indices = rng.integers(0, n, size=(resamples, n))
    offsets = indices + n * np.arange(resamples)[:, None]  # row r's units go to bins r*n .. r*n + n-1
    return np.bincount(offsets.ravel(), minlength=resamples * n).reshape(resamples, n)


def _resampled_means(table: np.ndarray, seed_counts: np.ndarray, prompt_counts: np.ndarray) -> np.ndarray:
    """Mean of a per-(seed, prompt) table over each replicate's drawn seeds and prompts.

    Args:
        table: (S, P) per-(seed, prompt) statistic.
        seed_counts: (R, S) draws of each seed per replicate (rows sum to S).
        prompt_counts: (R, P) draws of each prompt per replicate (rows sum to P).

    Returns:
        (R,) ``sum_{s,p} seed_counts[r, s] * prompt_counts[r, p] * table[s, p] / (S * P)``.
    """
    seeds, prompts = table.shape
    return np.einsum("rs,sp,rp->r", seed_counts, table, prompt_counts) / (seeds * prompts)


def _percentile(estimate: float, replicates: np.ndarray, level: float) -> Interval:
    """The percentile interval [Efron 1993, eq. 13.5] of ``replicates`` (R,) around ``estimate``."""
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(replicates, [tail, 1.0 - tail])
    return Interval(float(estimate), float(low), float(high), float(level))


# --------------------------------------------------------------------------------------------------
# Intervals
# --------------------------------------------------------------------------------------------------
def mean_interval(scores: ArrayLike, *, resamples: int = 2000, level: float = 0.95, seed: int = 0) -> Interval:
    """Mean judge score of one policy, with its prompt- and seed-resampled percentile interval.

    Args:
        scores: (S, P, K) per-sample judge scores (see :func:`as_scores`).
        resamples: number of bootstrap replicates R (>= 100).
        level: coverage of the interval, in (0, 1).
        seed: seed of ``np.random.default_rng``; the same inputs and seed give the same interval.

    Returns:
        Interval whose estimate is the mean over all ``S * P * K`` scores.
    """
    scores = _checked("scores", scores)
    _check_budget(resamples, level)
    rng = np.random.default_rng(seed)
    seeds, prompts, _ = scores.shape
    prompt_counts = _draw_counts(rng, prompts, resamples)
    seed_counts = _draw_counts(rng, seeds, resamples)
    # Every (seed, prompt) cell holds K samples, so the overall mean is the mean of the cell means.
    replicates = _resampled_means(scores.mean(axis=2), seed_counts, prompt_counts)
    return _percentile(scores.mean(), replicates, level)


def difference_interval(
    a: ArrayLike, b: ArrayLike, *, resamples: int = 2000, level: float = 0.95, seed: int = 0
) -> Interval:
    """``mean(a) - mean(b)``, prompts resampled paired, each policy's seeds resampled independently.

    Args:
        a: (Sa, P, K) per-sample judge scores of policy a.
        b: (Sb, P, K) per-sample judge scores of policy b on the same samples (same P and K).
        resamples, level, seed: as in :func:`mean_interval`.

    Returns:
        Interval whose estimate is ``a.mean() - b.mean()``.
    """
    a, b = _checked_pair(a, b)
    _check_budget(resamples, level)
    rng = np.random.default_rng(seed)
    prompt_counts = _draw_counts(rng, a.shape[1], resamples)  # shared: the pairing
    a_seed_counts = _draw_counts(rng, a.shape[0], resamples)
    b_seed_counts = _draw_counts(rng, b.shape[0], resamples)
    replicates = _resampled_means(a.mean(axis=2), a_seed_counts, prompt_counts) - _resampled_means(
        b.mean(axis=2), b_seed_counts, prompt_counts
    )
    return _percentile(a.mean() - b.mean(), replicates, level)


def _win_table(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(Sa, Sb, P) mean over k of the win indicator of ``a[sa, p, k]`` over ``b[sb, p, k]``.

    The indicator is 1 where a scores higher, 0.5 on a tie (so ``win(a, b) + win(b, a) = 1``), else 0.
    """
    pairs_a, pairs_b = a[:, None], b[None, :]  # (Sa, 1, P, K) against (1, Sb, P, K)
    wins = (pairs_a > pairs_b) + 0.5 * (pairs_a == pairs_b)
    return wins.mean(axis=3)


def win_rate_interval(
    a: ArrayLike, b: ArrayLike, *, resamples: int = 2000, level: float = 0.95, seed: int = 0
) -> Interval:
    """Win rate of policy a over policy b, with the pairing of :func:`difference_interval`.

    win = mean over seed pairs (sa, sb), prompts p and samples k of
    ``1 if a[sa, p, k] > b[sb, p, k] else 0.5 if equal else 0``: sample (p, k) of a is compared
    with sample (p, k) of b, which answers the same prompt.

    Args:
        a: (Sa, P, K) per-sample judge scores of policy a.
        b: (Sb, P, K) per-sample judge scores of policy b on the same samples (same P and K).
        resamples, level, seed: as in :func:`mean_interval`.

    Returns:
        Interval in [0, 1] whose estimate is the win rate over all ``(sa, sb, p, k)``.
    """
    a, b = _checked_pair(a, b)
    _check_budget(resamples, level)
    rng = np.random.default_rng(seed)
    # The same draws, in the same order, as difference_interval: its interval and this one agree on
    # which replicate saw which prompts.
    prompt_counts = _draw_counts(rng, a.shape[1], resamples)
    a_seed_counts = _draw_counts(rng, a.shape[0], resamples)
    b_seed_counts = _draw_counts(rng, b.shape[0], resamples)
    table = _win_table(a, b)
    seeds_a, seeds_b, prompts = table.shape
    weighted = np.einsum("ra,rb,abp,rp->r", a_seed_counts, b_seed_counts, table, prompt_counts, optimize=True)
    replicates = weighted / (seeds_a * seeds_b * prompts)
    return _percentile(table.mean(), replicates, level)


# --------------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------------
def verdict(a_name: str, b_name: str, difference: Interval) -> str:
    """One sentence from the interval of ``mean(a) - mean(b)``.

    * above 0: ``"A ahead of B by 0.070 [0.030, 0.110]"``;
    * below 0: ``"B ahead of A by 0.070 [0.030, 0.110]"``, the numbers then of ``mean(b) - mean(a)``
      (estimate negated, bounds negated and swapped), so the lead always reads as a positive number;
    * else ``"no significant difference between A and B at this budget (A - B: 0.010 [-0.020, 0.040])"``.
    """
    if difference.low > 0:
        return f"{a_name} ahead of {b_name} by {difference.format()}"
    if difference.high < 0:
        # "+ 0.0" turns a negated 0.0 into 0.0, so no "-0.000" appears in the sentence.
        flipped = Interval(-difference.estimate + 0.0, -difference.high, -difference.low, difference.level)
        return f"{b_name} ahead of {a_name} by {flipped.format()}"
    return (
        f"no significant difference between {a_name} and {b_name} at this budget "
        f"({a_name} - {b_name}: {difference.format()})"
    )


def win_rate(scores: Sequence[float], baseline: Sequence[float]) -> float:
    """Mean over samples i of 1 if scores_i > baseline_i, 1/2 if equal, 0 otherwise (a tie counts one half)."""
    if len(scores) != len(baseline):
        raise ValueError(f"win_rate: {len(scores)} scores against {len(baseline)}; both must score the same samples")
    if not scores:
        raise ValueError("win_rate: no scores; need at least one sample")
    return statistics.fmean(1.0 if s > b else 0.5 if s == b else 0.0 for s, b in zip(scores, baseline, strict=True))
