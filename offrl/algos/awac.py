"""AWAC: advantage-weighted actor-critic (Nair et al. 2020, "Accelerating Online Reinforcement
Learning with Offline Datasets"), offline, as run by CORL's ``awac`` (Tarasov et al. 2022).

The actor is weighted maximum likelihood of the dataset's actions,

    actor loss = −mean_s [ min(exp(A(s, a_data) / λ), w_max) · log π(a_data | s) ]
    A(s, a_data) = min_e Q_e(s, a_data) − min_e Q_e(s, a),  a ~ π(·|s)   (no gradient)

and the critics regress onto r + γ(1 − terminal)·min_e Q'_e(s′, a′), a′ ~ π(·|s′), without an
entropy term. The policy is offrl's tanh-squashed Gaussian (CORL uses an unsquashed Gaussian with a
state-independent std and clips its samples); log π(a_data|s) is its exact density, with dataset
actions taken just inside (−1, 1).

One update, as CORL: critic step; actor step with advantages from the updated critics; Polyak
update of the target critics. The π(·|s) and π(·|s′) draws come from one actor pass (the actor does
not change during the critic step), and Q(s, a_data) and Q(s, a~π) from one ensemble call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from offrl import nets
from offrl.algos.base import GaussianActorCritic, step
from offrl.algos.registry import register
from offrl.config import option, validate
from offrl.losses import advantage_weights, critic_loss, td_target, weighted_nll_loss
from offrl.types import Batch

# Dataset actions on the bounds (±1) have infinite pre-tanh values; the likelihood is taken just inside.
ACTION_EPS = 1e-6


@dataclass(frozen=True)
class AWACConfig:
    """Defaults follow CORL's ``awac`` (learning rate, γ, τ, λ, advantage-weight clip, batch size)."""

    actor_hidden: tuple[int, ...] = option(
        (256, 256), "actor MLP hidden sizes (CORL uses 3×256)", low=1, nonempty=True
    )
    critic_hidden: tuple[int, ...] = option(
        (256, 256), "critic MLP hidden sizes (CORL uses 3×256)", low=1, nonempty=True
    )
    n_critics: int = option(2, "critics in the Q-ensemble; targets and advantages use their minimum", low=1)
    actor_lr: float = option(3e-4, "actor Adam learning rate (CORL: 3e-4)", low=0.0, low_open=True)
    critic_lr: float = option(3e-4, "critic Adam learning rate (CORL: 3e-4)", low=0.0, low_open=True)
    batch_size: int = option(256, "transitions per gradient step (CORL: 256)", low=1)
    gamma: float = option(0.99, "discount factor", low=0.0, high=1.0)
    tau: float = option(5e-3, "Polyak rate of the target critics", low=0.0, high=1.0, low_open=True)
    awac_lambda: float = option(
        1.0, "temperature λ of the advantage weights exp(A/λ) (CORL: 1)", low=0.0, low_open=True
    )
    exp_adv_max: float = option(
        100.0, "advantage weights are clipped to at most this (CORL: 100)", low=0.0, low_open=True
    )
    normalize_obs: bool = option(True, "normalise observations by dataset mean/std (CORL: true)")
    max_grad_norm: float | None = option(
        None, "clip each network's gradient norm; none: no clipping", low=0.0, low_open=True
    )

    def __post_init__(self) -> None:
        validate(self, "awac")  # the declared ranges and choices of every field


@register
class AWAC(GaussianActorCritic):
    """Offline AWAC with a tanh-Gaussian actor and a vectorised pair of critics."""

    name: ClassVar[str] = "awac"
    online_form: ClassVar[str | None] = "AWAC, the same losses (designed for fine-tuning)"
    discrete: ClassVar[bool] = False
    Config: ClassVar[type] = AWACConfig
    config: AWACConfig

    def build(self) -> None:
        cfg = self.config
        self.nets["actor"] = nets.TanhGaussianActor(self.obs_dim, self.act_dim, cfg.actor_hidden)
        self.build_critics(cfg.n_critics, cfg.critic_hidden)
        self.optimize("critic", self.critic, lr=cfg.critic_lr)
        self.optimize("actor", self.actor, lr=cfg.actor_lr)

    # -- accessors ---------------------------------------------------------------------------------

    # -- losses ------------------------------------------------------------------------------------
    @torch.no_grad()
    def policy_actions(self, obs: Tensor, next_obs: Tensor) -> tuple[Tensor, Tensor]:
        """One draw a ~ π(·|s) and one a′ ~ π(·|s′) per row, from one actor pass: (B,A), (B,A)."""
        actions, _ = self.actor.sample(torch.cat([obs, next_obs]), self.generator)
        return actions[: obs.shape[0]], actions[obs.shape[0] :]

    @torch.no_grad()
    def advantage(self, obs: Tensor, data_actions: Tensor, pi_actions: Tensor) -> Tensor:
        """min_e Q_e(s, a_data) − min_e Q_e(s, a~π), one ensemble call: (B,·), (B,A), (B,A) -> (B,)."""
        q = self.critic(torch.cat([obs, obs]), torch.cat([data_actions, pi_actions])).min(0).values
        return q[: obs.shape[0]] - q[obs.shape[0] :]

    def _critic_terms(self, batch: Batch, next_actions: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        next_obs = batch.next_obs.flatten(1)
        with torch.no_grad():
            next_v = self.critic_target(next_obs, next_actions).min(0).values
            target = td_target(batch.rewards, batch.terminals, next_v, self.config.gamma)
        q = self.critic(batch.obs.flatten(1), batch.actions)  # (E, B)
        loss = critic_loss(q, target)
        return loss, {"critic_loss": loss.detach(), "q_mean": q.detach().mean()}

    def _actor_terms(self, batch: Batch, pi_actions: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        cfg = self.config
        obs = batch.obs.flatten(1)
        adv = self.advantage(obs, batch.actions, pi_actions)
        weights = advantage_weights(adv / cfg.awac_lambda, cfg.exp_adv_max)
        log_prob = self.actor.log_prob(obs, batch.actions, ACTION_EPS)
        loss = weighted_nll_loss(log_prob, weights)
        metrics = {
            "actor_loss": loss.detach(),
            "adv_mean": adv.mean(),
            "weight_mean": weights.mean(),
            "weight_clipped": (weights >= cfg.exp_adv_max).float().mean(),
            "log_prob_data": log_prob.detach().mean(),
        }
        return loss, metrics

    def loss_terms(self, batch: Batch) -> dict[str, Tensor]:
        """Every loss term, graphs attached, nothing stepped; each key names the optimiser it drives."""
        pi_actions, next_actions = self.policy_actions(batch.obs.flatten(1), batch.next_obs.flatten(1))
        return {
            "critic": self._critic_terms(batch, next_actions)[0],
            "actor": self._actor_terms(batch, pi_actions)[0],
        }

    # -- update --------------------------------------------------------------------------------------
    def _step(self, batch: Batch) -> dict[str, Tensor]:
        """One update on the device (host-side counters stay in :meth:`update`: it may be a CUDA graph)."""
        cfg = self.config
        pi_actions, next_actions = self.policy_actions(batch.obs.flatten(1), batch.next_obs.flatten(1))
        loss, metrics = self._critic_terms(batch, next_actions)
        step(self.optimizers["critic"], loss, self.critic.parameters(), cfg.max_grad_norm)
        loss, actor_metrics = self._actor_terms(batch, pi_actions)
        step(self.optimizers["actor"], loss, self.actor.parameters(), cfg.max_grad_norm)
        nets.soft_update(self.critic_target, self.critic, cfg.tau)
        return {**metrics, **actor_metrics}
