"""The few types every part of offrl speaks: a transition batch, a policy, an algorithm."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class Batch:
    """A batch of transitions, all tensors on the training device.

    ``terminals`` is 1.0 only on a true termination, never on a time-limit truncation: targets
    bootstrap through timeouts.
    """

    obs: Tensor  # (B, *obs_shape) float32 (normalised when the algorithm normalises)
    actions: Tensor  # (B, act_dim) float32 in the algorithm's action range | (B,) int64
    rewards: Tensor  # (B,) float32
    next_obs: Tensor  # (B, *obs_shape) float32
    terminals: Tensor  # (B,) float32 in {0, 1}
    # (B,) float32: the Monte-Carlo discounted return-to-go of each row, a lower bound of its value (see
    # offrl.losses.return_to_go); present only for algorithms that ask for it (Cal-QL)
    returns: Tensor | None = None

    def __len__(self) -> int:
        return int(self.rewards.shape[0])

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            obs=self.obs.to(device),
            actions=self.actions.to(device),
            rewards=self.rewards.to(device),
            next_obs=self.next_obs.to(device),
            terminals=self.terminals.to(device),
            returns=None if self.returns is None else self.returns.to(device),
        )


@runtime_checkable
class Policy(Protocol):
    """Anything that maps a batch of observations to a batch of actions.

    ``act`` takes and returns numpy arrays with a leading batch axis, in the environment's own
    action space (discrete actions as int64, continuous in the space's bounds).
    """

    is_stochastic: bool

    def act(self, obs: np.ndarray, *, deterministic: bool = True) -> np.ndarray: ...


@runtime_checkable
class StochasticPolicy(Policy, Protocol):
    """A policy that can also report the log-probability of given actions under itself."""

    def log_prob(self, obs: np.ndarray, actions: np.ndarray) -> np.ndarray: ...


@runtime_checkable
class Algorithm(Protocol):
    """A learner: one ``update`` per batch, no loops of its own; the trainers own the loops."""

    def update(self, batch: Batch) -> Mapping[str, Tensor]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...
