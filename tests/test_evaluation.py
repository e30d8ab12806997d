"""evaluate(): per-episode seeds, quotas per sub-env, ordering, and normalised scores."""

from __future__ import annotations

import json

import gymnasium as gym
import numpy as np
import pytest

from offrl.errors import OfflineRLError
from offrl.evaluation import EvalResult, episode_seed, evaluate, normalized_score
from offrl.policies import RandomPolicy


class LeanPolicy:
    """Pushes towards the pole's lean: fails after roughly 20 to 60 steps, so episode lengths vary.

    Records every batch it is asked about, to check what evaluate feeds it.
    """

    is_stochastic = False

    def __init__(self) -> None:
        self.batch_sizes: list[int] = []

    def act(self, obs: np.ndarray, *, deterministic: bool = True) -> np.ndarray:
        self.batch_sizes.append(obs.shape[0])
        return (obs[:, 2] > 0).astype(np.float32)  # evaluate must cast Discrete actions to int64


def run_alone(policy: LeanPolicy, seed: int, episode: int) -> float:
    env = gym.make("CartPole-v1")
    obs, _ = env.reset(seed=episode_seed(seed, episode))
    total, done = 0.0, False
    while not done:
        obs, reward, terminated, truncated, _ = env.step(int(policy.act(obs[None])[0]))
        total += float(reward)
        done = terminated or truncated
    return total


def test_returns_are_ordered_by_episode_with_derived_seeds() -> None:
    result = evaluate(LeanPolicy(), "CartPole-v1", episodes=5, seed=3, num_envs=2)
    assert len(result.returns) == len(result.lengths) == 5
    assert result.returns == [run_alone(LeanPolicy(), 3, j) for j in range(5)]
    assert result.lengths == [int(r) for r in result.returns]  # CartPole pays 1 per step
    assert len(set(result.returns)) > 1


@pytest.mark.parametrize("episodes", [1, 7, 12])
def test_results_do_not_depend_on_num_envs(episodes: int) -> None:
    one = evaluate(LeanPolicy(), "CartPole-v1", episodes=episodes, seed=0, num_envs=1)
    for num_envs in (3, 20):
        many = evaluate(LeanPolicy(), "CartPole-v1", episodes=episodes, seed=0, num_envs=num_envs)
        assert sorted(many.returns) == sorted(one.returns)
        assert many.returns == one.returns and many.lengths == one.lengths


def test_policy_sees_only_active_sub_envs_and_no_extra_steps() -> None:
    policy = LeanPolicy()
    result = evaluate(policy, "CartPole-v1", episodes=7, seed=0, num_envs=3)
    # one query per environment step actually taken: no autoreset steps, no idle sub-envs
    assert sum(policy.batch_sizes) == sum(result.lengths)
    assert max(policy.batch_sizes) == 3 and min(policy.batch_sizes) == 1


def test_same_seed_same_result_and_other_seed_differs() -> None:
    def run(eval_seed: int) -> EvalResult:
        policy = RandomPolicy(gym.make("CartPole-v1").action_space, seed=11)
        return evaluate(policy, "CartPole-v1", episodes=6, seed=eval_seed, num_envs=2, deterministic=False)

    assert run(5) == run(5)
    assert run(5).returns != run(6).returns


def test_summary_statistics() -> None:
    result = evaluate(LeanPolicy(), "CartPole-v1", episodes=6, seed=2, num_envs=2)
    r = np.array(result.returns)
    assert result.mean == pytest.approx(r.mean()) and result.std == pytest.approx(r.std())
    assert (result.min, result.max) == (r.min(), r.max())
    assert result.normalized_mean is None and result.normalized_std is None
    assert result.seed == 2 and result.env_id == "CartPole-v1"
    assert json.loads(json.dumps(result.to_dict())) == result.to_dict()


def test_normalized_score_hand_case() -> None:
    np.testing.assert_allclose(
        normalized_score([10.0, 60.0, 110.0, 210.0], 10.0, 210.0), [0.0, 25.0, 50.0, 100.0]
    )
    np.testing.assert_allclose(normalized_score([-150.0], -1200.0, -150.0), [100.0])
    for bad in ((1.0, 1.0), (0.0, float("inf"))):
        with pytest.raises(OfflineRLError, match="reference returns"):
            normalized_score([0.0], *bad)


def test_evaluate_reports_normalized_scores() -> None:
    result = evaluate(
        LeanPolicy(), "CartPole-v1", episodes=4, seed=0, ref_min_return=8.0, ref_max_return=508.0
    )
    scores = (np.array(result.returns) - 8.0) / 5.0
    assert result.normalized_mean == pytest.approx(scores.mean())
    assert result.normalized_std == pytest.approx(scores.std())
    with pytest.raises(OfflineRLError, match="both ref_min_return and ref_max_return"):
        evaluate(LeanPolicy(), "CartPole-v1", episodes=1, ref_min_return=0.0)


def test_continuous_actions_kwargs_and_time_limit() -> None:
    class Float64Torque:
        is_stochastic = False

        def act(self, obs: np.ndarray, *, deterministic: bool = True) -> np.ndarray:
            return np.full((obs.shape[0], 1), 0.5, dtype=np.float64)

    result = evaluate(
        Float64Torque(),
        "Pendulum-v1",
        episodes=3,
        seed=0,
        num_envs=2,
        env_kwargs={"g": 9.81},
        max_episode_steps=40,
    )
    assert result.lengths == [40, 40, 40]
    assert all(r < 0 for r in result.returns)


def test_wrong_batch_size_and_bad_arguments_are_refused() -> None:
    class OneAction:
        is_stochastic = False

        def act(self, obs: np.ndarray, *, deterministic: bool = True) -> np.ndarray:
            return np.zeros(1, dtype=np.int64)

    with pytest.raises(OfflineRLError, match="shape"):
        evaluate(OneAction(), "CartPole-v1", episodes=4, num_envs=2)
    with pytest.raises(OfflineRLError, match="must be ≥ 1"):
        evaluate(LeanPolicy(), "CartPole-v1", episodes=0)


class ConstantPolicy:
    """Always the same action, whatever it sees."""

    is_stochastic = False

    def act(self, obs: np.ndarray, *, deterministic: bool = True) -> np.ndarray:
        return np.ones(obs.shape[0], dtype=np.int64)


def test_action_top_share_counts_the_policys_steps() -> None:
    """The share of steps taken with the most used action: 1 for a constant policy, and for the lean
    policy the count of its majority action over the steps it took, computed by hand."""
    assert evaluate(ConstantPolicy(), "CartPole-v1", episodes=3, seed=0).action_top_share == 1.0
    policy = LeanPolicy()
    env, counts = gym.make("CartPole-v1"), np.zeros(2, dtype=np.int64)
    for episode in range(4):
        obs, _ = env.reset(seed=episode_seed(1, episode))
        done = False
        while not done:
            action = int(policy.act(obs[None])[0])
            counts[action] += 1
            obs, _, terminated, truncated, _ = env.step(action)
            done = terminated or truncated
    result = evaluate(LeanPolicy(), "CartPole-v1", episodes=4, seed=1, num_envs=2)
    assert result.action_top_share == pytest.approx(counts.max() / counts.sum())
    assert "action_top_share" in result.to_dict()
    box = evaluate(RandomPolicy(gym.make("Pendulum-v1").action_space, seed=0), "Pendulum-v1", episodes=1)
    assert box.action_top_share is None and "action_top_share" not in box.to_dict()
