"""Hand-made batches for the algorithms' unit tests."""

from __future__ import annotations

import torch

from offrl.types import Batch


def random_batch(n: int = 64, act_dim: int = 1, seed: int = 0) -> Batch:
    """``n`` transitions with 2-dimensional observations and Box actions in [−1, 1]; a fifth terminal."""
    g = torch.Generator().manual_seed(seed)
    return Batch(
        obs=torch.randn(n, 2, generator=g),
        actions=torch.rand(n, act_dim, generator=g) * 2 - 1,
        rewards=torch.randn(n, generator=g),
        next_obs=torch.randn(n, 2, generator=g),
        terminals=(torch.rand(n, generator=g) < 0.2).float(),
    )
