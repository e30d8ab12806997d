"""Deep Q-Network (Mnih et al. 2015) with a double-Q target (van Hasselt et al. 2016), an optional
dueling head (Wang et al. 2016), ε-greedy exploration on a linear schedule and the Huber loss.

Defaults are CleanRL's ``dqn.py`` for CartPole (120-84 MLP, Adam 2.5e-4, batch 128, buffer 10⁴,
10⁴ steps before learning, an update every 10 steps, ε from 1 to 0.05 over half the run); CleanRL
copies the target every 500 environment steps, which at one update per 10 steps is every 50 updates.

The dueling streams are linear heads on a shared trunk, so ``V + A − mean(A)`` is itself linear in
the trunk's features: the exported policy folds them into a plain Q-network (kind ``q_greedy``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from offrl import nets
from offrl.algos.base import step
from offrl.algos.registry import register
from offrl.config import option
from offrl.losses import double_q_target, td_loss, td_target
from offrl.online.buffer import ReplayBuffer
from offrl.online.loop import OnlineAlgorithm, Storage
from offrl.online.mixed import MixedReplay, prior_data_replay
from offrl.policies.artifact import TorchPolicy
from offrl.types import Batch


@dataclass(frozen=True)
class DQNConfig:
    """Defaults: CleanRL ``dqn.py`` (CartPole-v1)."""

    hidden: tuple[int, ...] = option(
        (120, 84), "Q-network MLP hidden sizes (CleanRL: 120, 84)", low=1, nonempty=True
    )
    lr: float = option(2.5e-4, "Adam learning rate", low=0.0, low_open=True)
    batch_size: int = option(128, "transitions per gradient step", low=1)
    buffer_size: int = option(10_000, "replay buffer capacity", low=1)
    learning_starts: int = option(10_000, "environment steps collected before the first update", low=0)
    train_freq: int = option(10, "vector-env steps between training phases", low=1)
    gradient_steps: int = option(1, "gradient steps per training phase", low=1)
    gamma: float = option(0.99, "discount factor", low=0.0, high=1.0)
    target_update_interval: int = option(
        50, "gradient steps between target-network updates (CleanRL: 500 env steps = 50 updates)", low=1
    )
    tau: float = option(
        1.0,
        "target update rate: 1 copies the online network, < 1 is Polyak averaging",
        low=0.0,
        high=1.0,
        low_open=True,
    )
    eps_start: float = option(1.0, "initial ε of ε-greedy exploration", low=0.0, high=1.0)
    eps_end: float = option(0.05, "final ε", low=0.0, high=1.0)
    exploration_fraction: float = option(
        0.5, "fraction of the run over which ε falls linearly", low=0.0, high=1.0
    )
    double_q: bool = option(
        True, "double-Q target: the online network picks a′, the target network values it"
    )
    dueling: bool = option(False, "dueling head: Q = V + A − mean(A) on a shared trunk")
    huber_delta: float = option(
        1.0, "Huber loss threshold between quadratic and linear", low=0.0, low_open=True
    )
    max_grad_norm: float | None = option(
        None, "clip the gradient norm; none: no clipping", low=0.0, low_open=True
    )
    num_envs: int = option(1, "parallel training sub-environments", low=1)
    prior_data: str | None = option(
        None,
        "a dataset (file or name) whose transitions make up prior_ratio of every batch from the start "
        "(RLPD's symmetric sampling, for discrete actions)",
    )
    prior_ratio: float = option(0.5, "fraction of each batch from prior_data", low=0.0, high=1.0)


# -- losses and schedules (pure) -------------------------------------------------------------------
def linear_schedule(start: float, end: float, duration: float, t: float) -> float:
    """``start`` at t = 0, falling linearly to ``end`` at ``duration``, then constant."""
    if duration <= 0 or t >= duration:
        return end
    return start + (end - start) * t / duration


class DuelingQ(nn.Module):
    """Q(s, ·) = V(h) + A(h) − mean A(h), with linear V and A heads on a shared MLP trunk h."""

    def __init__(self, obs_dim: int, n_actions: int, hidden: Sequence[int], activation: str = "relu"):
        super().__init__()
        self.obs_dim, self.n_actions, self.hidden, self.activation = (
            obs_dim,
            n_actions,
            tuple(hidden),
            activation,
        )
        self.trunk = nets.mlp(obs_dim, hidden[-1], hidden[:-1], activation, output_activation=activation)
        self.value = nn.Linear(hidden[-1], 1)
        self.advantage = nn.Linear(hidden[-1], n_actions)

    def forward(self, obs: Tensor) -> Tensor:
        h = self.trunk(obs)
        adv = self.advantage(h)
        return self.value(h) + adv - adv.mean(-1, keepdim=True)

    @torch.no_grad()
    def folded(self) -> nets.DiscreteHead:
        """The same function as a plain ``DiscreteHead`` (exact up to float rounding)."""
        head = nets.DiscreteHead(self.obs_dim, self.n_actions, self.hidden, self.activation)
        head.to(self.value.weight.device)
        layers = head.net
        for i, module in enumerate(self.trunk):
            if isinstance(module, nn.Linear):
                layers[i].load_state_dict(module.state_dict())
        w_a, b_a = self.advantage.weight, self.advantage.bias  # (A, H), (A,)
        last: nn.Linear = layers[len(layers) - 1]  # type: ignore[assignment]
        last.weight.copy_(w_a - w_a.mean(0, keepdim=True) + self.value.weight)
        last.bias.copy_(b_a - b_a.mean() + self.value.bias)
        return head


@register
class DQN(OnlineAlgorithm):
    """Double DQN with ε-greedy exploration and an optional dueling head (discrete actions)."""

    name: ClassVar[str] = "dqn"
    discrete: ClassVar[bool] = True
    Config: ClassVar[type] = DQNConfig
    config: DQNConfig

    def build(self) -> None:
        cfg = self.config
        for name in ("q", "q_target"):
            if cfg.dueling:
                self.nets[name] = DuelingQ(self.obs_dim, self.act_dim, cfg.hidden)
            else:
                self.nets[name] = nets.DiscreteHead(self.obs_dim, self.act_dim, cfg.hidden)
        nets.hard_update(self.nets["q_target"], self.nets["q"])
        nets.freeze(self.nets["q_target"])
        self.optimize("q", self.nets["q"], lr=cfg.lr)

    def target_networks(self) -> list[nn.Module]:
        return [self.nets["q_target"]]

    def q_values(self, obs: Tensor, actions: Tensor) -> Tensor:
        return self.nets["q"](obs).gather(1, actions.long().unsqueeze(1)).squeeze(1)

    def policy(self) -> TorchPolicy:
        q = self.nets["q"]
        net = q.folded() if isinstance(q, DuelingQ) else q  # a folded copy: it does not follow training
        return self._policy("q_greedy", net, self.config.hidden)

    def act(self, obs: np.ndarray, *, deterministic: bool = True) -> np.ndarray:
        if self.config.dueling:  # the folded policy is a snapshot, so fold afresh
            return self.policy().act(obs, deterministic=deterministic)
        return super().act(obs, deterministic=deterministic)

    def epsilon(self, env_steps: int, total_steps: int) -> float:
        cfg = self.config
        return linear_schedule(cfg.eps_start, cfg.eps_end, cfg.exploration_fraction * total_steps, env_steps)

    # -- loop hooks --------------------------------------------------------------------------------
    def make_storage(self) -> ReplayBuffer | MixedReplay:
        cfg = self.config
        if cfg.prior_data is None:
            return ReplayBuffer(
                cfg.buffer_size, self.obs_dim, self.act_dim, discrete=True, device=self.device
            )
        return prior_data_replay(self, cfg.prior_data, cfg.prior_ratio, cfg.buffer_size)

    @torch.no_grad()
    def act_for_collection(
        self, obs: Tensor, env_steps: int, total_steps: int
    ) -> tuple[Tensor, dict[str, Tensor]]:
        n = obs.shape[0]
        greedy = self.nets["q"](self.normalizer(obs)).argmax(-1)
        random = torch.randint(self.act_dim, (n,), generator=self.generator, device=self.device)
        explore = torch.rand(n, generator=self.generator, device=self.device) < self.epsilon(
            env_steps, total_steps
        )
        return torch.where(explore, random, greedy), {}

    def learn(self, storage: Storage, env_steps: int, total_steps: int) -> list[dict[str, Tensor]]:
        cfg = self.config
        assert isinstance(storage, ReplayBuffer | MixedReplay)
        if env_steps < cfg.learning_starts or (env_steps // self.num_envs) % cfg.train_freq:
            return []
        eps = torch.tensor(self.epsilon(env_steps, total_steps))
        out = []
        for _ in range(cfg.gradient_steps):
            metrics = self.update(storage.sample(cfg.batch_size, self.generator))
            metrics["epsilon"] = eps
            out.append(metrics)
        return out

    # -- update ------------------------------------------------------------------------------------
    def _step(self, batch: Batch) -> dict[str, Tensor]:
        cfg = self.config
        q_net, q_target = self.nets["q"], self.nets["q_target"]
        obs, next_obs = self.normalizer(batch.obs), self.normalizer(batch.next_obs)
        b = obs.shape[0]
        with torch.no_grad():
            q_next_target = q_target(next_obs)
        if cfg.double_q:  # one pass over [s; s′]; the s′ half only picks the target's action
            q_all = q_net(torch.cat([obs, next_obs]))
            q_obs = q_all[:b]
            target = double_q_target(
                batch.rewards, batch.terminals, q_all[b:].detach(), q_next_target, cfg.gamma
            )
        else:
            q_obs = q_net(obs)
            target = td_target(batch.rewards, batch.terminals, q_next_target.max(-1).values, cfg.gamma)
        q = q_obs.gather(-1, batch.actions.long().unsqueeze(-1)).squeeze(-1)
        loss = td_loss(q, target, "huber", cfg.huber_delta)
        step(self.optimizers["q"], loss, q_net.parameters(), cfg.max_grad_norm)
        return {"loss": loss.detach(), "q_mean": q.detach().mean()}

    def after_update(self, metrics: dict[str, Tensor]) -> dict[str, Tensor]:
        cfg = self.config  # target updates every target_update_interval updates (a host-side counter)
        if self.num_updates % cfg.target_update_interval == 0:
            if cfg.tau >= 1.0:
                nets.hard_update(self.nets["q_target"], self.nets["q"])
            else:
                nets.soft_update(self.nets["q_target"], self.nets["q"], cfg.tau)
        return metrics
