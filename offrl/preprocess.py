"""Observation normalisation and action scaling, fitted on a dataset and saved with every model."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor, nn

from offrl.errors import ConfigError


class ObsNormalizer(nn.Module):
    """``(obs − mean) / std`` with statistics from the dataset; identity when not fitted."""

    mean: Tensor
    std: Tensor

    def __init__(self, obs_dim: int, mean: Tensor | None = None, std: Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(obs_dim) if mean is None else mean.float().reshape(obs_dim))
        self.register_buffer("std", torch.ones(obs_dim) if std is None else std.float().reshape(obs_dim))

    @classmethod
    def fit(cls, observations: Tensor, eps: float = 1e-3) -> ObsNormalizer:
        """Statistics over all rows of ``observations`` (N, *obs_shape), flattened per row."""
        flat = observations.reshape(observations.shape[0], -1).double()
        mean, std = flat.mean(0), flat.std(0, unbiased=False) + eps
        return cls(flat.shape[1], mean.float().cpu(), std.float().cpu())

    def forward(self, obs: Tensor) -> Tensor:
        flat = obs.reshape(*obs.shape[: obs.dim() - 1], -1) if obs.dim() > 1 else obs
        return (flat - self.mean) / self.std


class ActionScaler(nn.Module):
    """Maps a bounded Box action range to [−1, 1] for learning, and back for acting."""

    low: Tensor
    high: Tensor

    def __init__(self, low: Tensor, high: Tensor) -> None:
        super().__init__()
        self.register_buffer("low", low.float().reshape(-1))
        self.register_buffer("high", high.float().reshape(-1))

    @classmethod
    def from_space(cls, space: gym.Space) -> ActionScaler:
        if not isinstance(space, gym.spaces.Box):
            raise ConfigError(f"action scaling needs a Box action space, got {space}")
        if not space.is_bounded("both"):
            raise ConfigError(
                f"action space {space} is unbounded: squashed policies need finite bounds "
                "(re-record with a bounded action space, or wrap the environment with RescaleAction)"
            )
        return cls(
            torch.as_tensor(np.asarray(space.low, dtype=np.float64)), torch.as_tensor(np.asarray(space.high))
        )

    def to_unit(self, actions: Tensor) -> Tensor:
        return 2.0 * (actions - self.low) / (self.high - self.low) - 1.0

    def from_unit(self, unit: Tensor) -> Tensor:
        return self.low + (unit.clamp(-1.0, 1.0) + 1.0) * 0.5 * (self.high - self.low)

    def log_abs_det(self) -> Tensor:
        """log |d action / d unit| summed over dimensions: converts unit-space densities to env units."""
        return torch.log(0.5 * (self.high - self.low)).sum()
