"""How well off-policy estimates select policies: the metrics of the DOPE benchmark (Fu et al. 2021,
"Benchmarks for Deep Off-Policy Evaluation"): absolute error, rank correlation and regret@k.

Each takes one estimate and one true value per policy, in the same order.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from offrl.errors import OfflineRLError


def _pair(
    estimates: Sequence[float] | np.ndarray, true_values: Sequence[float] | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    est = np.asarray(estimates, dtype=np.float64).reshape(-1)
    true = np.asarray(true_values, dtype=np.float64).reshape(-1)
    if est.shape != true.shape:
        raise OfflineRLError(f"{est.size} estimates for {true.size} true values: give one of each per policy")
    if est.size == 0:
        raise OfflineRLError("no policies to compare")
    return est, true


def absolute_errors(
    estimates: Sequence[float] | np.ndarray, true_values: Sequence[float] | np.ndarray
) -> np.ndarray:
    """|estimate − true value| per policy."""
    est, true = _pair(estimates, true_values)
    return np.abs(est - true)


def average_ranks(values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Ranks 1…n in ascending order; tied values share the mean of the ranks they span."""
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    # each run of equal values is one group; its members get the mean of positions first..last (1-based)
    new_group = np.concatenate([[True], sorted_x[1:] != sorted_x[:-1]])
    group = np.cumsum(new_group) - 1
    first = np.flatnonzero(new_group)
    last = np.concatenate([first[1:], [x.size]]) - 1
    ranks = np.empty(x.size)
    ranks[order] = (first[group] + last[group]) / 2.0 + 1.0
    return ranks


def spearman(estimates: Sequence[float] | np.ndarray, true_values: Sequence[float] | np.ndarray) -> float:
    """Spearman's rank correlation (Pearson correlation of average ranks); NaN when either side is constant."""
    est, true = _pair(estimates, true_values)
    a = average_ranks(est) - (est.size + 1) / 2.0
    b = average_ranks(true) - (true.size + 1) / 2.0
    denom = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / denom) if denom > 0.0 else float("nan")


def regret_at_k(
    estimates: Sequence[float] | np.ndarray, true_values: Sequence[float] | np.ndarray, k: int = 1
) -> float:
    """Best true value overall minus the best true value among the ``k`` policies estimated highest.

    Ties in the estimates are broken by order (the earlier policy counts as higher), so the result is
    deterministic.
    """
    est, true = _pair(estimates, true_values)
    if k < 1:
        raise OfflineRLError(f"regret@k needs k ≥ 1, got {k}")
    top = np.argsort(-est, kind="stable")[:k]
    return float(true.max() - true[top].max())
