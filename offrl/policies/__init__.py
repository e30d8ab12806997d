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
