"""Storage for online learning: a replay buffer (off-policy) and a rollout buffer (on-policy).

Both are preallocated tensors on the learning device, filled one vector-env step at a time from a
:class:`Transition`. A transition keeps the *true* next observation (the final one at an episode's
end, not gymnasium's reset observation) and separate termination and time-limit flags: targets
bootstrap through time limits, never through terminations.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from offrl.errors import CheckpointError
from offrl.types import Batch


@dataclass(frozen=True)
class Transition:
    """One step of ``N`` sub-environments, in learning units, on the device."""

    obs: Tensor  # (N, obs_dim) float32
    actions: Tensor  # (N, act_dim) float32 in [−1, 1] | (N,) int64, 0-based
    rewards: Tensor  # (N,) float32
    next_obs: Tensor  # (N, obs_dim) float32: the true next observation, also at episode ends
    terminals: Tensor  # (N,) float32: 1 on a true termination
    timeouts: Tensor  # (N,) float32: 1 on a time-limit truncation that is not also a termination
    extras: dict[str, Tensor] = field(default_factory=dict)  # per-step extras, e.g. log-probabilities


class ReplayBuffer:
    """A ring of the ``capacity`` most recent transitions, sampled uniformly by index arithmetic."""

    FIELDS = ("obs", "actions", "rewards", "next_obs", "terminals", "timeouts")

    def __init__(
        self,
        capacity: int,
        obs_dim: int,
        act_dim: int,
        *,
        discrete: bool,
        device: str | torch.device = "cpu",
    ) -> None:
        if capacity < 1:
            raise ValueError(f"replay buffer capacity must be ≥ 1, got {capacity}")
        self.capacity, self.device = int(capacity), torch.device(device)
        self.obs = self._zeros(capacity, obs_dim)
        self.next_obs = self._zeros(capacity, obs_dim)
        if discrete:
            self.actions = torch.zeros(capacity, dtype=torch.int64, device=self.device)
        else:
            self.actions = self._zeros(capacity, act_dim)
        self.rewards = self._zeros(capacity)
        self.terminals = self._zeros(capacity)
        self.timeouts = self._zeros(capacity)
        self.pos = 0  # next row to write
        self.size = 0  # rows holding data

    def _zeros(self, *shape: int) -> Tensor:
        return torch.zeros(shape, dtype=torch.float32, device=self.device)

    def __len__(self) -> int:
        return self.size

    @property
    def can_checkpoint(self) -> bool:
        return True

    def add(self, t: Transition) -> None:
        n = t.rewards.shape[0]
        if self.pos + n <= self.capacity:
            rows: slice | Tensor = slice(self.pos, self.pos + n)
        else:  # wraps around the end of the ring
            rows = torch.arange(self.pos, self.pos + n, device=self.device) % self.capacity
        for name in self.FIELDS:
            getattr(self, name)[rows] = getattr(t, name)
        self.pos = (self.pos + n) % self.capacity
        self.size = min(self.size + n, self.capacity)

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        """``batch_size`` rows drawn uniformly with replacement (indices from ``generator``)."""
        idx = torch.randint(self.size, (batch_size,), generator=generator, device=self.device)
        return self.batch(idx)

    def batch(self, idx: Tensor) -> Batch:
        return Batch(
            obs=self.obs[idx],
            actions=self.actions[idx],
            rewards=self.rewards[idx],
            next_obs=self.next_obs[idx],
            terminals=self.terminals[idx],
        )

    def ordered(self, name: str) -> Tensor:
        """One field's rows from oldest to newest."""
        data: Tensor = getattr(self, name)
        if self.size < self.capacity:
            return data[: self.size]
        return torch.cat([data[self.pos :], data[: self.pos]])

    # -- state -------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The filled rows (not the whole preallocation) and the write position."""
        state: dict[str, Any] = {name: getattr(self, name)[: self.size] for name in self.FIELDS}
        state.update(pos=self.pos, size=self.size, capacity=self.capacity)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["capacity"]) != self.capacity:
            raise CheckpointError(
                f"replay buffer capacity differs: checkpoint {state['capacity']}, config {self.capacity}"
            )
        size = int(state["size"])
        for name in self.FIELDS:
            dest: Tensor = getattr(self, name)
            src: Tensor = state[name]
            if src.shape[1:] != dest.shape[1:] or src.shape[0] != size:
                raise CheckpointError(
                    f"replay buffer '{name}' has shape {tuple(src.shape)} in the checkpoint, "
                    f"expected ({size}, {', '.join(map(str, dest.shape[1:]))})"
                )
            dest[:size] = src.to(dest.device, dest.dtype)
        self.pos, self.size = int(state["pos"]), size


class RolloutBuffer:
    """``n_steps`` consecutive steps of ``num_envs`` sub-environments, laid out ``(T, N, …)``.

    It is emptied after every on-policy update, so it never needs to be checkpointed: checkpoints
    are taken only while it is empty.
    """

    def __init__(
        self,
        n_steps: int,
        num_envs: int,
        obs_dim: int,
        act_dim: int,
        *,
        discrete: bool,
        device: str | torch.device = "cpu",
    ) -> None:
        self.n_steps, self.num_envs, self.device = int(n_steps), int(num_envs), torch.device(device)
        t, n = self.n_steps, self.num_envs
        self.obs = self._zeros(t, n, obs_dim)
        self.next_obs = self._zeros(t, n, obs_dim)
        if discrete:
            self.actions = torch.zeros((t, n), dtype=torch.int64, device=self.device)
        else:
            self.actions = self._zeros(t, n, act_dim)
        self.rewards = self._zeros(t, n)
        self.terminals = self._zeros(t, n)
        self.timeouts = self._zeros(t, n)
        self.extras: dict[str, Tensor] = {}  # allocated on the first add, shaped like what arrives
        self.pos = 0

    def _zeros(self, *shape: int) -> Tensor:
        return torch.zeros(shape, dtype=torch.float32, device=self.device)

    @property
    def full(self) -> bool:
        return self.pos == self.n_steps

    @property
    def can_checkpoint(self) -> bool:
        return self.pos == 0

    def add(self, t: Transition) -> None:
        if self.full:
            raise RuntimeError("rollout buffer is full: update on it and clear it first")
        p = self.pos
        self.obs[p] = t.obs
        self.actions[p] = t.actions
        self.rewards[p] = t.rewards
        self.next_obs[p] = t.next_obs
        self.terminals[p] = t.terminals
        self.timeouts[p] = t.timeouts
        for k, v in t.extras.items():
            if k not in self.extras:
                self.extras[k] = torch.zeros((self.n_steps, *v.shape), dtype=v.dtype, device=self.device)
            self.extras[k][p] = v
        self.pos += 1

    def clear(self) -> None:
        self.pos = 0

    def state_dict(self) -> dict[str, Any]:
        if not self.can_checkpoint:
            raise CheckpointError("a rollout in progress cannot be checkpointed")
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pos = 0
