"""Hand-written controllers for classic-control tasks, with optional exploration noise.

They give dataset recipes behaviour policies of known quality without any training: ``cartpole``
and ``pendulum`` are near-expert; a suffix mixes in noise with an exact log-probability:

* ``NAME-epsX`` (Discrete actions): ε-greedy, a uniform random action with probability X.
* ``NAME-noiseX`` (Box actions): Gaussian noise of std X in pre-tanh space, squashed into the
  bounds (about X times the half-range in action units near the centre), so the density stays exact.

Stochastic controllers act greedily (noise-free) when ``act(..., deterministic=True)``, as a learned
policy would; a recorder that wants the noisy behaviour must pass ``deterministic=False``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np

from offrl.errors import OfflineRLError
from offrl.policies import EpsilonGreedy
from offrl.types import Policy

SCRIPTED: dict[str, str] = {
    "cartpole": "CartPole-v1: linear state feedback on (x, ẋ, θ, θ̇); balances for the full 500 steps",
    "pendulum": "Pendulum-v1: energy-pumping swing-up, linear stabiliser near upright; torque within bounds",
    "cartpole_anti": "CartPole-v1: the opposite of 'cartpole' (pushes the pole over): a confidently bad policy",
    "mountaincar": "MountainCarContinuous-v0: pushes with 0.4 of full force along the velocity (energy pumping)",
}

# Gains found by a small grid search over seeded episodes (positive position gains are right: to move
# the cart left the pole must first lean left, which takes a push to the right).
_CARTPOLE_GAINS = np.array([0.5, 1.0, 10.0, 2.0])

# Pendulum-v1 (g=10, m=l=1): θ̈ = 15 sin θ + 3u with θ = 0 upright, so E = θ̇²/2 + 15 cos θ is conserved
# without torque and equals 15 at rest upright; dE/dt = 3uθ̇ tells which way to push.
_PENDULUM_GRAVITY = 15.0
_PENDULUM_KP, _PENDULUM_KD = 10.0, 2.5  # stabiliser, used once cos θ > _PENDULUM_CAPTURE_COS (θ < ~46°)
_PENDULUM_KE = 0.2  # energy-pumping gain (saturates at the torque bound far from the target energy)
_PENDULUM_CAPTURE_COS = 0.7

# The pre-tanh mean of a noisy Box controller is kept within ±3 (2·tanh(3) ≈ 1.99 for Pendulum):
# a mean at atanh(1 - 1e-6) ≈ 7.3 would hide σ ≤ 1 noise entirely whenever the controller saturates.
_MAX_PRE_TANH = 3.0
_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)

_NAME = re.compile(r"^(?P<base>[a-z][a-z0-9_]*?)(?:-(?P<kind>eps|noise)(?P<value>\d+(?:\.\d*)?|\.\d+))?$")


def _cartpole(obs: np.ndarray, space: gym.spaces.Discrete) -> np.ndarray:
    push_right = np.asarray(obs, dtype=np.float64) @ _CARTPOLE_GAINS > 0.0
    return push_right.astype(np.int64) + int(space.start)


def _cartpole_anti(obs: np.ndarray, space: gym.spaces.Discrete) -> np.ndarray:
    return 1 - (_cartpole(obs, space) - int(space.start)) + int(space.start)


def _pendulum(obs: np.ndarray, space: gym.spaces.Box) -> np.ndarray:
    obs = np.asarray(obs, dtype=np.float64)
    cos, sin, vel = obs[:, 0], obs[:, 1], obs[:, 2]
    angle = np.arctan2(sin, cos)
    energy = 0.5 * vel**2 + _PENDULUM_GRAVITY * cos
    # At rest at the bottom θ̇ = 0 would give no push; any sign starts the swing.
    pump = _PENDULUM_KE * (_PENDULUM_GRAVITY - energy) * np.where(np.abs(vel) > 1e-3, vel, 1.0)
    stabilise = -(_PENDULUM_KP * angle + _PENDULUM_KD * vel)
    torque = np.where(cos > _PENDULUM_CAPTURE_COS, stabilise, pump)[:, None]
    return np.clip(torque, space.low, space.high).astype(space.dtype)


# MountainCarContinuous-v0 pays 0.1·a² per step: pushing along the velocity at 0.4 of full force reaches the
# flag in ~170 steps for a return of ~97 (full force: ~80 steps, ~92; 0.3: ~280 steps, ~92).
_MOUNTAINCAR_FORCE = 0.4


def _mountaincar(obs: np.ndarray, space: gym.spaces.Box) -> np.ndarray:
    vel = np.asarray(obs, dtype=np.float64)[:, 1]
    direction = np.where(np.abs(vel) > 1e-4, np.sign(vel), -1.0)  # at rest: back up the left slope first
    return np.clip(_MOUNTAINCAR_FORCE * direction[:, None], space.low, space.high).astype(space.dtype)


@dataclass(frozen=True)
class _Controller:
    fn: Callable[[np.ndarray, Any], np.ndarray]  # (observations, action space) -> actions
    obs_shape: tuple[int, ...]
    discrete: bool
    act_shape: tuple[int, ...]  # () for Discrete; the Box shape otherwise
    env_hint: str


_CONTROLLERS: dict[str, _Controller] = {
    "cartpole": _Controller(_cartpole, (4,), True, (), "CartPole-v1"),
    "pendulum": _Controller(_pendulum, (3,), False, (1,), "Pendulum-v1"),
    "cartpole_anti": _Controller(_cartpole_anti, (4,), True, (), "CartPole-v1"),
    "mountaincar": _Controller(_mountaincar, (2,), False, (1,), "MountainCarContinuous-v0"),
}


class ScriptedPolicy:
    """A noise-free controller: the same action for the same observation."""

    is_stochastic = False

    def __init__(self, name: str, controller: _Controller, action_space: gym.Space) -> None:
        self.name = name
        self._controller = controller
        self.action_space = action_space

    def __repr__(self) -> str:
        return f"scripted:{self.name}"

    def act(self, obs: np.ndarray, *, deterministic: bool = True) -> np.ndarray:
        return self._controller.fn(obs, self.action_space)


class EpsilonGreedyPolicy(EpsilonGreedy):
    """With probability ε a uniform random action (the greedy one included), else the controller's."""

    def __init__(
        self,
        name: str,
        controller: _Controller,
        action_space: gym.spaces.Discrete,
        epsilon: float,
        seed: int | None,
    ) -> None:
        super().__init__(ScriptedPolicy(name, controller, action_space), action_space, epsilon, seed)
        self.name = name

    def __repr__(self) -> str:
        return f"scripted:{self.name}"


class SquashedNoisePolicy(ScriptedPolicy):
    """Gaussian noise in pre-tanh space around the controller's action, squashed into the Box bounds.

    With centre c and half-range h of the bounds: u = atanh((a_det - c) / h) + N(0, σ²), a = c + h·tanh(u),
    so log p(a) = Σ_i [log N(u_i; μ_i, σ²) - log(h_i (1 - tanh² u_i))].
    """

    is_stochastic = True

    def __init__(
        self, name: str, controller: _Controller, action_space: gym.spaces.Box, sigma: float, seed: int | None
    ) -> None:
        super().__init__(name, controller, action_space)
        self.sigma = sigma
        low, high = action_space.low.astype(np.float64), action_space.high.astype(np.float64)
        self._centre = (high + low) / 2.0
        self._half = (high - low) / 2.0
        self.rng = np.random.default_rng(seed)

    def _pre_tanh_mean(self, obs: np.ndarray) -> np.ndarray:
        y = (super().act(obs).astype(np.float64) - self._centre) / self._half
        bound = math.tanh(_MAX_PRE_TANH)
        return np.arctanh(np.clip(y, -bound, bound))

    def act(self, obs: np.ndarray, *, deterministic: bool = True) -> np.ndarray:
        if deterministic:
            return super().act(obs)
        mean = self._pre_tanh_mean(obs)
        u = mean + self.sigma * self.rng.standard_normal(mean.shape)
        return (self._centre + self._half * np.tanh(u)).astype(self.action_space.dtype)

    def log_prob(self, obs: np.ndarray, actions: np.ndarray) -> np.ndarray:
        mean = self._pre_tanh_mean(obs)
        y = (np.asarray(actions, dtype=np.float64).reshape(mean.shape) - self._centre) / self._half
        # float32 rounding can put a sampled action exactly on a bound, where atanh is infinite.
        y = np.clip(y, -1.0 + 1e-6, 1.0 - 1e-6)
        u = np.arctanh(y)
        gauss = -0.5 * ((u - mean) / self.sigma) ** 2 - math.log(self.sigma) - _LOG_SQRT_2PI
        log_jacobian = np.log(self._half * (1.0 - y**2))
        per_dim = (gauss - log_jacobian).reshape(mean.shape[0], -1)
        return per_dim.sum(axis=1).astype(np.float32)


def _check_spaces(name: str, c: _Controller, observation_space: gym.Space, action_space: gym.Space) -> None:
    obs_ok = isinstance(observation_space, gym.spaces.Box) and observation_space.shape == c.obs_shape
    if c.discrete:
        act_ok = isinstance(action_space, gym.spaces.Discrete)
    else:
        act_ok = (
            isinstance(action_space, gym.spaces.Box)
            and action_space.shape == c.act_shape
            and action_space.is_bounded("both")
        )
    if not (obs_ok and act_ok):
        raise OfflineRLError(
            f"--policy scripted:{name} is written for {c.env_hint}; this environment has observation space "
            f"{observation_space} and action space {action_space}"
        )


def make_scripted(
    name: str, observation_space: gym.Space, action_space: gym.Space, *, seed: int | None = None
) -> Policy:
    """Build the controller ``NAME``, ``NAME-epsX`` or ``NAME-noiseX`` (see :data:`SCRIPTED`)."""
    match = _NAME.match(name)
    base = match["base"] if match else None
    if match is None or base not in _CONTROLLERS:
        known = ", ".join(SCRIPTED)
        raise OfflineRLError(
            f"--policy scripted:{name}: unknown controller; known: {known} (optionally with -epsX or -noiseX)"
        )
    controller = _CONTROLLERS[base]
    _check_spaces(name, controller, observation_space, action_space)
    kind = match["kind"]
    if kind is None:
        return ScriptedPolicy(name, controller, action_space)
    value = float(match["value"])
    if kind == "eps":
        if not controller.discrete:
            raise OfflineRLError(
                f"--policy scripted:{name}: -eps needs Discrete actions; use -noiseX for {base}"
            )
        if not 0.0 <= value <= 1.0:
            raise OfflineRLError(f"--policy scripted:{name}: ε must lie in [0, 1], got {value}")
        assert isinstance(action_space, gym.spaces.Discrete)
        return EpsilonGreedyPolicy(name, controller, action_space, value, seed)
    if controller.discrete:
        raise OfflineRLError(f"--policy scripted:{name}: -noise needs Box actions; use -epsX for {base}")
    if value <= 0.0:
        raise OfflineRLError(f"--policy scripted:{name}: the noise std must be positive, got {value}")
    assert isinstance(action_space, gym.spaces.Box)
    return SquashedNoisePolicy(name, controller, action_space, value, seed)
