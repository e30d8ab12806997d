"""Replay for fine-tuning: the offline dataset (read-only, in learning units) beside a ring of online
transitions, each batch drawn from both at a fixed ratio.

Online rows are stored as the online loop gives them (observations in environment units, actions in
learning units) and normalised with the offline run's frozen normaliser when sampled, so every batch is
in the learning units the pretrained algorithm was trained in. For algorithms that learn from returns
(Cal-QL), an episode's rows enter the ring when it ends, with their discounted returns-to-go; the others'
rows enter at once.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from offrl.data.dataset import TransitionDataset
from offrl.errors import CheckpointError
from offrl.losses import return_to_go
from offrl.online.buffer import ReplayBuffer, Transition
from offrl.preprocess import ObsNormalizer
from offrl.types import Batch


class MixedReplay:
    """``offline_ratio`` of every batch from ``offline`` (None: none), the rest from the online ring;
    ``offline_ratio=None`` draws uniformly over both (the offline share shrinks as online rows arrive)."""

    def __init__(
        self,
        offline: TransitionDataset | None,
        capacity: int,
        obs_dim: int,
        act_dim: int,
        *,
        discrete: bool,
        normalizer: ObsNormalizer,
        offline_ratio: float | None,
        returns_gamma: float | None = None,
        reward_floor: float = 0.0,
        device: str | torch.device = "cpu",
    ) -> None:
        self.offline = offline
        self.ring = ReplayBuffer(capacity, obs_dim, act_dim, discrete=discrete, device=device)
        self.normalizer = normalizer
        self.offline_ratio = offline_ratio if offline is not None else 0.0  # None: in proportion
        self.returns_gamma = returns_gamma  # set: rows wait for their episode's end, then carry returns
        self.reward_floor = reward_floor
        self.returns = torch.zeros(capacity, device=self.ring.device)
        self.pending: list[Transition] = []  # the current episode's rows (returns algorithms, one env)

    def __len__(self) -> int:
        return len(self.ring)

    @property
    def can_checkpoint(self) -> bool:
        return True

    def add(self, t: Transition) -> None:
        if self.returns_gamma is None:
            self.ring.add(t)
            return
        if t.rewards.shape[0] != 1:
            raise ValueError("fine-tuning an algorithm that learns from returns runs one environment")
        self.pending.append(t)
        if bool(t.terminals[0]) or bool(t.timeouts[0]):
            self._flush_episode()

    def _flush_episode(self) -> None:
        rows = self.pending
        self.pending = []
        rewards = torch.cat([r.rewards for r in rows]).cpu()
        self.reward_floor = min(self.reward_floor, float(rewards.min()))
        terminals = torch.cat([r.terminals for r in rows]).cpu()
        assert self.returns_gamma is not None
        returns, _ = return_to_go(
            rewards,
            terminals,
            torch.tensor([len(rows)]),
            self.returns_gamma,
            reward_floor=self.reward_floor,
        )
        for t, g in zip(rows, returns, strict=True):
            self.returns[self.ring.pos] = float(g)
            self.ring.add(t)

    def cut_episode(self) -> None:
        """End the episode in progress as a time-limit truncation (a resumed loop restarts its episodes)."""
        if self.pending:
            last = self.pending[-1]
            self.pending[-1] = Transition(
                **{
                    **{n: getattr(last, n) for n in ReplayBuffer.FIELDS},
                    "timeouts": torch.ones_like(last.timeouts),
                }
            )
            self._flush_episode()
            return
        if len(self.ring):
            last_row = (self.ring.pos - 1) % self.ring.capacity
            if not (self.ring.terminals[last_row] or self.ring.timeouts[last_row]):
                self.ring.timeouts[last_row] = 1.0

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        """A batch in learning units: ``round(offline_ratio · batch_size)`` offline rows, the rest online
        (all offline while the ring is still empty)."""
        if not len(self.ring):
            n_off = batch_size
        elif self.offline_ratio is None:
            assert self.offline is not None
            n_off = round(batch_size * len(self.offline) / (len(self.offline) + len(self.ring)))
        else:
            n_off = round(self.offline_ratio * batch_size)
        n_on = batch_size - n_off
        parts: list[Batch] = []
        if n_off and self.offline is not None:
            idx = torch.randint(len(self.offline), (n_off,), generator=generator, device=self.offline.device)
            parts.append(self.offline.batch(idx))
        if n_on:
            idx = torch.randint(len(self.ring), (n_on,), generator=generator, device=self.ring.device)
            b = self.ring.batch(idx)
            parts.append(
                Batch(
                    obs=self.normalizer(b.obs),
                    actions=b.actions,
                    rewards=b.rewards,
                    next_obs=self.normalizer(b.next_obs),
                    terminals=b.terminals,
                    returns=self.returns[idx] if self.returns_gamma is not None else None,
                )
            )
        if len(parts) == 1:
            return parts[0]
        returns = [p.returns for p in parts]
        return Batch(
            obs=torch.cat([p.obs for p in parts]),
            actions=torch.cat([p.actions for p in parts]),
            rewards=torch.cat([p.rewards for p in parts]),
            next_obs=torch.cat([p.next_obs for p in parts]),
            terminals=torch.cat([p.terminals for p in parts]),
            returns=None if any(r is None for r in returns) else torch.cat(returns),  # type: ignore[arg-type]
        )

    # -- state -------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = {f"ring.{k}": v for k, v in self.ring.state_dict().items()}
        state["returns"] = self.returns[: len(self.ring)]
        state["reward_floor"] = self.reward_floor
        state["pending"] = len(self.pending)
        for name in ReplayBuffer.FIELDS:
            if self.pending:
                state[f"pending.{name}"] = torch.cat([getattr(t, name) for t in self.pending])
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        try:
            self.ring.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("ring.")})
            self.returns[: len(self.ring)] = state["returns"].to(self.returns)
            self.reward_floor = float(state["reward_floor"])
            n = int(state["pending"])
            self.pending = [
                Transition(**{name: state[f"pending.{name}"][i : i + 1] for name in ReplayBuffer.FIELDS})
                for i in range(n)
            ]
        except (KeyError, RuntimeError, ValueError) as exc:
            raise CheckpointError(f"fine-tuning replay does not fit this run ({exc})") from None

    def online_rows(self) -> dict[str, Tensor]:
        """The online transitions from oldest to newest (observations in environment units, actions in
        learning units), the episode in progress included."""
        rows = {name: self.ring.ordered(name) for name in ReplayBuffer.FIELDS}
        if self.pending:
            for name in ReplayBuffer.FIELDS:
                rows[name] = torch.cat([rows[name], *(getattr(t, name) for t in self.pending)])
        return rows


def prior_data_replay(algo: Any, source: str, ratio: float, capacity: int) -> MixedReplay:
    """An online algorithm's replay with a dataset beside it, ``ratio`` of every batch from the first
    update (RLPD's symmetric sampling). The algorithm normalises inside its update, so both parts stay in
    its input units: observations as they are, actions scaled to [−1, 1]."""
    from offrl.datasets_registry import resolve_dataset

    data = TransitionDataset.load(resolve_dataset(source), algo.device)
    if data.observation_space.shape != algo.observation_space.shape or type(data.action_space) is not type(
        algo.action_space
    ):
        raise ValueError(f"prior_data {source}: its spaces do not match the environment's")
    return MixedReplay(
        algo.prepare_dataset(data),
        capacity,
        algo.obs_dim,
        algo.act_dim,
        discrete=algo.discrete,
        normalizer=algo.normalizer,
        offline_ratio=ratio,
        device=algo.device,
    )
