"""Full-pass (without replacement) batch order over a dataset: exact, seeded, resumable."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor

from offrl.errors import OfflineRLError


def pass_permutation(num_items: int, seed: int, pass_index: int) -> Tensor:
    """The shuffled order of pass ``pass_index``: a pure function of (seed, pass), so a resumed run
    needs only the pass and position to continue exactly, with no RNG state to carry."""
    pass_seed = int(np.random.SeedSequence([seed, pass_index]).generate_state(1, dtype=np.uint64)[0] >> 1)
    gen = torch.Generator(device="cpu").manual_seed(pass_seed)
    return torch.randperm(num_items, generator=gen)


class FullPassSampler:
    """Yields batches of indices such that each pass visits every index exactly once.

    With ``drop_last`` the final partial batch of each pass (``leftover`` indices) is skipped; the
    leftover is a property so callers can report it. Without it the last batch is smaller.
    """

    def __init__(
        self,
        num_items: int,
        batch_size: int,
        *,
        seed: int = 0,
        drop_last: bool = False,
        device: torch.device | str = "cpu",
    ) -> None:
        if num_items <= 0:
            raise OfflineRLError("cannot sample from an empty dataset")
        if batch_size <= 0:
            raise OfflineRLError(f"batch_size must be positive, got {batch_size}")
        if drop_last and batch_size > num_items:
            raise OfflineRLError(
                f"batch_size {batch_size} exceeds the dataset's {num_items} transitions with drop_last: "
                "a pass would contain no batch"
            )
        self.num_items = num_items
        self.batch_size = batch_size
        self.seed = seed
        self.drop_last = drop_last
        self.device = torch.device(device)
        self.pass_index = 0  # passes completed so far
        self.position = 0  # batches already drawn in the current pass
        self._perm: Tensor | None = None
        self._perm_pass = -1

    @property
    def batches_per_pass(self) -> int:
        if self.drop_last:
            return self.num_items // self.batch_size
        return math.ceil(self.num_items / self.batch_size)

    @property
    def leftover(self) -> int:
        """Indices per pass that ``drop_last`` skips (0 without it)."""
        return self.num_items % self.batch_size if self.drop_last else 0

    def _current_perm(self) -> Tensor:
        if self._perm is None or self._perm_pass != self.pass_index:
            self._perm = pass_permutation(self.num_items, self.seed, self.pass_index).to(self.device)
            self._perm_pass = self.pass_index
        return self._perm

    def next_batch(self) -> Tensor:
        """Indices of the next batch (int64, on ``device``); rolls over into the next pass."""
        perm = self._current_perm()
        start = self.position * self.batch_size
        idx = perm[start : start + self.batch_size]
        self.position += 1
        if self.position >= self.batches_per_pass:
            self.pass_index += 1
            self.position = 0
        return idx

    def iter_pass(self) -> Iterator[Tensor]:
        """The remaining batches of the current pass (all of it when at a pass boundary)."""
        current = self.pass_index
        while self.pass_index == current:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        return {
            "num_items": self.num_items,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "drop_last": self.drop_last,
            "pass_index": self.pass_index,
            "position": self.position,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("num_items", "batch_size", "seed", "drop_last"):
            if state[key] != getattr(self, key):
                raise OfflineRLError(
                    f"sampler state has {key}={state[key]!r}, this sampler has {getattr(self, key)!r}"
                )
        self.pass_index = int(state["pass_index"])
        self.position = int(state["position"])
