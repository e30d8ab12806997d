"""Importance-sampling estimates of a target policy's γ-discounted return from logged episodes.

With per-step ratios ρ_t = π(a_t|s_t) / μ(a_t|s_t) (μ: the behaviour policy, whose log-probabilities the
dataset stores) and cumulative weights w_t = ρ_0 ⋯ ρ_t, over n logged episodes:

* IS (trajectory-wise, Precup et al. 2000): (1/n) Σ_i w_{i,T_i} G_i with G_i = Σ_t γ^t r_{i,t};
* WIS: the same with the trajectory weights normalised to sum to one (biased, far lower variance);
* PDIS (per-decision): (1/n) Σ_i Σ_t γ^t w_{i,t} r_{i,t}; a reward is weighted only by the actions before it;
* DR (doubly robust, Jiang & Li 2016, per-decision form): with a model Q̂ and V̂(s) = E_{a∼π} Q̂(s, a),
  (1/n) Σ_i Σ_t γ^t [w_{i,t} (r_{i,t} − Q̂(s_t, a_t)) + w_{i,t−1} V̂(s_t)], w_{i,−1} = 1.

All are unbiased for (or, WIS, consistent for) the return over the logged horizon: each episode counts as
complete where it ends. Weights are accumulated in log space and per episode with vectorised cumulative sums.
"""

from __future__ import annotations

import numpy as np

from offrl.data.dataset import TransitionDataset
from offrl.errors import OfflineRLError
from offrl.types import Policy

_CHUNK = 65_536  # rows per call into the target policy


def episode_layout(episode_ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Episode index and step index within the episode of every row: ``(N,)``, ``(N,)``."""
    ends = np.asarray(episode_ends, dtype=np.int64).reshape(-1)
    starts = np.concatenate([[0], ends[:-1]])
    episode = np.repeat(np.arange(ends.size), ends - starts)
    return episode, np.arange(episode.size) - starts[episode]


def cumsum_per_episode(x: np.ndarray, episode_ends: np.ndarray) -> np.ndarray:
    """Cumulative sums of ``x`` (N,) that restart at every episode start (float64)."""
    total = np.cumsum(np.asarray(x, dtype=np.float64))
    ends = np.asarray(episode_ends, dtype=np.int64).reshape(-1)
    episode, _ = episode_layout(ends)
    before = np.concatenate([[0.0], total])[np.concatenate([[0], ends[:-1]])]  # sum before each start
    return total - before[episode]


def cumulative_log_weights(log_ratios: np.ndarray, episode_ends: np.ndarray) -> np.ndarray:
    """log w_t = Σ_{t′≤t} log ρ_t′ within each episode, (N,); −inf from the first action π cannot take."""
    lr = np.asarray(log_ratios, dtype=np.float64).reshape(-1)
    bad = np.flatnonzero(np.isnan(lr) | np.isposinf(lr))
    if bad.size:
        raise OfflineRLError(
            f"log importance ratio at row {int(bad[0])} is {lr[bad[0]]}: expected a number or -inf"
        )
    impossible = np.isneginf(lr)
    out = cumsum_per_episode(np.where(impossible, 0.0, lr), episode_ends)
    # −inf cannot go through the cumulative sum (−inf − −inf is NaN): count impossible steps instead
    out[cumsum_per_episode(impossible, episode_ends) > 0] = -np.inf
    return out


def discounted_returns(rewards: np.ndarray, episode_ends: np.ndarray, gamma: float) -> np.ndarray:
    """G_i = Σ_t γ^t r_{i,t} of every episode, (E,) float64."""
    _, t = episode_layout(episode_ends)
    disc = np.asarray(rewards, dtype=np.float64).reshape(-1) * np.power(gamma, t)
    return np.add.reduceat(disc, np.concatenate([[0], np.asarray(episode_ends)[:-1]]))


def _trajectory_log_weights(log_ratios: np.ndarray, episode_ends: np.ndarray) -> np.ndarray:
    return cumulative_log_weights(log_ratios, episode_ends)[np.asarray(episode_ends, dtype=np.int64) - 1]


def effective_sample_size(log_weights: np.ndarray) -> float:
    """(Σw)² / Σw² of weights given as logs: n for equal weights, 1 when one weight dominates, 0 if all are 0."""
    lw = np.asarray(log_weights, dtype=np.float64).reshape(-1)
    top = lw.max(initial=-np.inf)
    if not np.isfinite(top):
        return 0.0
    w = np.exp(lw - top)  # scale-free, so shift by the largest to avoid overflow
    return float(w.sum() ** 2 / (w * w).sum())


def importance_sampling(
    rewards: np.ndarray, log_ratios: np.ndarray, episode_ends: np.ndarray, gamma: float
) -> float:
    """Trajectory-wise IS: the mean of w_i G_i over episodes."""
    w = np.exp(_trajectory_log_weights(log_ratios, episode_ends))
    return float(np.mean(w * discounted_returns(rewards, episode_ends, gamma)))


def weighted_importance_sampling(
    rewards: np.ndarray, log_ratios: np.ndarray, episode_ends: np.ndarray, gamma: float
) -> float:
    """Weighted IS: Σ w_i G_i / Σ w_i (NaN when every weight is zero)."""
    lw = _trajectory_log_weights(log_ratios, episode_ends)
    top = lw.max(initial=-np.inf)
    if not np.isfinite(top):
        return float("nan")
    w = np.exp(lw - top)
    return float(np.sum(w * discounted_returns(rewards, episode_ends, gamma)) / w.sum())


def per_decision_importance_sampling(
    rewards: np.ndarray, log_ratios: np.ndarray, episode_ends: np.ndarray, gamma: float
) -> float:
    """PDIS: (1/n) Σ_i Σ_t γ^t w_{i,t} r_{i,t}."""
    ends = np.asarray(episode_ends, dtype=np.int64)
    _, t = episode_layout(ends)
    w = np.exp(cumulative_log_weights(log_ratios, ends))
    r = np.asarray(rewards, dtype=np.float64).reshape(-1)
    return float(np.sum(np.power(gamma, t) * w * r) / ends.size)


def doubly_robust(
    rewards: np.ndarray,
    log_ratios: np.ndarray,
    episode_ends: np.ndarray,
    gamma: float,
    q_values: np.ndarray,
    state_values: np.ndarray,
) -> float:
    """Per-decision DR with model values Q̂(s_t, a_t) and V̂(s_t) at every logged row (N,), (N,)."""
    ends = np.asarray(episode_ends, dtype=np.int64)
    _, t = episode_layout(ends)
    lw = cumulative_log_weights(log_ratios, ends)
    lw_before = np.where(t == 0, 0.0, np.roll(lw, 1))  # w_{t−1}, with w_{−1} = 1 at episode starts
    r = np.asarray(rewards, dtype=np.float64).reshape(-1)
    q = np.asarray(q_values, dtype=np.float64).reshape(-1)
    v = np.asarray(state_values, dtype=np.float64).reshape(-1)
    if q.shape != r.shape or v.shape != r.shape:
        raise OfflineRLError(
            f"doubly robust: {r.size} rewards but {q.size} Q-values and {v.size} state values"
        )
    terms = np.exp(lw) * (r - q) + np.exp(lw_before) * v
    return float(np.sum(np.power(gamma, t) * terms) / ends.size)


def policy_log_ratios(policy: Policy, dataset: TransitionDataset) -> np.ndarray:
    """log π(a_t|s_t) − log μ(a_t|s_t) at every row of ``dataset``, (N,) float64.

    Raises ``OfflineRLError`` when the dataset has no behaviour log-probabilities or the policy is
    deterministic: importance sampling cannot run then, FQE still can.
    """
    if dataset.action_log_probs is None:
        raise OfflineRLError(
            f"{dataset.path}: no 'action_log_probs' (the behaviour policy's log-probabilities were not "
            "recorded), so importance sampling (is, wis, pdis, dr) cannot run; FQE still works"
        )
    log_prob = getattr(policy, "log_prob", None)
    if not getattr(policy, "is_stochastic", False) or not callable(log_prob):
        raise OfflineRLError(
            f"target policy {policy!r} is deterministic: its importance weights are zero for every other "
            "action (and undefined for continuous actions), so importance sampling (is, wis, pdis, dr) "
            "cannot run; FQE still works"
        )
    behaviour = dataset.action_log_probs.double().cpu().numpy()
    bad = np.flatnonzero(~np.isfinite(behaviour))
    if bad.size:
        raise OfflineRLError(
            f"{dataset.path}: 'action_log_probs' row {int(bad[0])} is {behaviour[bad[0]]}: the logged action "
            "must have a positive probability under the behaviour policy"
        )
    obs = dataset.observations.cpu().numpy()
    actions = dataset.actions.cpu().numpy()
    if dataset.discrete:  # TransitionDataset holds 0-based indices; policies speak the env's own
        actions = actions + int(getattr(dataset.action_space, "start", 0))
    target = np.concatenate(
        [
            np.asarray(log_prob(obs[i : i + _CHUNK], actions[i : i + _CHUNK]), dtype=np.float64).reshape(-1)
            for i in range(0, len(dataset), _CHUNK)
        ]
    )
    if target.shape != behaviour.shape:
        raise OfflineRLError(
            f"target policy {policy!r} returned {target.size} log-probabilities for {behaviour.size} rows"
        )
    return target - behaviour
