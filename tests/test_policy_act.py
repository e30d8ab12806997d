"""One observation in, one action out: ``policy.act`` (and ``log_prob``, and ``algorithm.act`` through it)
take either one unbatched observation of the observation space's shape or a batch ``(N, *shape)``, as
SB3's ``predict`` does; any other shape is an error naming the expected and the given shape."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import pytest

from offrl.algos.registry import algorithm_class
from offrl.policies.artifact import ObservationShapeError, load_policy

PENDULUM_OBS = gym.spaces.Box(-8.0, 8.0, shape=(3,), dtype=np.float32)
PENDULUM_ACT = gym.spaces.Box(-2.0, 2.0, shape=(1,), dtype=np.float32)
CARTPOLE_OBS = gym.spaces.Box(-5.0, 5.0, shape=(4,), dtype=np.float32)
CARTPOLE_ACT = gym.spaces.Discrete(2)
IMAGE_OBS = gym.spaces.Box(0.0, 1.0, shape=(2, 3), dtype=np.float32)


def algo(name: str, obs_space: gym.Space, act_space: gym.Space, **overrides: Any) -> Any:
    cls = algorithm_class(name, act_space)
    return cls(cls.Config(hidden=(8,), **overrides), obs_space, act_space, seed=0)


@pytest.fixture(params=["algorithm", "artefact"])
def source(request: pytest.FixtureRequest, tmp_path: Any) -> Any:
    """``make(obs_space, act_space, **config)``: the policy as the algorithm acts, or as loaded."""

    def make(obs_space: gym.Space, act_space: gym.Space, **overrides: Any) -> Any:
        a = algo("bc", obs_space, act_space, **overrides)
        if request.param == "algorithm":
            return a
        return load_policy(a.policy().save(tmp_path / "policy"))

    return make


def test_pendulum_one_observation_one_action(source: Any) -> None:
    policy = source(PENDULUM_OBS, PENDULUM_ACT, policy="gaussian")
    obs = np.array([0.5, -0.5, 1.0], dtype=np.float32)
    action = policy.act(obs)
    assert action.shape == (1,) and PENDULUM_ACT.contains(action)
    batch = policy.act(np.stack([obs, obs, obs]))
    assert batch.shape == (3, 1)
    np.testing.assert_array_equal(batch[0], action)
    assert policy.act(obs, deterministic=False).shape == (1,)


def test_cartpole_one_observation_one_action(source: Any) -> None:
    policy = source(CARTPOLE_OBS, CARTPOLE_ACT)
    obs = np.zeros(4, dtype=np.float64)
    action = policy.act(obs)
    assert action.shape == () and CARTPOLE_ACT.contains(action)
    assert policy.act(np.zeros((5, 4))).shape == (5,)
    env = gym.make("CartPole-v1")
    first, _ = env.reset(seed=0)
    env.step(policy.act(first))  # straight into the environment


def test_observations_of_several_dimensions(source: Any) -> None:
    policy = source(IMAGE_OBS, CARTPOLE_ACT)
    assert policy.act(np.zeros((2, 3))).shape == ()
    assert policy.act(np.zeros((5, 2, 3))).shape == (5,)
    assert policy.act(np.zeros((5, 6))).shape == (5,)  # flattened rows, as before


@pytest.mark.parametrize("shape", [(2,), (4, 2), (1, 3, 1), ()])
def test_wrong_shape_names_expected_and_given(source: Any, shape: tuple[int, ...]) -> None:
    policy = source(PENDULUM_OBS, PENDULUM_ACT)
    with pytest.raises(ObservationShapeError) as info:
        policy.act(np.zeros(shape, dtype=np.float32))
    message = str(info.value)
    assert f"shape {shape}" in message and "expected (3,)" in message and "(N, 3)" in message
    assert "\n" not in message


def test_log_prob_of_one_observation(tmp_path: Any) -> None:
    a = algo("bc", PENDULUM_OBS, PENDULUM_ACT, policy="gaussian")
    policy = load_policy(a.policy().save(tmp_path / "p"))
    obs = np.array([0.1, 0.2, 0.3], dtype=np.float32)
    one = policy.log_prob(obs, np.array([0.5], dtype=np.float32))
    batch = policy.log_prob(obs[None].repeat(2, 0), np.array([[0.5], [0.5]], dtype=np.float32))
    assert one.shape == () and batch.shape == (2,)
    np.testing.assert_allclose(one, batch[0], rtol=1e-6)
    cat = load_policy(algo("bc", CARTPOLE_OBS, CARTPOLE_ACT).policy().save(tmp_path / "c"))
    assert cat.log_prob(np.zeros(4), np.array(1)).shape == ()
    with pytest.raises(ObservationShapeError, match=r"shape \(3,\)"):
        cat.log_prob(np.zeros(3), np.array(1))
