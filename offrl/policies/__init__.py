"""Policies that need no training: uniform random, built-in scripted controllers, and resolution of
the ``--policy`` flag shared by ``offrl record`` and the dataset recipes."""

from __future__ import annotations

import os

import gymnasium as gym
import numpy as np

from offrl.errors import OfflineRLError
from offrl.types import Policy


class RandomPolicy:
    """Uniform actions over a bounded Box or a Discrete space; reports exact log-probabilities."""

    is_stochastic = True

    def __init__(self, action_space: gym.Space, seed: int | None = None) -> None:
        if isinstance(action_space, gym.spaces.Box):
            if not action_space.is_bounded("both"):
                raise OfflineRLError(
                    f"a uniform random policy needs a bounded action space, got {action_space}"
                )
            self._low = action_space.low.astype(np.float64)
            self._high = action_space.high.astype(np.float64)
            self._log_prob = -float(np.sum(np.log(self._high - self._low)))
        elif isinstance(action_space, gym.spaces.Discrete):
            self._log_prob = -float(np.log(action_space.n))
        else:
            raise OfflineRLError(f"unsupported action space {action_space}")
        self.action_space = action_space
        self.rng = np.random.default_rng(seed)

    def __repr__(self) -> str:
        return "random"

    def act(self, obs: np.ndarray, *, deterministic: bool = True) -> np.ndarray:
        n = obs.shape[0]
        space = self.action_space
        if isinstance(space, gym.spaces.Discrete):
            actions = np.asarray(self.rng.integers(0, int(space.n), size=n)) + int(space.start)
            return actions.astype(np.int64)
        assert isinstance(space, gym.spaces.Box)
        u = self.rng.uniform(self._low, self._high, size=(n, *space.shape))
        return u.astype(space.dtype)

    def log_prob(self, obs: np.ndarray, actions: np.ndarray) -> np.ndarray:
        return np.full(obs.shape[0], self._log_prob, dtype=np.float32)


class EpsilonGreedy:
    """Any policy's greedy (deterministic) action, replaced with probability ε by a uniform random one
    (which may be the greedy one again); Discrete actions only. Log-probabilities are exact:
    (1 − ε)·[a = greedy] + ε/n."""

    is_stochastic = True

    def __init__(
        self, policy: Policy, action_space: gym.Space, epsilon: float, seed: int | None = None
    ) -> None:
        if not isinstance(action_space, gym.spaces.Discrete):
            raise OfflineRLError(f"ε-greedy needs Discrete actions, got {action_space}")
        if not 0.0 <= epsilon <= 1.0:
            raise OfflineRLError(f"ε must lie in [0, 1], got {epsilon}")
        self.policy, self.epsilon = policy, float(epsilon)
        self._n, self._start = int(action_space.n), int(action_space.start)
        self.rng = np.random.default_rng(seed)

    def __repr__(self) -> str:
        return f"{self.policy!r} ε-greedy({self.epsilon})"

    def act(self, obs: np.ndarray, *, deterministic: bool = True) -> np.ndarray:
        greedy = np.asarray(self.policy.act(obs, deterministic=True)).astype(np.int64).reshape(-1)
        if deterministic:
            return greedy
        explore = self.rng.random(greedy.shape[0]) < self.epsilon
        uniform = self.rng.integers(0, self._n, size=greedy.shape[0]) + self._start
        return np.where(explore, uniform, greedy).astype(np.int64)

    def log_prob(self, obs: np.ndarray, actions: np.ndarray) -> np.ndarray:
        actions = np.asarray(actions).reshape(-1)
        greedy = np.asarray(self.policy.act(obs, deterministic=True)).reshape(-1)
        prob = (1.0 - self.epsilon) * (actions == greedy) + self.epsilon / self._n
        valid = (actions >= self._start) & (actions < self._start + self._n)
        with np.errstate(divide="ignore"):
            return np.where(valid, np.log(prob), -np.inf).astype(np.float32)


def resolve_policy(
    spec: str, observation_space: gym.Space, action_space: gym.Space, *, seed: int | None = None
) -> Policy:
    """Turn a ``--policy`` value into a policy: ``random``, ``scripted:NAME`` or an artefact path."""
    if spec == "random":
        return RandomPolicy(action_space, seed=seed)
    if spec.startswith("scripted:"):
        from offrl.policies.scripted import make_scripted

        return make_scripted(spec.split(":", 1)[1], observation_space, action_space, seed=seed)
    if os.path.exists(spec):
        from offrl.policies.artifact import load_policy

        return load_policy(spec, seed=seed)
    raise OfflineRLError(
        f"--policy {spec!r}: expected 'random', 'scripted:NAME' or the path of an existing policy artefact"
    )
