"""A format-v1 dataset held in memory as tensors on the training device."""

from __future__ import annotations

import copy
import os
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor

from offrl.data import format as fmt
from offrl.data.sampling import FullPassSampler
from offrl.types import Batch


def _to_tensor(a: np.ndarray, device: torch.device) -> Tensor:
    if a.dtype in (np.float64, np.float16, np.bool_):
        a = a.astype(np.float32)
    elif np.issubdtype(a.dtype, np.signedinteger) and a.dtype != np.int64:
        a = a.astype(np.int64)
    return torch.from_numpy(np.ascontiguousarray(a)).to(device)


class TransitionDataset:
    """Transitions as tensors on one device, plus the episode index and the file's metadata.

    Floating observations are held as float32; integer ones (e.g. uint8 images) keep their dtype
    and are converted per batch, which keeps memory at a quarter.
    """

    def __init__(self, raw: fmt.RawDataset, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.path = raw.path
        self.observation_space: gym.Space = raw.observation_space
        self.action_space: gym.Space = raw.action_space
        self.env_id = raw.env_id
        self.env_spec = raw.env_spec
        self.metadata: dict[str, Any] = raw.metadata
        self.ref_min_return = raw.ref_min_return
        self.ref_max_return = raw.ref_max_return
        self.discrete = isinstance(raw.action_space, gym.spaces.Discrete)
        self.observations = _to_tensor(raw.observations, self.device)  # (N, *obs_shape)
        self.next_observations = _to_tensor(raw.next_observations, self.device)  # (N, *obs_shape)
        acts = raw.actions.astype(np.int64) if self.discrete else raw.actions.astype(np.float32)
        if self.discrete and isinstance(raw.action_space, gym.spaces.Discrete) and raw.action_space.start:
            acts = acts - int(raw.action_space.start)  # actions are 0-based indices inside offrl
        self.actions = _to_tensor(acts, self.device)  # (N, act_dim) float32 | (N,) int64
        if not self.discrete:
            self.actions = self.actions.reshape(len(raw.rewards), -1)
        self.rewards = _to_tensor(raw.rewards.astype(np.float32), self.device)  # (N,)
        self.terminals = _to_tensor(raw.terminals.astype(np.float32), self.device)  # (N,)
        self.timeouts = _to_tensor(raw.timeouts.astype(bool), self.device).bool()  # (N,)
        self.episode_ends = torch.from_numpy(raw.episode_ends.astype(np.int64))  # (E,) on CPU
        self._packed: tuple[Tensor, tuple[int, ...]] | None = None
        # (N,) Monte-Carlo returns-to-go, attached by algorithms that learn from them (Cal-QL)
        self.returns: Tensor | None = None
        self.action_log_probs = (
            None
            if raw.action_log_probs is None
            else _to_tensor(raw.action_log_probs.astype(np.float32), self.device)
        )

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], device: torch.device | str = "cpu", *, check: bool = True
    ) -> TransitionDataset:
        """Read ``path`` and run the same checks as ``offrl validate`` (``DatasetError`` if any fail)."""
        raw = fmt.load_checked(path) if check else fmt.read_raw(path)
        return cls(raw, device)

    def __len__(self) -> int:
        return int(self.rewards.shape[0])

    def with_tensors(self, **tensors: Tensor) -> TransitionDataset:
        """A shallow copy with some per-transition tensors replaced (e.g. normalised observations)."""
        allowed = {"observations", "next_observations", "actions", "rewards", "terminals", "returns"}
        unknown = set(tensors) - allowed
        if unknown:
            raise ValueError(f"cannot replace {sorted(unknown)}; replaceable: {sorted(allowed)}")
        out = copy.copy(self)
        out._packed = None
        for name, value in tensors.items():
            if value.shape[0] != len(self):
                raise ValueError(f"'{name}' has {value.shape[0]} rows, dataset has {len(self)}")
            setattr(out, name, value)
        return out

    @property
    def num_episodes(self) -> int:
        return int(self.episode_ends.shape[0])

    @property
    def episode_starts(self) -> Tensor:
        return torch.cat([torch.zeros(1, dtype=torch.int64), self.episode_ends[:-1]])

    def episode_returns(self) -> np.ndarray:
        """Undiscounted return of each episode, (E,) float64."""
        cums = np.concatenate([[0.0], np.cumsum(self.rewards.double().cpu().numpy())])
        ends = self.episode_ends.numpy()
        return cums[ends] - cums[self.episode_starts.numpy()]

    def episode_lengths(self) -> np.ndarray:
        return (self.episode_ends - self.episode_starts).numpy()

    def _packed_rows(self) -> tuple[Tensor, tuple[int, ...]] | None:
        """All per-transition fields side by side in one float32 (N, D) tensor, built on first use,
        so a batch is one gather instead of five; None when observations are not float (images stay
        compact) or discrete indices would not be exact in float32."""
        if self._packed is None:
            obs_ok = self.observations.is_floating_point() and self.next_observations.is_floating_point()
            if not obs_ok or (self.discrete and len(self) and int(self.actions.max()) >= 1 << 24):
                return None
            n = len(self)
            cols = [
                self.observations.reshape(n, -1),
                self.next_observations.reshape(n, -1),
                self.actions.reshape(n, -1).float(),
                self.rewards.reshape(n, 1),
                self.terminals.reshape(n, 1),
            ]
            if self.returns is not None:
                cols.append(self.returns.reshape(n, 1))
            widths = tuple(int(c.shape[1]) for c in cols)
            self._packed = (torch.cat([c.float() for c in cols], dim=1).contiguous(), widths)
        return self._packed

    def batch(self, idx: Tensor) -> Batch:
        """Gather rows ``idx`` (int64 on this dataset's device) into a ``Batch``."""
        packed = self._packed_rows()
        if packed is not None:
            rows, widths = packed
            obs, next_obs, actions, rewards, terminals, *returns = rows.index_select(0, idx).split(
                widths, dim=1
            )
            b = idx.shape[0]
            actions = actions.squeeze(1).long() if self.discrete else actions
            return Batch(
                obs=obs.reshape(b, *self.observations.shape[1:]),
                actions=actions,
                rewards=rewards.squeeze(1),
                next_obs=next_obs.reshape(b, *self.next_observations.shape[1:]),
                terminals=terminals.squeeze(1),
                returns=returns[0].squeeze(1) if returns else None,
            )
        obs = self.observations.index_select(0, idx)
        next_obs = self.next_observations.index_select(0, idx)
        if not obs.is_floating_point():
            obs, next_obs = obs.float(), next_obs.float()
        return Batch(
            obs=obs,
            actions=self.actions.index_select(0, idx),
            rewards=self.rewards.index_select(0, idx),
            next_obs=next_obs,
            terminals=self.terminals.index_select(0, idx),
            returns=None if self.returns is None else self.returns.index_select(0, idx),
        )

    def sampler(self, batch_size: int, *, seed: int = 0, drop_last: bool = False) -> FullPassSampler:
        """A full-pass sampler over this dataset's transitions, drawing indices on its device."""
        return FullPassSampler(len(self), batch_size, seed=seed, drop_last=drop_last, device=self.device)
