"""Soft Actor-Critic (Haarnoja et al. 2018, with automatic entropy tuning), online, continuous actions.

Defaults follow Stable-Baselines3 and CleanRL (``sac_continuous_action.py``): Adam 3e-4, batch 256,
buffer 10⁶, 5000 uniform-random steps before learning, τ = 5e-3, γ = 0.99, twin (256, 256) critics,
α tuned towards entropy −|A|. One update, in order: critic step on the soft TD target, actor step
against the updated critics, α step, Polyak update of the target critics. One actor pass over
``[s; s′]`` serves both the TD target (s′ half, detached) and the actor loss (s half): the critic
step does not touch the actor, so the samples are still the current policy's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from offrl import nets
from offrl.algos.base import GaussianActorCritic, step
from offrl.algos.registry import register
from offrl.config import option, validate
from offrl.losses import critic_loss, sac_actor_loss, sac_alpha_loss, soft_td_target
from offrl.online.buffer import ReplayBuffer
from offrl.online.loop import OnlineAlgorithm, Storage
from offrl.online.mixed import MixedReplay, prior_data_replay
from offrl.types import Batch


@dataclass(frozen=True)
class SACConfig:
    """Defaults: Stable-Baselines3 SAC and CleanRL ``sac_continuous_action.py``."""

    actor_hidden: tuple[int, ...] = option(
        (256, 256), "actor MLP hidden sizes (SB3/CleanRL: 256, 256)", low=1, nonempty=True
    )
    critic_hidden: tuple[int, ...] = option(
        (256, 256), "critic MLP hidden sizes (SB3/CleanRL: 256, 256)", low=1, nonempty=True
    )
    n_critics: int = option(2, "critics in the Q-ensemble (twin critics); targets use their minimum", low=1)
    actor_lr: float = option(3e-4, "actor Adam learning rate (SB3 3e-4)", low=0.0, low_open=True)
    critic_lr: float = option(
        3e-4, "critic Adam learning rate (SB3 3e-4; CleanRL 1e-3)", low=0.0, low_open=True
    )
    alpha_lr: float = option(3e-4, "entropy temperature Adam learning rate", low=0.0, low_open=True)
    batch_size: int = option(256, "transitions per gradient step", low=1)
    buffer_size: int = option(1_000_000, "replay buffer capacity", low=1)
    learning_starts: int = option(5000, "environment steps of uniform random actions before learning", low=0)
    train_freq: int = option(1, "vector-env steps between training phases", low=1)
    gradient_steps: int = option(1, "gradient steps per training phase", low=1)
    gamma: float = option(0.99, "discount factor", low=0.0, high=1.0)
    tau: float = option(5e-3, "Polyak rate of the target critics", low=0.0, high=1.0, low_open=True)
    auto_alpha: bool = option(True, "tune the entropy temperature α towards the target entropy")
    init_alpha: float = option(1.0, "initial entropy temperature α", low=0.0, low_open=True)
    target_entropy: float | None = option(None, "target policy entropy for α tuning; none: −|A|")
    num_envs: int = option(1, "parallel training sub-environments", low=1)
    max_grad_norm: float | None = option(
        None, "clip each network's gradient norm; none: no clipping", low=0.0, low_open=True
    )
    critic_layer_norm: bool = option(False, "LayerNorm after every hidden layer of the critics (RLPD)")
    target_subset: int | None = option(
        None,
        "the TD target takes the minimum over this many critics drawn at random each update (RLPD: 2 of "
        "n_critics = 10); none: over all critics",
        low=1,
    )
    prior_data: str | None = option(
        None,
        "a dataset (file or name) whose transitions make up prior_ratio of every batch from the start "
        "(RLPD's symmetric sampling of offline and online data)",
    )
    prior_ratio: float = option(0.5, "fraction of each batch from prior_data", low=0.0, high=1.0)

    def __post_init__(self) -> None:
        validate(
            self,
            "sac",
            {"target_subset": self.target_subset is None or self.target_subset <= self.n_critics},
        )


@register
class SAC(GaussianActorCritic, OnlineAlgorithm):
    """Soft Actor-Critic with twin critics and automatic entropy tuning (continuous actions)."""

    name: ClassVar[str] = "sac"
    discrete: ClassVar[bool] = False
    Config: ClassVar[type] = SACConfig
    config: SACConfig

    def build(self) -> None:
        cfg = self.config
        self.nets["actor"] = nets.TanhGaussianActor(self.obs_dim, self.act_dim, cfg.actor_hidden)
        self.build_critics(cfg.n_critics, cfg.critic_hidden, layer_norm=cfg.critic_layer_norm)
        self.nets["log_alpha"] = nets.LearnedScalar(math.log(cfg.init_alpha), learn=cfg.auto_alpha)
        self.target_entropy = -float(self.act_dim) if cfg.target_entropy is None else cfg.target_entropy
        self.optimize("actor", self.actor, lr=cfg.actor_lr)
        self.optimize("critic", self.critic, lr=cfg.critic_lr)
        if cfg.auto_alpha:
            self.optimize("alpha", self.nets["log_alpha"], lr=cfg.alpha_lr)

    # -- loop hooks --------------------------------------------------------------------------------
    def make_storage(self) -> ReplayBuffer | MixedReplay:
        cfg = self.config
        if cfg.prior_data is None:
            return ReplayBuffer(
                cfg.buffer_size, self.obs_dim, self.act_dim, discrete=False, device=self.device
            )
        return prior_data_replay(self, cfg.prior_data, cfg.prior_ratio, cfg.buffer_size)

    @torch.no_grad()
    def act_for_collection(
        self, obs: Tensor, env_steps: int, total_steps: int
    ) -> tuple[Tensor, dict[str, Tensor]]:
        if env_steps < self.config.learning_starts:
            shape = (obs.shape[0], self.act_dim)
            return torch.rand(shape, generator=self.generator, device=self.device) * 2.0 - 1.0, {}
        return self.actor.sample(self.normalizer(obs), self.generator)[0], {}

    def learn(self, storage: Storage, env_steps: int, total_steps: int) -> list[dict[str, Tensor]]:
        cfg = self.config
        assert isinstance(storage, ReplayBuffer | MixedReplay)
        if env_steps < cfg.learning_starts or (env_steps // self.num_envs) % cfg.train_freq:
            return []
        return [
            self.update(storage.sample(cfg.batch_size, self.generator)) for _ in range(cfg.gradient_steps)
        ]

    # -- update ------------------------------------------------------------------------------------
    def _step(self, batch: Batch) -> dict[str, Tensor]:
        cfg = self.config
        obs, next_obs = self.normalizer(batch.obs), self.normalizer(batch.next_obs)
        b = obs.shape[0]
        pi, log_pi = self.actor.sample(torch.cat([obs, next_obs]), self.generator)  # (2B, A), (2B,)
        log_alpha = self.nets["log_alpha"]()
        alpha = log_alpha.detach().exp()
        with torch.no_grad():
            next_q = self.critic_target(next_obs, pi[b:])  # (E, B)
            if cfg.target_subset is not None and cfg.target_subset < cfg.n_critics:
                pick = torch.randperm(cfg.n_critics, generator=self.generator, device=self.device)
                next_q = next_q[pick[: cfg.target_subset]]
            target = soft_td_target(batch.rewards, batch.terminals, next_q, log_pi[b:], alpha, cfg.gamma)
        q = self.critic(obs, batch.actions)
        c_loss = critic_loss(q, target)
        step(self.optimizers["critic"], c_loss, self.critic.parameters(), cfg.max_grad_norm)

        # the critic's weights enter as constants: the actor loss moves the actor only
        q_pi = nets.call_frozen(self.critic, obs, pi[:b])
        a_loss = sac_actor_loss(q_pi, log_pi[:b], alpha)
        step(self.optimizers["actor"], a_loss, self.actor.parameters(), cfg.max_grad_norm)
        metrics = {
            "critic_loss": c_loss.detach(),
            "actor_loss": a_loss.detach(),
            "q_mean": q.detach().mean(),
            "alpha": alpha,
            "entropy": -log_pi[:b].detach().mean(),
        }
        if cfg.auto_alpha:
            al = sac_alpha_loss(log_alpha, log_pi[:b], self.target_entropy)
            step(self.optimizers["alpha"], al)
            metrics["alpha_loss"] = al.detach()
        nets.soft_update(self.critic_target, self.critic, cfg.tau)
        return metrics
