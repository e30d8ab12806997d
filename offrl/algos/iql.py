"""Implicit Q-Learning for continuous actions (Kostrikov, Nair & Levine 2021, "Offline Reinforcement
Learning with Implicit Q-Learning").

IQL never evaluates Q on an action the dataset does not contain. Three regressions, per step:

    value   V(s)      ← upper expectile (τ) of min_e Q_target_e(s, a_data)        (expectile_loss)
    critic  Q_e(s, a) ← r + γ·(1 − terminal)·V(s′)                               (iql_q_loss)
    actor   π         ← argmax E[ w · log π(a_data|s) ],  w = min(exp(β·A), 100),
                         A = min_e Q_target_e(s, a_data) − V(s)                  (weighted_nll_loss)

then a Polyak update of the target critics. As in the authors' reference implementation, the
critic's target and the actor's advantage use the value network just updated. The value
regression on the target critics' minimum, the target computed from V(s′) and the advantage
weights are all constants for the other nets, so each loss moves only its own network.

The losses here are shared with the discrete variant (``offrl.algos.iql_discrete``), which
subclasses :class:`IQL` and swaps only the networks and how Q(s, a) and log π(a|s) are read.
Defaults follow the paper's locomotion settings (also CORL's): 2×256 MLPs, Adam 3e-4, batch 256,
expectile 0.7, inverse temperature 3, weights clipped at 100.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, cast

import torch
from torch import Tensor, nn

from offrl import nets
from offrl.algos.base import Algorithm, step
from offrl.algos.registry import register
from offrl.config import option, validate
from offrl.losses import advantage_weights, td_target, weighted_nll_loss
from offrl.policies.artifact import TorchPolicy
from offrl.types import Batch

# Dataset actions on the bounds (±1) have infinite pre-tanh values; their likelihood is taken just inside.
ACTION_EPS = 1e-6


@dataclass(frozen=True)
class IQLConfig:
    """Defaults: Kostrikov et al. 2021 (Appendix B, MuJoCo locomotion), as also run by CORL."""

    hidden: tuple[int, ...] = option(
        (256, 256), "hidden sizes of the critic, value and actor MLPs (paper: 256, 256)", low=1, nonempty=True
    )
    n_critics: int = option(
        2, "critics in the Q-ensemble; the value target and advantages use their minimum", low=1
    )
    actor_lr: float = option(3e-4, "actor Adam learning rate (paper: 3e-4)", low=0.0, low_open=True)
    critic_lr: float = option(3e-4, "critic Adam learning rate (paper: 3e-4)", low=0.0, low_open=True)
    value_lr: float = option(3e-4, "value Adam learning rate (paper: 3e-4)", low=0.0, low_open=True)
    batch_size: int = option(256, "transitions per gradient step (paper: 256)", low=1)
    gamma: float = option(0.99, "discount factor", low=0.0, high=1.0)
    tau: float = option(
        5e-3, "Polyak rate of the target critics (paper: 0.005)", low=0.0, high=1.0, low_open=True
    )
    expectile: float = option(
        0.7,
        "expectile of the value regression, in (0, 1); 0.5 is SARSA-like, →1 approaches max (paper: 0.7)",
        low=0.0,
        high=1.0,
        low_open=True,
        high_open=True,
    )
    beta: float = option(
        3.0,
        "inverse temperature β of the advantage weights exp(β·A); 0 gives behaviour cloning (paper: 3)",
        low=0.0,
    )
    max_weight: float = option(
        100.0, "upper clip of the advantage weights (paper: 100)", low=0.0, low_open=True
    )
    max_grad_norm: float | None = option(
        None, "clip each network's gradient norm; none: no clipping", low=0.0, low_open=True
    )
    normalize_obs: bool = option(True, "standardise observations with the dataset's mean and std")

    def __post_init__(self) -> None:
        validate(self, "iql")  # the declared ranges and choices of every field


# -- losses (pure) -------------------------------------------------------------------------------
def expectile_loss(diff: Tensor, expectile: float) -> Tensor:  # (B,) -> scalar
    """Asymmetric squared error mean |τ − 1(diff < 0)|·diff², with diff = Q(s, a) − V(s).

    For τ > 0.5 positive differences (V below Q) cost more, so V settles at an upper expectile.
    """
    weight = torch.where(diff < 0, 1.0 - expectile, expectile)
    return (weight * diff.pow(2)).mean()


def iql_q_loss(q: Tensor, target: Tensor) -> Tensor:  # (E, B), (B,) -> scalar
    """Squared TD error averaged over critics and batch (as CORL; ``losses.critic_loss`` sums critics)."""
    return (q - target).pow(2).mean()


# -- algorithm -----------------------------------------------------------------------------------
@register
class IQL(Algorithm):
    """IQL with a Q-ensemble, a state-value net and a tanh-Gaussian actor fitted by AWR."""

    name: ClassVar[str] = "iql"
    discrete: ClassVar[bool] = False
    Config: ClassVar[type] = IQLConfig
    config: IQLConfig
    online_form: ClassVar[str | None] = "IQL, the same losses (CORL's fine-tuning)"

    def build(self) -> None:
        cfg = self.config
        # built in the same order for both variants, so a seed fixes every initialisation
        self.nets["critic"] = self._build_critic()
        self.nets["critic_target"] = nets.freeze(self._build_critic())
        nets.hard_update(self.nets["critic_target"], self.nets["critic"])
        self.nets["value"] = nets.mlp(self.obs_dim, 1, cfg.hidden)
        self.nets["actor"] = self._build_actor()
        self.optimize("value", self.value, lr=cfg.value_lr)
        self.optimize("critic", self.critic, lr=cfg.critic_lr)
        self.optimize("actor", self.actor, lr=cfg.actor_lr)

    # -- what the discrete variant replaces --------------------------------------------------------
    def _build_critic(self) -> nn.Module:
        return nets.QEnsemble(self.config.n_critics, self.obs_dim, self.act_dim, self.config.hidden)

    def _build_actor(self) -> nn.Module:
        return nets.TanhGaussianActor(self.obs_dim, self.act_dim, self.config.hidden)

    def q_data(self, critic: nn.Module, obs: Tensor, actions: Tensor) -> Tensor:
        """Each critic's Q at the dataset actions: (B, obs_dim), (B, A) -> (E, B)."""
        return critic(obs, actions)

    def log_prob(self, obs: Tensor, actions: Tensor) -> Tensor:
        """log π(a_data|s) with its graph: (B, obs_dim), (B, A) -> (B,)."""
        actor = cast(nets.TanhGaussianActor, self.actor)
        return actor.log_prob(obs, actions, ACTION_EPS)

    def policy(self) -> TorchPolicy:
        return self._policy("tanh_gaussian", self.actor, self.config.hidden)

    @torch.no_grad()
    def explore(self, obs: Tensor, exploration: float | None) -> Tensor:
        actor = cast(nets.TanhGaussianActor, self.actor)
        return actor.sample(obs, self.generator)[0]

    # -- accessors ---------------------------------------------------------------------------------
    @property
    def actor(self) -> nn.Module:
        return self.nets["actor"]

    @property
    def critic(self) -> nn.Module:
        return self.nets["critic"]

    @property
    def critic_target(self) -> nn.Module:
        return self.nets["critic_target"]

    @property
    def value(self) -> nn.Module:
        return self.nets["value"]

    def target_networks(self) -> list[nn.Module]:
        return [self.critic_target]

    def q_values(self, obs: Tensor, actions: Tensor) -> Tensor:
        return self.q_data(self.critic, obs, actions).min(0).values

    # -- pieces of an update -----------------------------------------------------------------------
    @torch.no_grad()
    def target_q(self, obs: Tensor, actions: Tensor) -> Tensor:
        """min_e Q_target_e(s, a_data): (B,). Regression target of V and first half of the advantage."""
        return self.q_data(self.critic_target, obs, actions).min(0).values

    @torch.no_grad()
    def values_now(self, obs: Tensor, next_obs: Tensor) -> tuple[Tensor, Tensor]:
        """V(s) and V(s′) from the current value net, one pass: (B,), (B,)."""
        v = self.value(torch.cat([obs, next_obs])).squeeze(-1)
        return v[: obs.shape[0]], v[obs.shape[0] :]

    def _value_loss(self, obs: Tensor, q_t: Tensor) -> tuple[Tensor, Tensor]:
        v = self.value(obs).squeeze(-1)  # (B,)
        return expectile_loss(q_t - v, self.config.expectile), v

    def _critic_loss(self, batch: Batch, obs: Tensor, next_v: Tensor) -> tuple[Tensor, Tensor]:
        target = td_target(batch.rewards, batch.terminals, next_v, self.config.gamma)
        q = self.q_data(self.critic, obs, batch.actions)  # (E, B)
        return iql_q_loss(q, target), q

    def _actor_loss(self, obs: Tensor, actions: Tensor, adv: Tensor) -> tuple[Tensor, Tensor]:
        weights = advantage_weights(self.config.beta * adv, self.config.max_weight)
        return weighted_nll_loss(self.log_prob(obs, actions), weights), weights

    def loss_terms(self, batch: Batch) -> dict[str, Tensor]:
        """Every loss term with its graph, nothing stepped; each key names the optimiser it drives."""
        obs, next_obs = batch.obs.flatten(1), batch.next_obs.flatten(1)
        q_t = self.target_q(obs, batch.actions)
        value_loss, _ = self._value_loss(obs, q_t)
        v, next_v = self.values_now(obs, next_obs)
        critic_loss, _ = self._critic_loss(batch, obs, next_v)
        actor_loss, _ = self._actor_loss(obs, batch.actions, q_t - v)
        return {"value": value_loss, "critic": critic_loss, "actor": actor_loss}

    def _step(self, batch: Batch) -> dict[str, Tensor]:
        """One update on the device (host-side counters stay in :meth:`update`: it may be a CUDA graph)."""
        cfg = self.config
        obs, next_obs = batch.obs.flatten(1), batch.next_obs.flatten(1)
        q_t = self.target_q(obs, batch.actions)
        value_loss, v_old = self._value_loss(obs, q_t)
        step(self.optimizers["value"], value_loss, self.value.parameters(), cfg.max_grad_norm)
        # critic target and advantages from the value net just stepped (reference implementation)
        v, next_v = self.values_now(obs, next_obs)
        critic_loss, q = self._critic_loss(batch, obs, next_v)
        step(self.optimizers["critic"], critic_loss, self.critic.parameters(), cfg.max_grad_norm)
        adv = q_t - v
        actor_loss, weights = self._actor_loss(obs, batch.actions, adv)
        step(self.optimizers["actor"], actor_loss, self.actor.parameters(), cfg.max_grad_norm)
        nets.soft_update(self.critic_target, self.critic, cfg.tau)
        return {
            "value_loss": value_loss.detach(),
            "critic_loss": critic_loss.detach(),
            "actor_loss": actor_loss.detach(),
            "v_mean": v_old.detach().mean(),
            "q_data_mean": q.detach().mean(),
            "adv_mean": adv.mean(),
            "weight_mean": weights.mean(),
            "weight_clipped_frac": (weights >= cfg.max_weight).float().mean(),
        }
