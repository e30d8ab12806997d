"""Off-policy evaluation of several policies on one dataset, side by side with their true values from
the environment when it is available: the library side of ``offrl ope``.

Every estimate is of the γ-discounted return Σ_t γ^t r_t from the dataset's initial states; the true value
is its Monte-Carlo mean over seeded episodes of the policy in the dataset's environment (same reset
distribution). A stochastic policy is evaluated as the distribution it samples from (``scripted:cartpole-eps0.3``
includes its 30% random actions); ``greedy=True`` evaluates every policy by its deterministic action instead,
as ``offrl evaluate`` does, which leaves only FQE applicable.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from offrl.data.dataset import TransitionDataset
from offrl.datasets_registry import resolve_dataset
from offrl.errors import OfflineRLError
from offrl.evaluation import check_policy_spaces, episode_seed
from offrl.ope import importance as imp
from offrl.ope import metrics
from offrl.ope.fqe import FQE, FQEConfig, FQEResult
from offrl.policies import resolve_policy
from offrl.types import Policy

METHODS = ("fqe", "is", "wis", "pdis", "dr")
IS_METHODS = ("is", "wis", "pdis", "dr")  # need behaviour log-probabilities and a stochastic target


def parse_methods(values: Sequence[str] | None) -> tuple[str, ...] | None:
    """``--method`` values (repeated and/or comma lists) in canonical order; None when none are given."""
    if not values:
        return None
    chosen = {m.strip().lower() for v in values for m in v.split(",") if m.strip()}
    unknown = sorted(chosen - set(METHODS))
    if unknown:
        raise OfflineRLError(f"--method {', '.join(unknown)}: unknown; choose from {', '.join(METHODS)}")
    return tuple(m for m in METHODS if m in chosen)


class GreedyPolicy:
    """A policy's deterministic action only (what ``offrl evaluate`` runs by default)."""

    is_stochastic = False

    def __init__(self, policy: Policy) -> None:
        self.policy = policy

    def __repr__(self) -> str:
        return f"{self.policy!r} (greedy)"

    def act(self, obs: np.ndarray, *, deterministic: bool = True) -> np.ndarray:
        return self.policy.act(obs, deterministic=True)


# -- true values ------------------------------------------------------------------------------------
def discounted_returns_in_env(
    policy: Policy,
    env_id: str,
    gamma: float,
    episodes: int,
    seed: int = 0,
    *,
    num_envs: int = 8,
    env_kwargs: dict[str, Any] | None = None,
) -> np.ndarray:
    """Σ_t γ^t r_t of ``episodes`` seeded episodes (episode j reset with ``episode_seed(seed, j)``), (episodes,).

    The policy samples its actions when it is stochastic. Sub-env i runs episodes i, i + n, …, so short
    episodes are not over-represented (see :mod:`offrl.evaluation`).
    """
    if episodes < 1 or num_envs < 1:
        raise OfflineRLError(f"true value: episodes and num_envs must be ≥ 1, got {episodes} and {num_envs}")
    n = min(num_envs, episodes)
    deterministic = not getattr(policy, "is_stochastic", False)
    kwargs = dict(env_kwargs or {})
    # autoreset disabled: every episode starts from its own seed, as in offrl.evaluation
    envs = gym.vector.SyncVectorEnv(
        [lambda: gym.make(env_id, **kwargs) for _ in range(n)],
        autoreset_mode=gym.vector.AutoresetMode.DISABLED,
    )
    discrete = isinstance(envs.single_action_space, gym.spaces.Discrete)
    returns = np.zeros(episodes)
    discount = np.ones(n)
    current = np.arange(n)  # episode each sub-env runs; ≥ episodes once its quota is done
    try:
        obs, _ = envs.reset(seed=[episode_seed(seed, int(j)) for j in current])
        while (active := current < episodes).any():
            # idle sub-envs get actions too (their steps are discarded): simpler than a neutral action
            actions = np.asarray(policy.act(obs, deterministic=deterministic))
            if discrete:
                actions = actions.astype(np.int64).reshape(-1)
            obs, rewards, terminated, truncated, _ = envs.step(actions)
            returns[current[active]] += discount[active] * rewards[active]
            discount *= gamma
            done = terminated | truncated
            if done.any():
                current = np.where(done & active, current + n, current)
                discount[done] = 1.0
                seeds = [episode_seed(seed, int(j)) if j < episodes else None for j in current]
                obs, _ = envs.reset(seed=seeds, options={"reset_mask": done})
    finally:
        envs.close()
    return returns


def true_value(policy: Policy, env_id: str, gamma: float, episodes: int, seed: int = 0) -> float:
    """Monte-Carlo γ-discounted return of ``policy`` from ``env_id``'s initial states."""
    return float(discounted_returns_in_env(policy, env_id, gamma, episodes, seed).mean())


# -- estimates --------------------------------------------------------------------------------------
@dataclass
class PolicyReport:
    name: str
    estimates: dict[str, float] = field(default_factory=dict)  # method -> estimate
    skipped: dict[str, str] = field(default_factory=dict)  # method -> why it did not run
    ess: float | None = None  # effective sample size of the trajectory weights
    fqe: FQEResult | None = None
    true_value: float | None = None
    true_std_error: float | None = None


def estimate_policy(
    dataset: TransitionDataset,
    policy: Policy,
    name: str,
    methods: Sequence[str] | None = None,
    fqe_config: FQEConfig | None = None,
) -> PolicyReport:
    """Run ``methods`` (default: every applicable one) for one policy.

    Methods asked for explicitly must be applicable (``OfflineRLError`` otherwise); by default the
    importance-sampling family is skipped, with the reason, where it cannot run.
    """
    cfg = fqe_config or FQEConfig()
    wanted = tuple(methods) if methods is not None else METHODS
    report = PolicyReport(name)
    ratios = None
    if any(m in IS_METHODS for m in wanted):
        try:
            ratios = imp.policy_log_ratios(policy, dataset)
        except OfflineRLError as exc:
            if methods is not None:
                raise
            report.skipped.update(dict.fromkeys(IS_METHODS, str(exc)))
    model = None
    if "fqe" in wanted or ("dr" in wanted and ratios is not None):
        model = FQE(cfg, dataset, policy)
        report.fqe = model.fit()
        if "fqe" in wanted:
            report.estimates["fqe"] = report.fqe.estimate
    if ratios is not None:
        r = dataset.rewards.double().cpu().numpy()
        ends = dataset.episode_ends.numpy()
        g = cfg.gamma
        report.ess = imp.effective_sample_size(imp.cumulative_log_weights(ratios, ends)[ends - 1])
        with np.errstate(over="ignore", invalid="ignore"):  # huge weights overflow honestly to inf
            if "is" in wanted:
                report.estimates["is"] = imp.importance_sampling(r, ratios, ends, g)
            if "wis" in wanted:
                report.estimates["wis"] = imp.weighted_importance_sampling(r, ratios, ends, g)
            if "pdis" in wanted:
                report.estimates["pdis"] = imp.per_decision_importance_sampling(r, ratios, ends, g)
            if "dr" in wanted:
                assert model is not None
                q, v = model.values()
                report.estimates["dr"] = imp.doubly_robust(r, ratios, ends, g, q, v)
    return report


def selection_metrics(reports: Sequence[PolicyReport], methods: Sequence[str]) -> dict[str, dict[str, float]]:
    """Per method, over the policies with both an estimate and a true value: mean absolute error and,
    with two or more policies, Spearman's rank correlation and regret@1."""
    out: dict[str, dict[str, float]] = {}
    for m in methods:
        pairs = [
            (p.estimates[m], p.true_value)
            for p in reports
            if p.true_value is not None and m in p.estimates and math.isfinite(p.estimates[m])
        ]
        if not pairs:
            continue
        est, true = np.array([e for e, _ in pairs]), np.array([t for _, t in pairs])
        row = {
            "policies": float(len(pairs)),
            "mean_abs_error": float(metrics.absolute_errors(est, true).mean()),
        }
        if len(pairs) >= 2:
            row["spearman"] = metrics.spearman(est, true)
            row["regret@1"] = metrics.regret_at_k(est, true, 1)
        out[m] = row
    return out


@dataclass
class OPEReport:
    dataset: str
    env_id: str | None
    gamma: float
    num_episodes: int
    num_transitions: int
    has_log_probs: bool
    methods: tuple[str, ...]
    policies: list[PolicyReport]
    true_episodes: int
    metrics: dict[str, dict[str, float]]
    notes: list[str]

    def to_dict(self) -> dict[str, Any]:
        def clean(x: Any) -> Any:  # JSON has no NaN or infinity
            if isinstance(x, float) and not math.isfinite(x):
                return None
            if isinstance(x, dict):
                return {k: clean(v) for k, v in x.items()}
            if isinstance(x, (list, tuple)):
                return [clean(v) for v in x]
            return x

        out: dict[str, Any] = clean(dataclasses.asdict(self))
        return out

    def format(self) -> str:
        lines = [
            f"{self.dataset}: {self.num_episodes} episodes, {self.num_transitions} transitions, "
            f"γ = {self.gamma}, behaviour log-probabilities: {'yes' if self.has_log_probs else 'no'}"
        ]
        has_true = any(p.true_value is not None for p in self.policies)
        has_ess = any(p.ess is not None for p in self.policies)
        header = ["policy", *self.methods] + (["ess"] if has_ess else []) + (["true"] if has_true else [])
        rows = [header]
        for p in self.policies:
            row = [p.name] + [f"{p.estimates[m]:.2f}" if m in p.estimates else "–" for m in self.methods]
            if has_ess:
                row.append("–" if p.ess is None else f"{p.ess:.1f}")
            if has_true:
                row.append("–" if p.true_value is None else f"{p.true_value:.2f} ± {p.true_std_error:.2f}")
            rows.append(row)
        lines += _table(rows)
        if self.metrics:
            lines.append(f"\nagainst true values ({self.true_episodes} episodes each, ± one standard error):")
            mrows = [["method", "spearman", "regret@1", "mean |error|"]]
            for m, stats in self.metrics.items():
                mrows.append(
                    [m]
                    + [f"{stats[k]:.2f}" if k in stats else "–" for k in ("spearman", "regret@1")]
                    + [f"{stats['mean_abs_error']:.2f}"]
                )
            lines += _table(mrows)
        if self.notes:
            lines.append("")
            lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        for r in rows
    ]


def _check_compatible(policy: Policy, dataset: TransitionDataset, spec: str) -> None:
    check_policy_spaces(
        policy, dataset.observation_space, dataset.action_space, policy_name=spec, other="the dataset"
    )


def run_ope(
    dataset_path: str,
    policy_specs: Sequence[str],
    *,
    methods: Sequence[str] | None = None,
    fqe_config: FQEConfig | None = None,
    true_episodes: int = 100,
    seed: int = 0,
    device: str | torch.device = "cpu",
    greedy: bool = False,
) -> OPEReport:
    """Estimate every policy (run dir, artefact, ``scripted:NAME`` or ``random``) on the dataset, and its
    true value in the dataset's environment when it names one and ``true_episodes`` > 0."""
    if not policy_specs:
        raise OfflineRLError("ope: give at least one policy")
    if true_episodes < 0:
        raise OfflineRLError(f"--true-episodes must be ≥ 0, got {true_episodes}")
    cfg = fqe_config or FQEConfig(seed=seed)
    cfg.check()
    dataset = TransitionDataset.load(resolve_dataset(dataset_path), device)
    notes: list[str] = []
    if methods is not None and greedy and any(m in IS_METHODS for m in methods):
        raise OfflineRLError("--greedy evaluates deterministic policies: only fqe applies")
    reports = []
    for i, spec in enumerate(policy_specs):
        policy = resolve_policy(spec, dataset.observation_space, dataset.action_space, seed=seed + i)
        _check_compatible(policy, dataset, spec)
        if greedy:
            policy = GreedyPolicy(policy)
        report = estimate_policy(dataset, policy, spec, methods, cfg)
        if report.fqe is not None and report.fqe.passes >= 10:
            tail = report.fqe.history[-max(2, report.fqe.passes // 10) :]
            drift = abs(tail[-1] - tail[0])
            if drift > 0.05 * max(abs(tail[-1]), 1e-8):
                notes.append(
                    f"{spec}: the FQE estimate moved by {drift:.2f} over the last {len(tail)} passes; "
                    "more passes (--fqe-epochs) may change it"
                )
        if dataset.env_id and true_episodes > 0:
            returns = discounted_returns_in_env(
                policy, dataset.env_id, cfg.gamma, true_episodes, seed + 10_000
            )
            report.true_value = float(returns.mean())
            report.true_std_error = float(returns.std() / math.sqrt(returns.size))
        reports.append(report)
    skipped = {r.skipped[m] for r in reports for m in r.skipped}
    notes += [f"is, wis, pdis, dr skipped: {reason}" for reason in sorted(skipped)]
    if true_episodes > 0 and not dataset.env_id:
        notes.append(f"{dataset.path} names no environment: no true values")
    shown = (
        tuple(methods)
        if methods is not None
        else tuple(m for m in METHODS if any(m in r.estimates for r in reports))
    )
    return OPEReport(
        dataset=str(dataset.path),
        env_id=dataset.env_id,
        gamma=cfg.gamma,
        num_episodes=dataset.num_episodes,
        num_transitions=len(dataset),
        has_log_probs=dataset.action_log_probs is not None,
        methods=shown,
        policies=reports,
        true_episodes=true_episodes if dataset.env_id else 0,
        metrics=selection_metrics(reports, shown),
        notes=notes,
    )
