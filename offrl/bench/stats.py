"""Statistics for benchmark tables: interquartile mean, stratified bootstrap intervals, mean ± std.

Aggregates follow Agarwal et al. (2021, "Deep RL at the edge of the statistical precipice"): scores
of several tasks are summarised by the interquartile mean (IQM) and the mean, each with a percentile
confidence interval from a *stratified* bootstrap, which resamples the runs of every task separately
(a task never borrows another task's runs, and keeps its number of runs).

Tasks may hold different numbers of runs (a failed seed). Each task then counts equally: a run of
task ``t`` weighs ``1 / (T · n_t)``, so the aggregate mean is the mean of the task means, and the IQM
is the mean of the middle half of that weighted distribution. With equal run counts these are the
plain mean and IQM of all runs pooled.

The IQM trims fractionally: with ``n`` runs, 25% of the probability mass is removed from each end even
when ``n/4`` is not a whole number, so an observation straddling a quartile keeps the part of its
weight inside the middle half. ``rliable`` calls ``scipy.stats.trim_mean``, which cuts ``floor(n/4)``
whole observations instead; the two agree whenever ``n`` is a multiple of 4.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

FloatArray = NDArray[np.float64]
Statistic = Callable[[FloatArray, FloatArray], FloatArray]  # values (..., N), weights (N,) -> (...)


def trimmed_mean(values: ArrayLike, weights: ArrayLike | None = None, trim: float = 0.25) -> FloatArray:
    """Mean of the middle ``1 - 2·trim`` of the (weighted) empirical distribution along the last axis.

    Sorted observation ``i`` covers the probability interval ``[c_{i-1}, c_i)`` of cumulative weight;
    it contributes in proportion to the overlap of that interval with ``[trim, 1 - trim]``.
    """
    if not 0.0 <= trim < 0.5:
        raise ValueError(f"trim must be in [0, 0.5), got {trim}")
    v = np.asarray(values, dtype=np.float64)
    if v.shape[-1] == 0:
        raise ValueError("trimmed_mean of an empty array")
    w = np.ones(v.shape[-1]) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (v.shape[-1],) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"weights must be non-negative, not all zero, with shape ({v.shape[-1]},)")
    order = np.argsort(v, axis=-1, kind="stable")
    v_sorted = np.take_along_axis(v, order, axis=-1)
    w_sorted = np.take_along_axis(np.broadcast_to(w / w.sum(), v.shape), order, axis=-1)
    upper = np.cumsum(w_sorted, axis=-1)
    lower = upper - w_sorted
    kept = np.clip(np.minimum(upper, 1.0 - trim) - np.maximum(lower, trim), 0.0, None)
    return np.asarray((kept * v_sorted).sum(axis=-1) / kept.sum(axis=-1))


def iqm(values: ArrayLike, weights: ArrayLike | None = None) -> float:
    """Interquartile mean of a 1-D sample: the mean of its middle 50%, trimmed fractionally."""
    return float(trimmed_mean(np.asarray(values, dtype=np.float64).reshape(-1), weights, 0.25))


def weighted_mean(values: FloatArray, weights: FloatArray) -> FloatArray:
    """Mean along the last axis with per-column weights (``Statistic`` signature)."""
    return np.asarray((values * weights).sum(axis=-1) / weights.sum())


def weighted_iqm(values: FloatArray, weights: FloatArray) -> FloatArray:
    """IQM along the last axis with per-column weights (``Statistic`` signature)."""
    return trimmed_mean(values, weights, 0.25)


STATISTICS: dict[str, Statistic] = {"iqm": weighted_iqm, "mean": weighted_mean}


def _task_arrays(tasks: Sequence[ArrayLike]) -> list[FloatArray]:
    arrays = [np.asarray(t, dtype=np.float64).reshape(-1) for t in tasks]
    if not arrays or any(a.size == 0 for a in arrays):
        raise ValueError("every task needs at least one run")
    if any(not np.all(np.isfinite(a)) for a in arrays):
        raise ValueError("scores must be finite")
    return arrays


def task_weights(tasks: Sequence[ArrayLike]) -> FloatArray:
    """Per-run weights of the pooled runs: each task weighs 1/T, split evenly over its runs."""
    arrays = _task_arrays(tasks)
    return np.concatenate([np.full(a.size, 1.0 / (len(arrays) * a.size)) for a in arrays])


def stratified_resamples(
    tasks: Sequence[ArrayLike], n_boot: int, rng: np.random.Generator
) -> list[FloatArray]:
    """``n_boot`` bootstrap resamples of each task's runs, drawn within that task only: a list with one
    ``(n_boot, n_t)`` array per task, whose values all come from task ``t``."""
    return [a[rng.integers(0, a.size, size=(n_boot, a.size))] for a in _task_arrays(tasks)]


@dataclass(frozen=True)
class Interval:
    """A point estimate with a percentile bootstrap interval."""

    point: float
    low: float
    high: float
    confidence: float
    n_boot: int

    def format(self, digits: int = 1) -> str:
        return f"{self.point:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


def stratified_bootstrap_ci(
    tasks: Sequence[ArrayLike],
    statistic: str | Statistic = "iqm",
    *,
    n_boot: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Interval:
    """The aggregate ``statistic`` over tasks (a list of per-task run scores) and its percentile interval
    from ``n_boot`` stratified bootstrap resamples; reproducible for a given ``seed``."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be positive, got {n_boot}")
    stat = STATISTICS[statistic] if isinstance(statistic, str) else statistic
    arrays = _task_arrays(tasks)
    weights = task_weights(arrays)
    point = float(stat(np.concatenate(arrays), weights))
    rng = np.random.default_rng(seed)
    replicates = stat(np.concatenate(stratified_resamples(arrays, n_boot, rng), axis=1), weights)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.percentile(replicates, [100 * alpha, 100 * (1 - alpha)])
    return Interval(point, float(low), float(high), confidence, n_boot)


@dataclass(frozen=True)
class Summary:
    """Mean and sample standard deviation (ddof 1; NaN for one run) of one task's runs."""

    mean: float
    std: float
    n: int

    def format(self, digits: int = 1) -> str:
        if self.n == 0:
            return "—"
        if self.n == 1 or not np.isfinite(self.std):
            return f"{self.mean:.{digits}f} (n=1)"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f} (n={self.n})"


def mean_std(values: ArrayLike) -> Summary:
    a = np.asarray(values, dtype=np.float64).reshape(-1)
    if a.size == 0:
        return Summary(float("nan"), float("nan"), 0)
    std = float(a.std(ddof=1)) if a.size > 1 else float("nan")
    return Summary(float(a.mean()), std, int(a.size))
