"""Statistics that turn particle counts into a fraction an operator can trust.

Pure functions over numbers (and one small stateful EWMA): no I/O, no clock reads.
Every timestamp is a float in seconds, passed in by the caller.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

Z_95 = 1.959963984540054
"""Two-sided 95 % standard-normal quantile."""

MAX_CONFUSION_CONDITION = 1e3
"""Above this condition number the adjusted estimate amplifies counting noise more than
it removes bias (for two classes: TPR - FPR below about 0.002), so the unadjusted shares
are returned instead."""


def wilson_interval_from_fraction(p: float, n: float, z: float = Z_95) -> tuple[float, float]:
    """Wilson interval for an observed fraction `p` out of `n` (n may be fractional).

    The interval always contains `p` exactly, which `wilson_interval` cannot promise
    when it has to recompute p as successes / n from a scaled effective n.
    """
    if n <= 0:
        return (0.0, 1.0)
    p = min(max(p, 0.0), 1.0)
    z2 = z * z
    denominator = 1.0 + z2 / n
    centre = (p + z2 / (2.0 * n)) / denominator
    half = z * math.sqrt(p * (1.0 - p) / n + z2 / (4.0 * n * n)) / denominator
    # Wilson always contains p; the min/max only removes rounding at p = 0 or 1.
    low = min(max(centre - half, 0.0), p)
    high = max(min(centre + half, 1.0), p)
    return (low, high)


def wilson_interval(successes: float, n: float, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for `successes` out of `n`; (0, 1) when n is 0.

    `n` may be a float: an effective sample size n / deff from `design_effect`, with
    `successes` scaled the same way. Wilson is used because it behaves at 0 % and at a
    few per cent, where the process usually is and where the Wald interval collapses.
    """
    if n <= 0:
        return (0.0, 1.0)
    return wilson_interval_from_fraction(successes / n, n, z)


def design_effect(
    per_frame_successes: Sequence[float] | np.ndarray,
    per_frame_totals: Sequence[float] | np.ndarray,
) -> float:
    """Variance inflation of a pooled fraction because particles cluster by frame.

    Particles from one frame share the same moment of the slurry, the same focus and
    illumination, so they are not independent draws. The frame is the honest sampling
    unit: the variance of the ratio estimator p = sum(y) / sum(m) over k frames is

        var = 1 / (k (k - 1)) * sum((y_i - p m_i)^2) / mbar^2

    and the design effect is that variance divided by the binomial p (1 - p) / n. It is
    clamped to at least 1 (pooling never makes the estimate better than independent
    particles) and is 1 when there are fewer than two frames with particles or p is 0
    or 1 (no between-frame information). Callers use n / deff as the effective sample
    size in `wilson_interval`, which gives honest, wider intervals when particles
    cluster by frame and the plain Wilson interval when they do not. Frames without
    particles carry no information about the ratio and are left out.
    """
    y = np.asarray(per_frame_successes, dtype=np.float64).ravel()
    m = np.asarray(per_frame_totals, dtype=np.float64).ravel()
    if y.shape != m.shape:
        raise ValueError(
            f"per-frame successes and totals must have the same length, got {y.size} and {m.size}"
        )
    occupied = m > 0
    y = y[occupied]
    m = m[occupied]
    k = int(m.size)
    if k < 2:
        return 1.0
    n = float(m.sum())
    p = float(y.sum()) / n
    if p <= 0.0 or p >= 1.0:
        return 1.0
    m_bar = n / k
    residuals = y - p * m
    ratio_variance = float(residuals @ residuals) / (k * (k - 1)) / (m_bar * m_bar)
    binomial_variance = p * (1.0 - p) / n
    return max(1.0, ratio_variance / binomial_variance)


def normalise_confusion_matrix(
    confusion_matrix: Sequence[Sequence[float]] | np.ndarray,
) -> np.ndarray:
    """Row-normalise a validation confusion matrix (rows true, columns predicted).

    C[i][j] is then P(predicted j | true i). A row without validation support says
    nothing about that class's errors and is taken as the identity row (classified
    perfectly), which leaves that class's share unadjusted.
    """
    matrix = np.asarray(confusion_matrix, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"confusion matrix must be square, got shape {matrix.shape}")
    if np.any(matrix < 0) or not np.all(np.isfinite(matrix)):
        raise ValueError("confusion matrix entries must be finite and non-negative")
    support = matrix.sum(axis=1)
    normalised = np.eye(matrix.shape[0])
    has_support = support > 0
    normalised[has_support] = matrix[has_support] / support[has_support, None]
    return normalised


class ConfusionCorrection:
    """Adjusted classify-and-count with one validation confusion matrix, prepared once.

    Forman's adjusted count, the multi-class form of Rogan-Gladen. With C the
    row-normalised validation confusion matrix (C[i][j] = P(predicted j | true i)), the
    expected predicted shares are q = C^T p; p is solved by least squares, clipped to
    [0, 1] and renormalised to sum to 1. For two classes this is exactly
    p = (q - FPR) / (TPR - FPR) clipped to [0, 1]. A singular or ill-conditioned C
    (condition number above `MAX_CONFUSION_CONDITION`: the classifier barely separates
    the classes) cannot be inverted usefully, so `adjust` then returns the unadjusted
    shares q and `invertible` is False.
    """

    def __init__(self, confusion_matrix: Sequence[Sequence[float]] | np.ndarray) -> None:
        self.matrix = normalise_confusion_matrix(confusion_matrix)
        condition = float(np.linalg.cond(self.matrix))
        self.invertible = math.isfinite(condition) and condition <= MAX_CONFUSION_CONDITION

    def adjust(self, observed_counts: Sequence[float] | np.ndarray) -> np.ndarray:
        """Estimated true class shares from predicted counts (in manifest class order)."""
        counts = np.asarray(observed_counts, dtype=np.float64).ravel()
        n_classes = self.matrix.shape[0]
        if counts.size != n_classes:
            raise ValueError(
                f"confusion matrix is {n_classes} x {n_classes} but there are "
                f"{counts.size} observed counts (one row per class, in manifest class order)"
            )
        if np.any(counts < 0):
            raise ValueError("observed counts must be non-negative")
        total = float(counts.sum())
        if total <= 0:
            raise ValueError("no observed particles: an adjusted share needs at least one count")
        observed_shares: np.ndarray = counts / total
        if not self.invertible:
            return observed_shares
        # C is square and well conditioned here, so the least-squares solution is the
        # exact solve.
        solution = np.linalg.solve(self.matrix.T, observed_shares)
        clipped = np.clip(solution, 0.0, 1.0)
        clipped_total = float(clipped.sum())
        if clipped_total <= 0:
            return observed_shares
        result: np.ndarray = clipped / clipped_total
        return result


def adjusted_fractions(
    observed_counts: Sequence[float] | np.ndarray,
    confusion_matrix: Sequence[Sequence[float]] | np.ndarray,
) -> np.ndarray:
    """True class shares estimated from predicted counts: adjusted classify-and-count.

    See `ConfusionCorrection`, which this builds for one call; rows of the matrix with
    no validation support count as identity rows, and a singular or ill-conditioned
    matrix gives back the unadjusted shares.
    """
    return ConfusionCorrection(confusion_matrix).adjust(observed_counts)


def slope_per_minute(
    times_s: Sequence[float] | np.ndarray,
    values: Sequence[float] | np.ndarray,
    weights: Sequence[float] | np.ndarray | None = None,
) -> float | None:
    """Least-squares slope of `values` against time, in value units per minute.

    With `weights` set to per-frame particle counts and `values` to per-frame class
    fractions, this equals the regression of every particle's 0/1 class indicator on its
    frame time, at the cost of one row per frame. None when there are fewer than two
    distinct times (or no positive weight).
    """
    t = np.asarray(times_s, dtype=np.float64).ravel()
    v = np.asarray(values, dtype=np.float64).ravel()
    w = np.ones_like(t) if weights is None else np.asarray(weights, dtype=np.float64).ravel()
    if not (t.size == v.size == w.size):
        raise ValueError(
            f"times, values and weights must have the same length, got {t.size}, {v.size}, {w.size}"
        )
    used = w > 0
    t, v, w = t[used], v[used], w[used]
    if t.size < 2:
        return None
    # Centre on the first time before squaring: epoch seconds squared lose precision.
    t = t - t[0]
    if float(np.ptp(t)) == 0.0:
        return None
    weight_sum = float(w.sum())
    t_mean = float(w @ t) / weight_sum
    v_mean = float(w @ v) / weight_sum
    dt = t - t_mean
    sxx = float(w @ (dt * dt))
    if sxx <= 0:
        return None
    sxy = float(w @ (dt * (v - v_mean)))
    return sxy / sxx * 60.0


class EwmaFractions:
    """Exponentially weighted class fractions over a particle stream.

    Per-class and total particle counts decay by 0.5 ** (dt / halflife_s); a class's
    fraction is its decayed count over the decayed total, so busy frames weigh more
    than sparse ones, as every particle counts once. A record older than the newest
    one seen (slightly out of order) enters with its weight already decayed by its
    age, so arrival order does not change the result.
    """

    def __init__(self, n_classes: int, halflife_s: float) -> None:
        if n_classes < 1:
            raise ValueError(f"need at least one class, got {n_classes}")
        if not halflife_s > 0:
            raise ValueError(f"EWMA half-life must be positive seconds, got {halflife_s}")
        self.halflife_s = float(halflife_s)
        self._counts = np.zeros(n_classes, dtype=np.float64)
        self._last_ts: float | None = None

    def reset(self) -> None:
        """Forget all history (a new batch starts from nothing)."""
        self._counts[:] = 0.0
        self._last_ts = None

    def update(self, ts: float, class_counts: Sequence[int] | np.ndarray) -> None:
        """Add one frame's confident per-class particle counts observed at `ts`."""
        counts = np.asarray(class_counts, dtype=np.float64)
        if counts.shape != self._counts.shape:
            raise ValueError(f"expected {self._counts.size} class counts, got {counts.size}")
        if self._last_ts is None:
            self._last_ts = ts
        if ts >= self._last_ts:
            self._counts *= 0.5 ** ((ts - self._last_ts) / self.halflife_s)
            self._counts += counts
            self._last_ts = ts
        else:
            self._counts += counts * 0.5 ** ((self._last_ts - ts) / self.halflife_s)

    def fractions(self) -> tuple[float | None, ...]:
        """Weighted fraction per class; None for every class before any particle.

        The fractions do not depend on the query time: decaying every count by the same
        factor leaves their ratios unchanged.
        """
        total = float(self._counts.sum())
        if total <= 0.0:
            return tuple(None for _ in range(self._counts.size))
        return tuple(float(c) / total for c in self._counts)
