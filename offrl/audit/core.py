"""``offrl audit``: put the model scores, the rule-based checks and coverage together into one report,
and write cleaned copies that drop whole episodes.

The report is a plain dict (JSON-ready through :meth:`Audit.to_json`): transitions are named by row
index, episodes by episode index (their order in the file, from 0).
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

from offrl.audit import checks
from offrl.audit.model import ModelConfig, ModelResult, fit_and_score
from offrl.data import format as fmt
from offrl.errors import OfflineRLError


@dataclass
class Audit:
    """The audit of one dataset: ``report`` (JSON-ready apart from numpy arrays under ``_``-keys, which
    :meth:`to_json` drops) and the per-row arrays the pictures are drawn from."""

    raw: fmt.RawDataset
    report: dict[str, Any]
    model: ModelResult
    episode_score: np.ndarray  # (E,) mean transition score
    episode_median: np.ndarray  # (E,) median transition score
    jump_score: np.ndarray  # (N,) worst robust z of a step change
    rollout: dict[str, Any] | None = None
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return _strip(self.report)


def _strip(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {
            k: _strip(v) for k, v in obj.items() if not isinstance(v, np.ndarray) and not k.startswith("_")
        }
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    return obj


def _episode_stats(raw: fmt.RawDataset, score: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    starts, ends = raw.episode_starts, raw.episode_ends
    cums = np.concatenate([[0.0], np.cumsum(score.astype(np.float64))])
    mean = (cums[ends] - cums[starts]) / (ends - starts)
    median = np.array([np.median(score[s:e]) for s, e in zip(starts, ends)])
    worst = np.maximum.reduceat(score, starts) if score.size else np.zeros(0)
    return mean, median, worst


def _rows(raw: fmt.RawDataset, order: np.ndarray, model: ModelResult) -> list[dict[str, Any]]:
    return [
        {
            "row": int(r),
            "episode": int(checks.episode_of(raw, r)),
            "score": float(model.score[r]),
            "reward_z2": float(model.reward_z2[r]),
            "dynamics_score": float(model.dynamics_score[r]),
            "reward": float(raw.rewards[r]),
        }
        for r in order
    ]


def audit(
    source: str | os.PathLike[str] | fmt.RawDataset,
    *,
    top: int = 10,
    model_config: ModelConfig | None = None,
) -> Audit:
    """Audit a dataset file (checked as by ``offrl validate``) or an in-memory dataset."""
    if top < 1:
        raise OfflineRLError(f"--top must be ≥ 1, got {top}")
    raw = source if isinstance(source, fmt.RawDataset) else fmt.load_checked(source)
    if not isinstance(raw.observation_space, gym.spaces.Box):
        raise OfflineRLError(f"{raw.path}: the audit reads Box observations")
    t0 = time.perf_counter()
    cfg = model_config or ModelConfig()
    model = fit_and_score(raw, cfg)
    ep_mean, ep_median, ep_worst = _episode_stats(raw, model.score)
    starts, ends = raw.episode_starts, raw.episode_ends
    cums = np.concatenate([[0.0], np.cumsum(raw.rewards.astype(np.float64))])
    returns = cums[ends] - cums[starts]

    def episodes(order: np.ndarray) -> list[dict[str, Any]]:
        return [
            {
                "episode": int(e),
                "rows": [int(starts[e]), int(ends[e])],
                "score": float(ep_mean[e]),
                "median": float(ep_median[e]),
                "worst_transition": float(ep_worst[e]),
                "length": int(ends[e] - starts[e]),
                "return": float(returns[e]),
            }
            for e in order
        ]

    jumps = checks.observation_jumps(raw, top)
    t_checks = time.perf_counter()
    dup = checks.duplicates(raw, top)
    report: dict[str, Any] = {
        "dataset": str(raw.path),
        "env_id": raw.env_id,
        "transitions": raw.num_transitions,
        "episodes": raw.num_episodes,
        "top": top,
        "model": {
            "kind": "cross-fitted one-step dynamics+reward MLP ensemble (held-out prediction error)",
            "members": cfg.members,
            "hidden": [cfg.hidden] * cfg.layers,
            "steps": cfg.steps,
            "batch_size": cfg.batch_size,
            "seed": cfg.seed,
            "fit_seconds": round(model.fit_seconds, 3),
            "score": "mean over targets (s′−s dims, reward) of the squared held-out residual in robust units; ≈1 typical",
        },
        "anomalies": {
            "score_quantiles": {
                q: float(np.quantile(model.score, float(q))) for q in ("0.5", "0.9", "0.99", "0.999")
            },
            "top_transitions": _rows(raw, checks.top_k(model.score, top), model),
            "top_reward_residuals": _rows(raw, checks.top_k(model.reward_z2, top), model),
            "top_dynamics_residuals": _rows(raw, checks.top_k(model.dynamics_score, top), model),
            "top_episodes": episodes(checks.top_k(ep_mean, top)),
            "top_episodes_by_median": episodes(checks.top_k(ep_median, top)),
        },
        "flags": {
            "reward_outliers": checks.reward_outliers(raw, top),
            "observation_jumps": jumps,
            "outside_observation_space": checks.outside_space(raw, top),
        },
        "duplicates": dup,
        "coverage": checks.coverage(raw),
        "consistency": {
            "r2": {name: checks.json_number(v) for name, v in zip(model.target_names, model.r2)},
            "r2_mean_dynamics": checks.json_number(np.nanmean(model.r2[:-1]))
            if np.isfinite(model.r2[:-1]).any()
            else None,
            "r2_reward": checks.json_number(model.r2[-1]),
            "folds": cfg.members,
            "note": "held-out R² of s′−s and r predicted from (s, a) by models that never saw those episodes",
        },
    }
    report["timing"] = {
        "model_seconds": round(model.fit_seconds, 3),
        "checks_seconds": round(time.perf_counter() - t_checks + (t_checks - t0 - model.fit_seconds), 3),
        "total_seconds": round(time.perf_counter() - t0, 3),
    }
    return Audit(raw, report, model, ep_mean, ep_median, jumps["score"])


# -- dropping anomalous episodes ------------------------------------------------------------------------
def parse_drop(value: str) -> int | float:
    """``--drop-anomalies``: an integer K (drop the K highest-scoring episodes) or a number with a point
    or an exponent, a THRESHOLD (drop episodes whose score exceeds it)."""
    text = value.strip()
    try:
        if text.isdigit():
            return int(text)
        threshold = float(text)
    except ValueError:
        raise OfflineRLError(
            f"--drop-anomalies {value!r}: give an episode count K (e.g. 5) or a score threshold (e.g. 20.0)"
        ) from None
    if not np.isfinite(threshold) or threshold < 0:
        raise OfflineRLError(f"--drop-anomalies {value!r}: a threshold must be a finite number ≥ 0")
    return threshold


def episodes_to_drop(result: Audit, rule: int | float) -> list[int]:
    score = result.episode_score
    if isinstance(rule, int):
        if rule >= result.raw.num_episodes:
            raise OfflineRLError(
                f"--drop-anomalies {rule}: the dataset has {result.raw.num_episodes} episodes; dropping "
                f"{rule} would leave none"
            )
        return sorted(int(e) for e in checks.top_k(score, rule)) if rule else []
    return sorted(int(e) for e in np.flatnonzero(score > rule))


def reasons(result: Audit, dropped: list[int]) -> list[dict[str, Any]]:
    """Why each dropped episode goes: its score and rank, and every flag raised inside it."""
    raw, rep = result.raw, result.report
    rank = np.empty(raw.num_episodes, dtype=np.int64)
    rank[np.argsort(-result.episode_score, kind="stable")] = np.arange(raw.num_episodes)
    flags: dict[int, list[str]] = {e: [] for e in dropped}
    for key, label in (("reward_outliers", "reward outlier"), ("observation_jumps", "observation jump")):
        for r in rep["flags"][key]["rows"]:
            if r["episode"] in flags:
                flags[r["episode"]].append(f"{label} at row {r['row']}")
    for r in rep["flags"]["outside_observation_space"]["rows"]:
        if r["episode"] in flags:
            flags[r["episode"]].append(f"observation outside the declared space at row {r['row']}")
    for p in rep["duplicates"]["pairs"]:
        a, b = p["episodes"]
        if b in flags:
            flags[b].append(f"{'identical to' if p['exact'] else 'near-identical to'} episode {a}")
    starts, ends = raw.episode_starts, raw.episode_ends
    return [
        {
            "episode": e,
            "rows": [int(starts[e]), int(ends[e])],
            "score": float(result.episode_score[e]),
            "rank": int(rank[e]) + 1,
            "why": [
                f"anomaly score {result.episode_score[e]:.4g} (rank {int(rank[e]) + 1} of {raw.num_episodes})"
            ]
            + flags[e],
        }
        for e in dropped
    ]


def subset_episodes(raw: fmt.RawDataset, keep: np.ndarray) -> fmt.RawDataset:
    """The dataset restricted to the episodes where ``keep`` (E,) is True, rows and episode index intact."""
    starts, ends = raw.episode_starts, raw.episode_ends
    lengths = ends - starts
    row_keep = np.repeat(keep, lengths)

    def rows(a: np.ndarray | None) -> Any:
        return None if a is None else a[row_keep]

    return dataclasses.replace(
        raw,
        observations=raw.observations[row_keep],
        actions=raw.actions[row_keep],
        rewards=raw.rewards[row_keep],
        next_observations=raw.next_observations[row_keep],
        terminals=raw.terminals[row_keep],
        timeouts=raw.timeouts[row_keep],
        episode_ends=np.cumsum(lengths[keep]).astype(np.int64),
        action_log_probs=rows(raw.action_log_probs),
        episode_policy_ids=None if raw.episode_policy_ids is None else raw.episode_policy_ids[keep],
        infos={k: v[row_keep] for k, v in raw.infos.items()},
    )


def write_clean(
    result: Audit, rule: int | float, out: str | os.PathLike[str], rule_text: str
) -> dict[str, Any]:
    """Write the dataset without the episodes ``rule`` selects (atomically, with the project's writer);
    the file's metadata records what was removed and why under ``audit_cleaning``."""
    from offrl.data.writer import write_raw
    from offrl.utils import file_sha256

    raw = result.raw
    dropped = episodes_to_drop(result, rule)
    keep = np.ones(raw.num_episodes, dtype=bool)
    keep[dropped] = False
    clean = subset_episodes(raw, keep)
    record = {
        "source": str(raw.path),
        "source_sha256": file_sha256(raw.path) if Path(raw.path).is_file() else None,
        "rule": (
            f"drop the {rule} highest-scoring episodes"
            if isinstance(rule, int)
            else f"drop episodes scoring above {rule}"
        ),
        "argument": rule_text,
        "score": result.report["model"]["score"],
        "model": {k: result.report["model"][k] for k in ("kind", "members", "hidden", "steps", "seed")},
        "dropped_episodes": len(dropped),
        "dropped_transitions": int(raw.num_transitions - clean.num_transitions),
        "kept_episodes": int(keep.sum()),
        "removed": reasons(result, dropped),
    }
    clean.metadata = {**raw.metadata, "audit_cleaning": record}
    write_raw(clean, out)
    return record


# -- a policy's visited states against the data ---------------------------------------------------------
class _Watching:
    """A policy seen through evaluation: passes actions through, keeps every observation it acted on and
    carries the monitor evaluation scores them with."""

    def __init__(self, policy: Any, monitor: Any) -> None:
        self.policy, self.ood_monitor = policy, monitor
        self.observation_space = getattr(policy, "observation_space", None)
        self.action_space = getattr(policy, "action_space", None)
        self.is_stochastic = getattr(policy, "is_stochastic", False)
        self.seen: list[np.ndarray] = []

    def __repr__(self) -> str:
        return repr(self.policy)

    def act(self, obs: np.ndarray, *, deterministic: bool = True) -> np.ndarray:
        self.seen.append(np.array(obs, dtype=np.float32).reshape(len(obs), -1))
        return np.asarray(self.policy.act(obs, deterministic=deterministic))


def policy_rollout(
    result: Audit,
    policy_path: str | os.PathLike[str],
    env_id: str | None,
    *,
    episodes: int = 10,
    seed: int = 0,
) -> dict[str, Any]:
    """Roll the policy out in ``env_id`` (default: the one its artefact records) and compare the states
    it visits with the dataset's: the share above the OOD threshold (the policy's own monitor, or one
    fitted here on the dataset when the policy carries none) and the share outside the data's range
    per state dimension. Sets ``result.rollout`` (the pictures draw it) and the report's
    ``policy_rollout``."""
    from offrl.audit.ood import fit_monitor
    from offrl.evaluation import evaluate
    from offrl.policies.artifact import find_artifact, load_policy, read_policy_json

    folder = find_artifact(Path(policy_path))
    meta = read_policy_json(folder)
    env = env_id or meta.get("env_id") or result.raw.env_id
    if not env:
        raise OfflineRLError(
            f"{policy_path}: neither the policy nor the dataset names an environment; give --env ENV"
        )
    policy = load_policy(folder, seed=seed)
    monitor = policy.ood_monitor
    source = "the policy's own"
    if monitor is None:
        monitor, _ = fit_monitor(result.raw.observations, result.raw.episode_ends, seed=seed)
        source = "fitted here on the dataset (the policy carries no monitor)"
        if monitor is None:
            raise OfflineRLError(f"{result.raw.path}: observations too wide for an OOD monitor")
    watch = _Watching(policy, monitor)
    ev = evaluate(watch, env, episodes=episodes, seed=seed)
    states = np.concatenate(watch.seen)
    n = result.raw.num_transitions
    obs = result.raw.observations.reshape(n, -1)
    lo, hi = obs.min(0), obs.max(0)
    outside = ((states < lo) | (states > hi)).mean(0)
    scores = monitor.score(states)
    report = {
        "policy": str(policy_path),
        "env": env,
        "episodes": episodes,
        "states": int(states.shape[0]),
        "return_mean": ev.mean,
        "monitor": f"{source}: {monitor.summary()}",
        "threshold": monitor.threshold,
        "quantile": float(monitor.info.get("quantile", 0.99)),
        "ood_fraction": float((scores > monitor.threshold).mean()),
        "episode_mean_scores": ev.ood_episode_means,
        "outside_range_share": [float(v) for v in outside],
    }
    result.rollout = {"states": states, "scores": scores}
    result.report["policy_rollout"] = report
    return report
