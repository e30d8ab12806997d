"""Scripted controllers: they solve their tasks, and the noisy ones report exact log-probabilities."""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import pytest
import torch
from torch.distributions import AffineTransform, Normal, TanhTransform, TransformedDistribution

from offrl.errors import OfflineRLError
from offrl.evaluation import evaluate
from offrl.policies import RandomPolicy, resolve_policy
from offrl.policies.scripted import SCRIPTED, make_scripted
from offrl.types import StochasticPolicy

CARTPOLE = gym.make("CartPole-v1")
PENDULUM = gym.make("Pendulum-v1")


def cartpole(name: str = "cartpole", seed: int | None = 0):
    return make_scripted(name, CARTPOLE.observation_space, CARTPOLE.action_space, seed=seed)


def pendulum(name: str = "pendulum", seed: int | None = 0):
    return make_scripted(name, PENDULUM.observation_space, PENDULUM.action_space, seed=seed)


def test_registry_lists_every_controller() -> None:
    assert set(SCRIPTED) == {"cartpole", "pendulum", "cartpole_anti", "mountaincar"}
    assert all(isinstance(v, str) and v for v in SCRIPTED.values())


def test_cartpole_balances_every_episode() -> None:
    result = evaluate(cartpole(), "CartPole-v1", episodes=20, seed=0, num_envs=4)
    assert result.returns == [500.0] * 20


def test_pendulum_swings_up_and_random_does_not() -> None:
    # Measured over these 20 episodes: -207 (its mean over 200 other episodes is -140); random is ~-1370.
    scripted = evaluate(pendulum(), "Pendulum-v1", episodes=20, seed=0, num_envs=4)
    assert scripted.mean >= -250.0
    assert scripted.min >= -450.0
    random = evaluate(RandomPolicy(PENDULUM.action_space, seed=0), "Pendulum-v1", episodes=10, seed=0)
    assert random.mean <= -900.0


def test_mountaincar_reaches_the_flag_above_the_threshold() -> None:
    env = gym.make("MountainCarContinuous-v0")
    policy = make_scripted("mountaincar", env.observation_space, env.action_space)
    result = evaluate(policy, "MountainCarContinuous-v0", episodes=10, seed=3, num_envs=5)
    assert min(result.returns) > 90.0  # reward_threshold; each episode reaches the flag (+100)
    assert max(result.lengths) < 999


def test_pendulum_torque_within_bounds() -> None:
    obs = np.random.default_rng(0).uniform([-1, -1, -8], [1, 1, 8], size=(256, 3)).astype(np.float32)
    for policy in (pendulum(), pendulum("pendulum-noise1.0")):
        actions = policy.act(obs, deterministic=False)
        assert actions.shape == (256, 1) and actions.dtype == np.float32
        assert np.all(np.abs(actions) <= 2.0)


def test_epsilon_noise_degrades_cartpole() -> None:
    clean = evaluate(cartpole(), "CartPole-v1", episodes=10, seed=1, deterministic=False).mean
    noisy = evaluate(
        cartpole("cartpole-eps0.5"), "CartPole-v1", episodes=10, seed=1, deterministic=False
    ).mean
    assert clean == 500.0 and noisy < 400.0


def test_resolve_policy_builds_scripted_controllers() -> None:
    plain = resolve_policy("scripted:cartpole", CARTPOLE.observation_space, CARTPOLE.action_space)
    noisy = resolve_policy(
        "scripted:cartpole-eps0.3", CARTPOLE.observation_space, CARTPOLE.action_space, seed=1
    )
    assert not plain.is_stochastic and noisy.is_stochastic
    assert isinstance(noisy, StochasticPolicy)
    assert repr(noisy) == "scripted:cartpole-eps0.3"


@pytest.mark.parametrize(
    ("name", "env", "message"),
    [
        ("acrobot", CARTPOLE, "unknown controller"),
        ("cartpole-eps", CARTPOLE, "unknown controller"),
        ("cartpole-temp0.1", CARTPOLE, "unknown controller"),
        ("cartpole-eps1.5", CARTPOLE, "ε must lie in"),
        ("cartpole-noise0.5", CARTPOLE, "-noise needs Box actions"),
        ("pendulum-eps0.1", PENDULUM, "-eps needs Discrete actions"),
        ("pendulum-noise0", PENDULUM, "must be positive"),
        ("pendulum", CARTPOLE, "written for Pendulum-v1"),
        ("cartpole", PENDULUM, "written for CartPole-v1"),
    ],
)
def test_bad_names_and_spaces_are_refused(name: str, env: gym.Env, message: str) -> None:
    with pytest.raises(OfflineRLError, match=message):
        make_scripted(name, env.observation_space, env.action_space)


def test_suffix_values_are_parsed() -> None:
    assert cartpole("cartpole-eps.25").epsilon == 0.25
    assert cartpole("cartpole-eps1").epsilon == 1.0
    assert pendulum("pendulum-noise0.75").sigma == 0.75


# Observations on either side of the controller's decision boundary: greedy actions 1 and 0.
TWO_OBS = np.array([[0.0, 0.0, 0.05, 0.0], [0.0, 0.0, -0.05, 0.0]], dtype=np.float32)


def test_epsilon_greedy_log_prob_hand_cases() -> None:
    greedy = cartpole().act(TWO_OBS)
    assert greedy.tolist() == [1, 0] and greedy.dtype == np.int64
    policy = cartpole("cartpole-eps0.3")
    # greedy: 0.7 + 0.3/2; the other action: 0.3/2
    assert policy.log_prob(TWO_OBS, np.array([1, 0])) == pytest.approx([math.log(0.85)] * 2)
    assert policy.log_prob(TWO_OBS, np.array([0, 1])) == pytest.approx([math.log(0.15)] * 2)
    assert cartpole("cartpole-eps1.0").log_prob(TWO_OBS, np.array([0, 1])) == pytest.approx(
        [math.log(0.5)] * 2
    )
    exact = cartpole("cartpole-eps0").log_prob(TWO_OBS, np.array([1, 1]))
    assert exact[0] == 0.0 and exact[1] == -np.inf
    assert policy.log_prob(TWO_OBS, np.array([2, -1])).tolist() == [-np.inf, -np.inf]


def test_epsilon_greedy_samples_match_log_prob() -> None:
    policy = cartpole("cartpole-eps0.4", seed=3)
    obs = np.repeat(TWO_OBS[:1], 20000, axis=0)
    assert np.array_equal(policy.act(obs, deterministic=True), np.ones(20000, dtype=np.int64))
    actions = policy.act(obs, deterministic=False)
    assert actions.dtype == np.int64
    expected = math.exp(policy.log_prob(obs[:1], np.array([1]))[0])  # 0.8
    assert abs(float(np.mean(actions == 1)) - expected) < 0.015


def test_stochastic_controllers_are_seeded() -> None:
    obs = np.repeat(TWO_OBS, 50, axis=0)
    a, b, c = (cartpole("cartpole-eps0.5", seed=s).act(obs, deterministic=False) for s in (7, 7, 8))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    pobs = np.zeros((50, 3), dtype=np.float32) + np.array([1.0, 0.0, 0.0], dtype=np.float32)
    x, y, z = (pendulum("pendulum-noise0.5", seed=s).act(pobs, deterministic=False) for s in (7, 7, 8))
    assert np.array_equal(x, y) and not np.array_equal(x, z)


PENDULUM_OBS = np.array(
    [[1.0, 0.0, 0.0], [0.95, 0.31, -1.0], [0.98, -0.2, 0.5], [-1.0, 0.0, 0.5]], dtype=np.float32
)  # upright, two near-upright states (unsaturated torques) and the bottom (saturated torque)


@pytest.mark.parametrize("sigma", [0.5, 1.0])
def test_noisy_pendulum_log_prob_matches_torch(sigma: float) -> None:
    policy = pendulum(f"pendulum-noise{sigma}", seed=0)
    obs = np.repeat(PENDULUM_OBS, 500, axis=0)
    actions = policy.act(obs, deterministic=False)
    keep = np.abs(actions[:, 0]) < 1.999  # torch's atanh is infinite on float32 actions rounded onto ±2
    obs, actions = obs[keep], actions[keep]
    mean_action = np.clip(pendulum().act(obs).astype(np.float64) / 2.0, -math.tanh(3.0), math.tanh(3.0))
    base = Normal(torch.from_numpy(np.arctanh(mean_action)), sigma)
    dist = TransformedDistribution(base, [TanhTransform(), AffineTransform(0.0, 2.0)])
    expected = dist.log_prob(torch.from_numpy(actions.astype(np.float64))).sum(-1).numpy()
    np.testing.assert_allclose(policy.log_prob(obs, actions), expected, rtol=1e-4, atol=1e-4)


def test_noisy_pendulum_density_integrates_to_one_and_matches_samples() -> None:
    policy = pendulum("pendulum-noise0.5", seed=1)
    grid = np.linspace(-2.0, 2.0, 40001)[1:-1]
    for obs in PENDULUM_OBS:
        density = np.exp(
            policy.log_prob(np.repeat(obs[None], grid.size, axis=0), grid[:, None]).astype(np.float64)
        )
        cdf = np.cumsum(density) * (grid[1] - grid[0])
        assert cdf[-1] == pytest.approx(1.0, abs=2e-3)
        samples = policy.act(np.repeat(obs[None], 20000, axis=0), deterministic=False)[:, 0]
        for q in (0.1, 0.5, 0.9):
            # the empirical quantile sits where the integrated density says it should
            assert np.interp(np.quantile(samples, q), grid, cdf) == pytest.approx(q, abs=0.015)


def test_noisy_pendulum_acts_greedily_when_deterministic() -> None:
    noisy = pendulum("pendulum-noise1.0")
    np.testing.assert_array_equal(noisy.act(PENDULUM_OBS), pendulum().act(PENDULUM_OBS))
