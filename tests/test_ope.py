"""Off-policy evaluation: importance-sampling estimators on hand-computed cases, FQE on MDPs with
closed-form values, DOPE metrics, true values in the environment, and the ``offrl ope`` command."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch

from offrl.cli import main
from offrl.data import format as fmt
from offrl.data.dataset import TransitionDataset
from offrl.data.recorder import record
from offrl.errors import OfflineRLError
from offrl.evaluation import evaluate
from offrl.losses import td_target
from offrl.ope import fqe as fqe_mod
from offrl.ope import importance as imp
from offrl.ope import metrics
from offrl.ope.fqe import FQEConfig, fit_fqe
from offrl.ope.run import discounted_returns_in_env, estimate_policy, parse_methods, true_value
from offrl.policies import RandomPolicy, resolve_policy

# -- tiny datasets and policies ---------------------------------------------------------------------


def _dataset(
    obs: list[list[float]],
    actions: Any,
    rewards: list[float],
    episode_ends: list[int],
    action_space: gym.Space,
    *,
    terminal: bool = True,
    log_probs: list[float] | None = None,
) -> TransitionDataset:
    """Episodes laid end to end; within an episode s′_t = s_{t+1}, the last s′ is its own observation."""
    o = np.asarray(obs, dtype=np.float32)
    nxt = o.copy()
    starts = [0, *episode_ends[:-1]]
    for s, e in zip(starts, episode_ends):
        nxt[s : e - 1] = o[s + 1 : e]
    ends_flag = np.zeros(len(rewards), dtype=bool)
    ends_flag[np.asarray(episode_ends) - 1] = True
    raw = fmt.RawDataset(
        path="mem.h5",
        observations=o,
        actions=np.asarray(actions),
        rewards=np.asarray(rewards, dtype=np.float32),
        next_observations=nxt,
        terminals=ends_flag & terminal,
        timeouts=ends_flag & (not terminal),
        episode_ends=np.asarray(episode_ends, dtype=np.int64),
        observation_space=gym.spaces.Box(-10.0, 10.0, (o.shape[1],), np.float32),
        action_space=action_space,
        action_log_probs=None if log_probs is None else np.asarray(log_probs, dtype=np.float32),
    )
    return TransitionDataset(raw)


class TablePolicy:
    """π(a = 1 | s) = p1[int(s[0])] over two actions: exact log-probabilities for hand computations."""

    is_stochastic = True

    def __init__(self, p1: list[float], seed: int = 0) -> None:
        self.p1 = np.asarray(p1, dtype=np.float64)
        self.rng = np.random.default_rng(seed)

    def __repr__(self) -> str:
        return f"table{self.p1.tolist()}"

    def _p(self, obs: np.ndarray) -> np.ndarray:
        return self.p1[np.asarray(obs)[:, 0].astype(int)]

    def act(self, obs: np.ndarray, *, deterministic: bool = True) -> np.ndarray:
        p = self._p(obs)
        if deterministic:
            return (p > 0.5).astype(np.int64)
        return (self.rng.random(p.shape) < p).astype(np.int64)

    def log_prob(self, obs: np.ndarray, actions: np.ndarray) -> np.ndarray:
        p = self._p(obs)
        with np.errstate(divide="ignore"):
            return np.log(np.where(np.asarray(actions).reshape(-1) == 1, p, 1.0 - p))


class ConstantPolicy:
    """Always the same action (deterministic): an index, or a one-dimensional Box action."""

    is_stochastic = False

    def __init__(self, action: float, discrete: bool = False) -> None:
        self.action, self.discrete = action, discrete

    def act(self, obs: np.ndarray, *, deterministic: bool = True) -> np.ndarray:
        if self.discrete:
            return np.full(obs.shape[0], int(self.action), dtype=np.int64)
        return np.full((obs.shape[0], 1), self.action, dtype=np.float32)


class UniformBoxPolicy:
    """Uniform actions on [low, high] (a stochastic Box policy whose mean is known)."""

    is_stochastic = True

    def __init__(self, low: float, high: float, seed: int = 0) -> None:
        self.low, self.high = low, high
        self.rng = np.random.default_rng(seed)

    def act(self, obs: np.ndarray, *, deterministic: bool = True) -> np.ndarray:
        if deterministic:
            return np.full((obs.shape[0], 1), (self.low + self.high) / 2, dtype=np.float32)
        return self.rng.uniform(self.low, self.high, (obs.shape[0], 1)).astype(np.float32)

    def log_prob(self, obs: np.ndarray, actions: np.ndarray) -> np.ndarray:
        return np.full(obs.shape[0], -math.log(self.high - self.low))


# -- importance sampling ----------------------------------------------------------------------------

# Three episodes of lengths 2, 1, 3 with per-step ratios ρ and γ = 0.5:
#   A: r = [1, 2],    ρ = [2, 0.5]     G = 1 + 0.5·2 = 2            w = 1,   per-step w = [2, 1]
#   B: r = [3],       ρ = [0.5]        G = 3                        w = 0.5, per-step w = [0.5]
#   C: r = [1, 1, 4], ρ = [1, 2, 0.5]  G = 1 + 0.5 + 0.25·4 = 2.5   w = 1,   per-step w = [1, 2, 1]
REWARDS = np.array([1.0, 2.0, 3.0, 1.0, 1.0, 4.0])
LOG_RATIOS = np.log([2.0, 0.5, 0.5, 1.0, 2.0, 0.5])
ENDS = np.array([2, 3, 6])


def test_importance_sampling_estimators_match_hand_computation() -> None:
    # IS = (1·2 + 0.5·3 + 1·2.5)/3 = 2;  WIS = 6 / (1 + 0.5 + 1) = 2.4
    assert imp.importance_sampling(REWARDS, LOG_RATIOS, ENDS, 0.5) == pytest.approx(2.0)
    assert imp.weighted_importance_sampling(REWARDS, LOG_RATIOS, ENDS, 0.5) == pytest.approx(2.4)
    # PDIS: A 2·1 + 0.5·1·2 = 3;  B 0.5·3 = 1.5;  C 1·1 + 0.5·2·1 + 0.25·1·4 = 3  → 7.5 / 3
    assert imp.per_decision_importance_sampling(REWARDS, LOG_RATIOS, ENDS, 0.5) == pytest.approx(2.5)
    np.testing.assert_allclose(imp.discounted_returns(REWARDS, ENDS, 0.5), [2.0, 3.0, 2.5])
    np.testing.assert_allclose(
        np.exp(imp.cumulative_log_weights(LOG_RATIOS, ENDS)), [2.0, 1.0, 0.5, 1.0, 2.0, 1.0]
    )


def test_effective_sample_size_hand_cases() -> None:
    # weights 1, 0.5, 1: (2.5)² / (1 + 0.25 + 1) = 6.25 / 2.25
    assert imp.effective_sample_size(np.log([1.0, 0.5, 1.0])) == pytest.approx(6.25 / 2.25)
    assert imp.effective_sample_size(np.zeros(7)) == pytest.approx(7.0)
    assert imp.effective_sample_size(np.array([0.0, -np.inf, -np.inf])) == pytest.approx(1.0)
    assert imp.effective_sample_size(np.full(3, -np.inf)) == 0.0
    # scale-free, and no overflow for weights far beyond float range
    assert imp.effective_sample_size(np.array([1000.0, 1000.0])) == pytest.approx(2.0)


def test_impossible_action_zeroes_later_weights_only() -> None:
    # A: ρ = [2, 0]: PDIS counts r0 with weight 2, then nothing: 2·1 = 2;  IS weight 0
    lr = np.array([math.log(2.0), -np.inf, 0.0])
    r = np.array([1.0, 2.0, 5.0])
    ends = np.array([2, 3])
    assert imp.per_decision_importance_sampling(r, lr, ends, 0.5) == pytest.approx((2.0 + 5.0) / 2)
    assert imp.importance_sampling(r, lr, ends, 0.5) == pytest.approx(5.0 / 2)
    assert imp.weighted_importance_sampling(r, lr, ends, 0.5) == pytest.approx(5.0)
    with pytest.raises(OfflineRLError, match="row 1"):
        imp.cumulative_log_weights(np.array([0.0, np.nan]), np.array([2]))


def test_on_policy_weights_are_one_and_estimates_equal_the_empirical_return() -> None:
    zero = np.zeros_like(REWARDS)
    mean_return = (2.0 + 3.0 + 2.5) / 3
    for est in (
        imp.importance_sampling,
        imp.weighted_importance_sampling,
        imp.per_decision_importance_sampling,
    ):
        assert est(REWARDS, zero, ENDS, 0.5) == pytest.approx(mean_return)
    assert imp.effective_sample_size(imp.cumulative_log_weights(zero, ENDS)[ENDS - 1]) == pytest.approx(3.0)


# The two-step MDP: s0 (obs 0) → s1 (obs 1) → end; two actions, reward = action, γ = 0.5.
# Behaviour μ(1|s) = 0.5; target π(1|s0) = 0.8, π(1|s1) = 0.2.
# V^π(s1) = 0.2, Q(s1, a) = a;  Q(s0, a) = a + 0.5·0.2 = a + 0.1, V^π(s0) = 0.8 + 0.1 = 0.9.
TARGET = TablePolicy([0.8, 0.2])


def _two_step(action_pairs: list[tuple[int, int]], log_probs: bool = True) -> TransitionDataset:
    actions = [a for pair in action_pairs for a in pair]
    n = len(actions)
    return _dataset(
        [[0.0], [1.0]] * len(action_pairs),
        np.asarray(actions, dtype=np.int64),
        [float(a) for a in actions],
        [2 * (i + 1) for i in range(len(action_pairs))],
        gym.spaces.Discrete(2),
        log_probs=[math.log(0.5)] * n if log_probs else None,
    )


def test_importance_sampling_is_exact_when_episodes_enumerate_the_behaviour() -> None:
    # Each of the 4 action sequences has μ-probability 1/4 and is logged once: Σ (π/μ)·G / 4 = E_π[G] = 0.9.
    ds = _two_step([(0, 0), (0, 1), (1, 0), (1, 1)])
    lr = imp.policy_log_ratios(TARGET, ds)
    # (1, 0): π = 0.8·0.8 = 0.64, μ = 0.25
    assert math.exp(lr[4] + lr[5]) == pytest.approx(0.64 / 0.25)
    r, ends = ds.rewards.double().numpy(), ds.episode_ends.numpy()
    assert imp.importance_sampling(r, lr, ends, 0.5) == pytest.approx(0.9)
    assert imp.per_decision_importance_sampling(r, lr, ends, 0.5) == pytest.approx(0.9)
    assert imp.weighted_importance_sampling(r, lr, ends, 0.5) == pytest.approx(0.9)


def test_doubly_robust_with_a_perfect_model_is_exact_even_from_one_episode() -> None:
    ds = _two_step([(1, 0)])
    lr = imp.policy_log_ratios(TARGET, ds)
    r, ends = ds.rewards.double().numpy(), ds.episode_ends.numpy()
    q = np.array([1.0 + 0.1, 0.0])  # Q(s0, 1), Q(s1, 0)
    v = np.array([0.9, 0.2])
    assert imp.doubly_robust(r, lr, ends, 0.5, q, v) == pytest.approx(0.9)
    # with a zero model DR is PDIS
    zero = np.zeros(2)
    assert imp.doubly_robust(r, lr, ends, 0.5, zero, zero) == pytest.approx(
        imp.per_decision_importance_sampling(r, lr, ends, 0.5)
    )


def test_importance_sampling_errors_say_what_is_missing_and_that_fqe_works() -> None:
    with pytest.raises(OfflineRLError, match=r"no 'action_log_probs'.*FQE still works"):
        imp.policy_log_ratios(TARGET, _two_step([(0, 1)], log_probs=False))
    greedy = resolve_policy("scripted:cartpole", gym.spaces.Box(-5, 5, (4,)), gym.spaces.Discrete(2))
    with pytest.raises(OfflineRLError, match=r"deterministic.*FQE still works"):
        imp.policy_log_ratios(greedy, _two_step([(0, 1)]))
    with pytest.raises(OfflineRLError, match="unknown"):
        parse_methods(["fqe,bogus"])
    assert parse_methods(["dr,is", "fqe"]) == ("fqe", "is", "dr")
    assert parse_methods(None) is None


def test_estimate_policy_skips_inapplicable_methods_by_default_and_refuses_when_asked() -> None:
    ds = _two_step([(0, 1), (1, 1)], log_probs=False)
    cfg = FQEConfig(gamma=0.5, epochs=1, hidden=(8,), batch_size=4)
    report = estimate_policy(ds, TARGET, "t", None, cfg)
    assert set(report.estimates) == {"fqe"}
    assert set(report.skipped) == {"is", "wis", "pdis", "dr"}
    assert "action_log_probs" in report.skipped["is"]
    with pytest.raises(OfflineRLError, match="action_log_probs"):
        estimate_policy(ds, TARGET, "t", ("wis",), cfg)


# -- FQE ------------------------------------------------------------------------------------------

# small and quick: γ ≤ 0.9 needs few Bellman backups, so a fast-moving target (τ = 0.5) converges in ~100 steps
FAST = {"hidden": (16, 16), "lr": 1e-2, "tau": 0.5, "batch_size": 200, "steps": 120}


def test_fqe_target_and_expectation_on_hand_values() -> None:
    r, term = torch.tensor([1.0, 2.0]), torch.tensor([0.0, 1.0])
    next_v = torch.tensor([[10.0, 10.0], [4.0, 4.0]])  # two members
    # 1 + 0.9·10 = 10, 2 + 0 = 2;  1 + 0.9·4 = 4.6
    torch.testing.assert_close(td_target(r, term, next_v, 0.9), torch.tensor([[10.0, 2.0], [4.6, 2.0]]))
    q = torch.tensor([[[1.0, 3.0], [2.0, 4.0]]])  # (E=1, B=2, A=2)
    probs = torch.tensor([[0.25, 0.75], [1.0, 0.0]])
    torch.testing.assert_close(fqe_mod.expected_value(q, probs), torch.tensor([[2.5, 2.0]]))


def _single_state_discrete(n: int = 400) -> TransitionDataset:
    # one state, uniform behaviour over two actions, reward = action, 20-step episodes cut by timeouts
    actions = np.random.default_rng(0).integers(0, 2, n)
    return _dataset(
        [[0.0]] * n,
        actions,
        actions.astype(float).tolist(),
        list(range(20, n + 1, 20)),
        gym.spaces.Discrete(2),
        terminal=False,
    )


def test_fqe_discrete_stochastic_target_continuing_single_state() -> None:
    # π(1) = 0.25: V = 0.25 / (1 − 0.5) = 0.5 (bootstrapping through the timeouts)
    ds = _single_state_discrete()
    _, result = fit_fqe(ds, TablePolicy([0.25]), FQEConfig(gamma=0.5, **FAST))
    assert result.estimate == pytest.approx(0.5, rel=0.03)
    assert result.passes == 60 and len(result.history) == result.passes


def test_fqe_discrete_deterministic_target_and_its_values_for_dr() -> None:
    # π always takes action 1: V = 1 / (1 − 0.5) = 2, Q(s, 0) = 0 + 0.5·2 = 1, Q(s, 1) = 2
    ds = _single_state_discrete()
    model, result = fit_fqe(ds, ConstantPolicy(1, discrete=True), FQEConfig(gamma=0.5, **FAST))
    assert result.estimate == pytest.approx(2.0, rel=0.03)
    q, v = model.values()
    actions = ds.actions.numpy()
    np.testing.assert_allclose(q, np.where(actions == 1, 2.0, 1.0), rtol=0.03)
    np.testing.assert_allclose(v, 2.0, rtol=0.03)


def test_fqe_continuous_chain_with_terminals() -> None:
    # states 0, 1, 2 then a terminal; reward 1 per step, γ = 0.9: V(s0) = 1 + 0.9 + 0.81 = 2.71
    n_eps = 60
    rng = np.random.default_rng(1)
    ds = _dataset(
        [[0.0], [1.0], [2.0]] * n_eps,
        rng.uniform(-2.0, 2.0, (3 * n_eps, 1)).astype(np.float32),
        [1.0] * (3 * n_eps),
        list(range(3, 3 * n_eps + 1, 3)),
        gym.spaces.Box(-2.0, 2.0, (1,), np.float32),
    )
    _, result = fit_fqe(ds, ConstantPolicy(1.0), FQEConfig(gamma=0.9, members=2, **FAST))
    assert result.estimate == pytest.approx(2.71, rel=0.03)
    assert len(result.member_estimates) == 2


def test_fqe_continuous_stochastic_target_averages_sampled_actions() -> None:
    # one state, reward = action ∈ [−2, 2]; π uniform on [0, 2] has mean 1: V = 1 / (1 − 0.5) = 2
    n = 400
    acts = np.random.default_rng(2).uniform(-2.0, 2.0, (n, 1)).astype(np.float32)
    ds = _dataset(
        [[0.0]] * n,
        acts,
        acts[:, 0].tolist(),
        list(range(20, n + 1, 20)),
        gym.spaces.Box(-2.0, 2.0, (1,), np.float32),
        terminal=False,
    )
    _, result = fit_fqe(ds, UniformBoxPolicy(0.0, 2.0), FQEConfig(gamma=0.5, **FAST))
    assert result.estimate == pytest.approx(2.0, rel=0.03)


def test_fqe_is_deterministic_for_a_seed_and_checks_its_config() -> None:
    ds = _single_state_discrete(100)
    cfg = FQEConfig(gamma=0.5, hidden=(8,), epochs=2, batch_size=32)
    assert fit_fqe(ds, TARGET, cfg)[1].history == fit_fqe(ds, TARGET, cfg)[1].history
    with pytest.raises(OfflineRLError, match="gamma"):
        fit_fqe(ds, TARGET, FQEConfig(gamma=1.0))


# -- metrics --------------------------------------------------------------------------------------


def test_average_ranks_and_spearman_with_ties() -> None:
    np.testing.assert_array_equal(metrics.average_ranks([10, 30, 20, 20]), [1.0, 4.0, 2.5, 2.5])
    assert metrics.spearman([1, 2, 3, 4], [10, 20, 30, 45]) == pytest.approx(1.0)
    assert metrics.spearman([4, 3, 2, 1], [10, 20, 30, 45]) == pytest.approx(-1.0)
    # ranks [1, 2.5, 2.5, 4] vs [1, 2, 3, 4]: centred products 2.25 + 0 + 0 + 2.25 = 4.5,
    # squared norms 4.5 and 5 → 4.5 / √22.5
    assert metrics.spearman([1, 2, 2, 3], [5, 6, 7, 8]) == pytest.approx(4.5 / math.sqrt(22.5))
    assert math.isnan(metrics.spearman([1, 1, 1], [1, 2, 3]))


def test_regret_at_k_and_absolute_error() -> None:
    est, true = [3.0, 1.0, 2.0], [10.0, 30.0, 20.0]
    assert metrics.regret_at_k(est, true, 1) == 20.0  # picks policy 0 (true 10), best is 30
    assert metrics.regret_at_k(est, true, 2) == 10.0  # policies 0 and 2: best 20
    assert metrics.regret_at_k(est, true, 3) == 0.0
    assert metrics.regret_at_k([1.0, 1.0], [0.0, 5.0], 1) == 5.0  # ties go to the earlier policy
    np.testing.assert_array_equal(metrics.absolute_errors(est, true), [7.0, 29.0, 18.0])
    with pytest.raises(OfflineRLError, match="k ≥ 1"):
        metrics.regret_at_k(est, true, 0)
    with pytest.raises(OfflineRLError, match="2 estimates for 3"):
        metrics.spearman([1.0, 2.0], true)


# -- true values ------------------------------------------------------------------------------------


def test_true_value_discounts_the_same_seeded_episodes_as_evaluate() -> None:
    space = gym.make("CartPole-v1")
    anti = resolve_policy("scripted:cartpole_anti", space.observation_space, space.action_space)
    lengths = np.asarray(evaluate(anti, "CartPole-v1", episodes=6, seed=3, num_envs=2).lengths)
    got = discounted_returns_in_env(anti, "CartPole-v1", 0.9, 6, seed=3, num_envs=4)
    np.testing.assert_allclose(got, (1 - 0.9**lengths) / (1 - 0.9))  # reward 1 per step
    assert true_value(RandomPolicy(space.action_space, seed=0), "CartPole-v1", 0.0, 5) == 1.0


# -- command line -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cartpole_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    space = gym.make("CartPole-v1")
    behaviour = resolve_policy(
        "scripted:cartpole-eps0.5", space.observation_space, space.action_space, seed=0
    )
    out = tmp_path_factory.mktemp("ope") / "cartpole.h5"
    return record("CartPole-v1", behaviour, episodes=4, seed=0, out=out, deterministic=False, progress=False)


def test_cli_ope_estimates_every_method_without_the_environment(
    cartpole_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["ope", "scripted:cartpole-eps0.3", "random", "--dataset", str(cartpole_data)]
    rc = main([*argv, "--true-episodes", "0", "--fqe-epochs", "2", "--json"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["methods"] == ["fqe", "is", "wis", "pdis", "dr"]
    assert [p["name"] for p in report["policies"]] == ["scripted:cartpole-eps0.3", "random"]
    for p in report["policies"]:
        assert set(p["estimates"]) == {"fqe", "is", "wis", "pdis", "dr"}
        assert 0.0 < p["ess"] <= 4.0 and p["true_value"] is None
        assert p["fqe"]["passes"] == 2
    assert report["metrics"] == {}


def test_cli_ope_true_values_metrics_and_refusals(
    cartpole_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # short-lived policies keep the environment episodes cheap
    specs = ["scripted:cartpole_anti-eps0.1", "random", "scripted:cartpole_anti"]
    rc = main(["ope", *specs, "--dataset", str(cartpole_data), "--true-episodes", "3", "--fqe-epochs", "1"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "spearman" in out and "regret@1" in out
    assert "is, wis, pdis, dr skipped: target policy scripted:cartpole_anti is deterministic" in out
    rc = main(
        [
            "ope",
            "scripted:cartpole",
            "--dataset",
            str(cartpole_data),
            "--method",
            "is",
            "--true-episodes",
            "0",
        ]
    )
    assert rc == 1
    assert "deterministic" in capsys.readouterr().err
