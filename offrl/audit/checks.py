"""Rule-based parts of the audit: extreme values, duplicates and coverage.

Every statistic is the dataset's own: a reward is extreme against the dataset's reward distribution,
an observation jump against the dataset's step-to-step changes (robust z-scores: median and 1.4826 ×
median absolute deviation, so the anomalies themselves do not widen the yardstick).
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import torch

from offrl.data.format import RawDataset

REWARD_Z = 6.0  # robust z above which a reward is an outlier
JUMP_Z = 10.0  # robust z of a step-to-step change above which it is a jump
DUPLICATE_TOL = 1e-3  # max |difference| in data standard deviations for near-identical episodes
ACTION_BINS = 20
USED_BIN_SHARE = 0.001  # a bin of an action dimension is "used" when it holds ≥ 0.1 % of the actions
BOUND_TOL = 1e-3  # an action within 0.1 % of the range of a bound sits at the bound


def robust_z(x: np.ndarray, axis: int = 0) -> np.ndarray:
    """|x − median| / scale, the scale being the larger of 1.4826 × MAD (σ for a Gaussian) and a quarter
    of the 0.1–99.9 % quantile range (1.5σ for a Gaussian). The second keeps a two-valued variable, e.g.
    CartPole's ±push velocity steps, from a near-zero MAD (its values then score at most 4), and
    neither moves for anomalies rarer than 0.1 % of the rows. Where both are 0,
    the mean absolute deviation (× 1.2533) stands in; where that is 0 too (a constant), every value
    equal to the median scores 0 and others inf."""
    x = np.asarray(x, dtype=np.float64)
    med = np.median(x, axis=axis, keepdims=True)
    dev = np.abs(x - med)
    spread = np.quantile(x, 0.999, axis=axis, keepdims=True) - np.quantile(x, 0.001, axis=axis, keepdims=True)
    scale = np.maximum(1.4826 * np.median(dev, axis=axis, keepdims=True), spread / 4.0)
    mean_dev = 1.2533 * dev.mean(axis=axis, keepdims=True)
    scale = np.where(scale > 0, scale, mean_dev)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(scale > 0, dev / np.where(scale > 0, scale, 1.0), np.where(dev > 0, np.inf, 0.0))


def episode_of(raw: RawDataset, rows: np.ndarray) -> np.ndarray:
    return np.searchsorted(raw.episode_ends, np.asarray(rows), side="right")


def top_k(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest ``values``, largest first (ties keep index order)."""
    k = min(k, values.shape[0])
    part = np.argpartition(-values, k - 1)[:k] if k < values.shape[0] else np.arange(values.shape[0])
    return part[np.argsort(-values[part], kind="stable")]


def reward_outliers(raw: RawDataset, top: int, threshold: float = REWARD_Z) -> dict[str, Any]:
    z = robust_z(raw.rewards)
    flagged = np.flatnonzero(z > threshold)
    order = flagged[np.argsort(-z[flagged], kind="stable")][:top]
    return {
        "threshold_z": threshold,
        "median": float(np.median(raw.rewards)),
        "count": int(flagged.size),
        "rows": [
            {
                "row": int(r),
                "episode": int(episode_of(raw, r)),
                "reward": float(raw.rewards[r]),
                "z": json_number(z[r]),
            }
            for r in order
        ],
    }


def observation_jumps(raw: RawDataset, top: int, threshold: float = JUMP_Z) -> dict[str, Any]:
    """Rows whose step s → s′ changes some dimension far more than the dataset's steps usually do."""
    n = raw.num_transitions
    delta = raw.next_observations.reshape(n, -1).astype(np.float64) - raw.observations.reshape(n, -1)
    z = robust_z(delta)
    z = np.where(np.isinf(z) & (np.abs(delta) < 1e-12), 0.0, z)
    worst = z.max(1) if z.shape[1] else np.zeros(n)
    dim = z.argmax(1) if z.shape[1] else np.zeros(n, dtype=np.int64)
    flagged = np.flatnonzero(worst > threshold)
    order = flagged[np.argsort(-worst[flagged], kind="stable")][:top]
    return {
        "threshold_z": threshold,
        "count": int(flagged.size),
        "rows": [
            {
                "row": int(r),
                "episode": int(episode_of(raw, r)),
                "dim": int(dim[r]),
                "change": float(delta[r, dim[r]]),
                "z": json_number(worst[r]),
            }
            for r in order
        ],
        "score": worst,  # (N,) kept for plots and rankings; dropped from JSON
    }


def outside_space(raw: RawDataset, top: int) -> dict[str, Any]:
    """Observations (either side of a transition) outside the declared observation space's bounds."""
    space = raw.observation_space
    n = raw.num_transitions
    if not isinstance(space, gym.spaces.Box):
        return {"count": 0, "rows": [], "per_dim": []}
    low = np.asarray(space.low, dtype=np.float64).reshape(-1)
    high = np.asarray(space.high, dtype=np.float64).reshape(-1)
    below = np.zeros((n, low.size), dtype=bool)
    above = np.zeros((n, low.size), dtype=bool)
    for a in (raw.observations, raw.next_observations):
        flat = a.reshape(n, -1)
        below |= flat < low
        above |= flat > high
    bad = (below | above).any(1)
    rows = np.flatnonzero(bad)[:top]
    return {
        "count": int(bad.sum()),
        "rows": [
            {
                "row": int(r),
                "episode": int(episode_of(raw, r)),
                "dims": np.flatnonzero((below | above)[r]).tolist(),
            }
            for r in rows
        ],
        "per_dim": [
            {"dim": j, "below": int(below[:, j].sum()), "above": int(above[:, j].sum())}
            for j in range(low.size)
            if below[:, j].any() or above[:, j].any()
        ],
    }


def json_number(x: float) -> float | None:
    """``x`` as a JSON number: None for NaN or an infinity."""
    x = float(x)
    return x if np.isfinite(x) else None


# -- duplicates ---------------------------------------------------------------------------------------
def _episode_matrix(raw: RawDataset) -> np.ndarray:
    """Per-row standardised (s, a, r) used to compare episodes."""
    n = raw.num_transitions
    cols = [raw.observations.reshape(n, -1), raw.actions.reshape(n, -1), raw.rewards.reshape(n, 1)]
    x = np.concatenate([c.astype(np.float32) for c in cols], 1)
    mean, std = x.mean(0), x.std(0)
    return ((x - mean) / np.where(std > 0, std, 1.0)).astype(np.float32)


def duplicates(raw: RawDataset, top: int, tol: float = DUPLICATE_TOL, points: int = 8) -> dict[str, Any]:
    """Identical or near-identical episodes: among episodes of equal length, the nearest pairs by a
    signature (``points`` evenly spaced rows of standardised s, a, r), then each candidate pair compared
    row by row; a pair is a duplicate when no value differs by more than ``tol`` standard deviations.
    Reports the duplicate pairs, and the ``top`` closest pairs of any kind."""
    x = _episode_matrix(raw)
    starts, ends = raw.episode_starts, raw.episode_ends
    lengths = ends - starts
    candidates: list[tuple[float, int, int]] = []
    for length in np.unique(lengths):
        eps = np.flatnonzero(lengths == length)
        if eps.size < 2:
            continue
        pos = np.round(np.linspace(0, length - 1, min(points, int(length)))).astype(np.int64)
        sig = torch.from_numpy(x[(starts[eps][:, None] + pos[None, :]).reshape(-1)].reshape(eps.size, -1))
        for s in range(0, eps.size, 2048):
            d = torch.cdist(sig[s : s + 2048], sig)
            d[torch.arange(d.shape[0]), torch.arange(s, s + d.shape[0])] = float("inf")
            k = min(2, eps.size - 1)
            vals, idx = d.topk(k, largest=False)
            for i in range(d.shape[0]):
                for v, j in zip(vals[i].tolist(), idx[i].tolist()):
                    a, b = int(eps[s + i]), int(eps[j])
                    candidates.append((v, min(a, b), max(a, b)))
    seen: set[tuple[int, int]] = set()
    pairs: list[dict[str, Any]] = []
    for v, a, b in sorted(candidates):
        if (a, b) in seen:
            continue
        seen.add((a, b))
        diff = float(np.abs(x[starts[a] : ends[a]] - x[starts[b] : ends[b]]).max())
        pairs.append(
            {"episodes": [a, b], "max_abs_diff": diff, "duplicate": diff <= tol, "exact": diff == 0.0}
        )
        if len(pairs) >= max(top, 64) and v > tol * 100:
            break
    pairs.sort(key=lambda p: p["max_abs_diff"])
    dup = [p for p in pairs if p["duplicate"]]
    return {"tolerance": tol, "count": len(dup), "pairs": dup, "closest": pairs[:top]}


# -- coverage -------------------------------------------------------------------------------------------
def _hist(v: np.ndarray, bins: int = 30) -> dict[str, Any]:
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {"edges": [], "counts": []}
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        hi = lo + 1e-6
    counts, edges = np.histogram(v, bins=bins, range=(lo, hi))
    return {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]}


def coverage(raw: RawDataset) -> dict[str, Any]:
    n = raw.num_transitions
    obs = raw.observations.reshape(n, -1)
    states = []
    for j in range(obs.shape[1]):
        v = obs[:, j].astype(np.float64)
        states.append(
            {
                "dim": j,
                "min": float(v.min()),
                "p01": float(np.quantile(v, 0.01)),
                "mean": float(v.mean()),
                "p99": float(np.quantile(v, 0.99)),
                "max": float(v.max()),
                "histogram": _hist(v),
            }
        )
    out: dict[str, Any] = {"states": states}
    space = raw.action_space
    if isinstance(space, gym.spaces.Discrete):
        idx = raw.actions.astype(np.int64).reshape(n) - int(space.start)
        counts = np.bincount(idx, minlength=int(space.n))
        out["actions"] = {
            "kind": "discrete",
            "counts": [int(c) for c in counts],
            "share": [float(c / n) for c in counts],
            "unused": [int(space.start) + i for i in np.flatnonzero(counts == 0)],
            "used_share": float((counts > 0).mean()),
        }
    else:
        assert isinstance(space, gym.spaces.Box)
        acts = raw.actions.reshape(n, -1).astype(np.float64)
        low = np.asarray(space.low, dtype=np.float64).reshape(-1)
        high = np.asarray(space.high, dtype=np.float64).reshape(-1)
        dims = []
        for j in range(acts.shape[1]):
            v = acts[:, j]
            d: dict[str, Any] = {
                "dim": j,
                "low": json_number(low[j]),
                "high": json_number(high[j]),
                "histogram": _hist(v),
            }
            if np.isfinite(low[j]) and np.isfinite(high[j]) and high[j] > low[j]:
                width = high[j] - low[j]
                counts, _ = np.histogram(v, bins=ACTION_BINS, range=(low[j], high[j]))
                d["used_share"] = float((counts >= USED_BIN_SHARE * n).mean())
                d["at_low"] = float((v <= low[j] + BOUND_TOL * width).mean())
                d["at_high"] = float((v >= high[j] - BOUND_TOL * width).mean())
            dims.append(d)
        out["actions"] = {
            "kind": "box",
            "dims": dims,
            "bins": ACTION_BINS,
            "used_bin_min_share": USED_BIN_SHARE,
        }
    out["by_policy"] = by_policy(raw)
    return out


def by_policy(raw: RawDataset) -> list[dict[str, Any]]:
    """Return and length distributions per behaviour policy (``episode_policy_ids``), or [] without them."""
    ids = raw.episode_policy_ids
    if ids is None or ids.shape[0] != raw.num_episodes:
        return []
    cums = np.concatenate([[0.0], np.cumsum(raw.rewards.astype(np.float64))])
    returns = cums[raw.episode_ends] - cums[raw.episode_starts]
    lengths = raw.episode_ends - raw.episode_starts
    out = []
    for pid in np.unique(ids):
        m = ids == pid
        desc = raw.policies[int(pid)] if 0 <= int(pid) < len(raw.policies) else "unknown"
        r, ln = returns[m], lengths[m]
        out.append(
            {
                "policy_id": int(pid),
                "policy": desc if isinstance(desc, str) else str(desc),
                "episodes": int(m.sum()),
                "return_mean": float(r.mean()),
                "return_std": float(r.std()),
                "return_min": float(r.min()),
                "return_max": float(r.max()),
                "length_mean": float(ln.mean()),
                "length_min": int(ln.min()),
                "length_max": int(ln.max()),
                "returns": r,  # kept for plots; dropped from JSON
                "lengths": ln,
            }
        )
    return out
