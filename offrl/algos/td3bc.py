"""TD3+BC (Fujimoto & Gu 2021, "A Minimalist Approach to Offline Reinforcement Learning").

TD3 with one change to the actor: a behaviour-cloning term and a Q term rescaled so that neither
dominates whatever the reward scale,

    actor loss = −λ·mean_s Q1(s, π(s)) + mean ‖π(s) − a_data‖²,  λ = α / mean_s |Q1(s, π(s))|

with λ a constant (no gradient). The critics are TD3's: two critics (one ``QEnsemble``) regress
onto r + γ(1 − terminal)·min_e Q'_e(s′, a′) at a′ = clip(π'(s′) + clip(ε, −c, c), −1, 1),
ε ~ N(0, σ²) (target policy smoothing). The actor and both targets move every ``policy_freq``-th
update only (delayed policy updates). Defaults are those of the paper and of CORL's ``td3_bc``
(Tarasov et al. 2022).

One update: critic step; then, on updates 0, policy_freq, 2·policy_freq, … (counted from 0, so the
first update trains the actor too), actor step against the updated critics and Polyak updates of
the target actor and target critics. The original code counts from 1 and so skips the actor on the
first update; over a run the two schedules differ by that one update.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from offrl import nets
from offrl.algos.base import ActorCritic, step
from offrl.algos.registry import register
from offrl.config import option, validate
from offrl.losses import critic_loss, td_target
from offrl.policies.artifact import TorchPolicy
from offrl.types import Batch

ACTOR_METRICS = ("actor_loss", "bc_loss", "lambda")
EXPLORATION_NOISE = 0.1  # TD3's Gaussian exploration noise (fine-tuning), in learning units


@dataclass(frozen=True)
class TD3BCConfig:
    """Defaults: Fujimoto & Gu (2021), Table 5, as run by CORL's ``td3_bc``."""

    actor_hidden: tuple[int, ...] = option(
        (256, 256), "actor MLP hidden sizes (paper, CORL: 2×256)", low=1, nonempty=True
    )
    critic_hidden: tuple[int, ...] = option(
        (256, 256), "critic MLP hidden sizes (paper, CORL: 2×256)", low=1, nonempty=True
    )
    n_critics: int = option(2, "critics in the Q-ensemble; the TD target uses their minimum (TD3: 2)", low=1)
    actor_lr: float = option(3e-4, "actor Adam learning rate", low=0.0, low_open=True)
    critic_lr: float = option(3e-4, "critic Adam learning rate", low=0.0, low_open=True)
    batch_size: int = option(256, "transitions per gradient step", low=1)
    gamma: float = option(0.99, "discount factor", low=0.0, high=1.0)
    tau: float = option(
        5e-3, "Polyak rate of the target actor and target critics", low=0.0, high=1.0, low_open=True
    )
    policy_noise: float = option(
        0.2, "std of the target policy smoothing noise, in [−1, 1] action units", low=0.0
    )
    noise_clip: float = option(0.5, "the smoothing noise is clipped to ±noise_clip", low=0.0)
    policy_freq: int = option(2, "one actor step and target update per this many critic steps", low=1)
    alpha: float = option(2.5, "α in λ = α / mean|Q(s, π(s))|: weight of the Q term against BC", low=0.0)
    bc_weight: float = option(
        1.0, "weight of the BC term (1: TD3+BC; 0: TD3 with a normalised Q term)", low=0.0
    )
    online_bc_decay: float = option(
        0.25,
        "fine-tuning (offrl finetune): the fraction of the online steps over which bc_weight decays "
        "linearly to 0, turning TD3+BC into TD3 (0: TD3 from the first online step)",
        low=0.0,
        high=1.0,
    )
    normalize_obs: bool = option(True, "normalise observations by dataset mean/std (paper, CORL: true)")
    max_grad_norm: float | None = option(
        None, "clip each network's gradient norm; none: no clipping", low=0.0, low_open=True
    )

    def __post_init__(self) -> None:
        validate(self, "td3bc")  # the declared ranges and choices of every field


# -- losses (pure) -------------------------------------------------------------------------------
def smoothing_noise(
    shape: torch.Size | tuple[int, ...],
    std: float,
    clip: float,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Target policy smoothing noise clip(N(0, std²), −clip, clip) of the given shape."""
    noise = nets.randn(shape, generator, device) * std
    return noise.clamp(-clip, clip)


def td3bc_lambda(q_pi: Tensor, alpha: float) -> Tensor:
    """λ = α / mean|Q(s, π(s))|, a constant for the actor's gradient: (B,) -> ()."""
    return alpha / q_pi.abs().mean().detach()


def td3bc_actor_loss(
    q_pi: Tensor, pi: Tensor, data_actions: Tensor, alpha: float, bc_weight: float = 1.0
) -> Tensor:
    """−λ·mean Q1(s, π(s)) + MSE(π(s), a_data): (B,), (B,A), (B,A) -> ()."""
    return -td3bc_lambda(q_pi, alpha) * q_pi.mean() + bc_weight * F.mse_loss(pi, data_actions)


@register
class TD3BC(ActorCritic):
    """TD3+BC: TD3 with a BC-regularised, Q-normalised deterministic actor."""

    name: ClassVar[str] = "td3bc"
    discrete: ClassVar[bool] = False
    online_form: ClassVar[str | None] = (
        "TD3: the BC weight decays linearly to 0 over the first online_bc_decay of fine-tuning, and the "
        "deterministic actor explores with Gaussian noise (std 0.1)"
    )
    Config: ClassVar[type] = TD3BCConfig
    config: TD3BCConfig

    def build(self) -> None:
        cfg = self.config
        self.nets["actor"] = nets.DeterministicActor(self.obs_dim, self.act_dim, cfg.actor_hidden)
        self.nets["actor_target"] = nets.freeze(
            nets.DeterministicActor(self.obs_dim, self.act_dim, cfg.actor_hidden)
        )
        self.build_critics(cfg.n_critics, cfg.critic_hidden)
        nets.hard_update(self.nets["actor_target"], self.nets["actor"])
        self.optimize("critic", self.critic, lr=cfg.critic_lr)
        self.optimize("actor", self.actor, lr=cfg.actor_lr)
        # Every update reports the same keys (the trainer averages per key): between actor steps the
        # actor's terms repeat the last actor step's values (zeros before any, e.g. after a resume).
        self._actor_metrics: dict[str, Tensor] = {}

    # -- accessors ---------------------------------------------------------------------------------
    @property
    def actor(self) -> nets.DeterministicActor:
        return self.nets["actor"]  # type: ignore[return-value]

    @property
    def actor_target(self) -> nets.DeterministicActor:
        return self.nets["actor_target"]  # type: ignore[return-value]

    def policy(self) -> TorchPolicy:
        return self._policy("deterministic", self.actor, self.config.actor_hidden)

    @torch.no_grad()
    def explore(self, obs: Tensor, exploration: float | None) -> Tensor:
        std = EXPLORATION_NOISE if exploration is None else exploration
        noise = nets.randn((obs.shape[0], self.act_dim), self.generator, obs.device) * std
        return (self.actor(obs) + noise).clamp(-1.0, 1.0)

    def online_settings(self, progress: float) -> dict[str, float]:
        # Held, the BC term ties the policy to the logged actions and caps what fine-tuning can add;
        # dropped at once, the actor follows a Q that is wrong outside the data and collapses (as in
        # Beeson & Montana 2022). A linear decay hands over from one to the other.
        decay = self.config.online_bc_decay
        weight = 0.0 if decay == 0 else max(0.0, 1.0 - progress / decay)
        return {"bc_weight": round(weight, 2)}  # in steps of 0.01: the config is rebuilt only then

    # -- losses ------------------------------------------------------------------------------------
    @torch.no_grad()
    def target_actions(self, next_obs: Tensor) -> Tensor:
        """Target policy smoothing: clip(π'(s′) + clipped noise, −1, 1): (B, obs_dim) -> (B, A)."""
        cfg = self.config
        pi_next = self.actor_target(next_obs)
        noise = smoothing_noise(pi_next.shape, cfg.policy_noise, cfg.noise_clip, self.generator, self.device)
        return (pi_next + noise).clamp(-1.0, 1.0)

    @torch.no_grad()
    def target(self, batch: Batch) -> Tensor:
        """TD target from the target critics at smoothed target-policy actions: (B,)."""
        next_obs = batch.next_obs.flatten(1)
        next_v = self.critic_target(next_obs, self.target_actions(next_obs)).min(0).values  # (B,)
        return td_target(batch.rewards, batch.terminals, next_v, self.config.gamma)

    def _critic_terms(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        q = self.critic(batch.obs.flatten(1), batch.actions)  # (E, B)
        loss = critic_loss(q, self.target(batch))
        return loss, {"critic_loss": loss.detach(), "q_mean": q.detach().mean()}

    def _actor_terms(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        obs = batch.obs.flatten(1)
        pi = self.actor(obs)
        # Only the first critic, its weights as constants: the actor loss moves the actor only, and the
        # other members are not evaluated (every ensemble weight has the member on its leading axis).
        first = {k: v.detach()[:1] for k, v in self.critic.named_parameters()}
        q1_pi = torch.func.functional_call(self.critic, first, (obs.unsqueeze(0), pi.unsqueeze(0)))[0]  # (B,)
        loss = td3bc_actor_loss(q1_pi, pi, batch.actions, self.config.alpha, self.config.bc_weight)
        with torch.no_grad():
            metrics = {
                "actor_loss": loss.detach(),
                "bc_loss": F.mse_loss(pi, batch.actions),
                "lambda": td3bc_lambda(q1_pi, self.config.alpha),
            }
        return loss, metrics

    def loss_terms(self, batch: Batch) -> dict[str, Tensor]:
        """Every loss term, graphs attached, nothing stepped; each key names the optimiser it drives."""
        return {"critic": self._critic_terms(batch)[0], "actor": self._actor_terms(batch)[0]}

    # -- update --------------------------------------------------------------------------------------
    def step_args(self) -> tuple[bool]:
        return (self._actor_turn(self.num_updates),)

    def _actor_turn(self, update: int) -> bool:
        """Whether update number ``update`` (from 0) steps the actor: a Python counter, no host sync."""
        return update % self.config.policy_freq == 0

    def after_update(self, metrics: dict[str, Tensor]) -> dict[str, Tensor]:
        if self._actor_turn(
            self.num_updates - 1
        ):  # steps without an actor update report the last actor step's metrics
            self._actor_metrics = {k: metrics.pop(k) for k in ACTOR_METRICS}
        actor_metrics = self._actor_metrics or {k: torch.zeros((), device=self.device) for k in ACTOR_METRICS}
        return {**metrics, **actor_metrics}

    def _step(self, batch: Batch, actor_turn: bool) -> dict[str, Tensor]:
        """One update on the device (host-side counters stay in :meth:`update`: it may be a CUDA graph)."""
        cfg = self.config
        loss, metrics = self._critic_terms(batch)
        step(self.optimizers["critic"], loss, self.critic.parameters(), cfg.max_grad_norm)
        if actor_turn:
            loss, actor_metrics = self._actor_terms(batch)
            step(self.optimizers["actor"], loss, self.actor.parameters(), cfg.max_grad_norm)
            nets.soft_update(self.actor_target, self.actor, cfg.tau)
            nets.soft_update(self.critic_target, self.critic, cfg.tau)
            metrics = {**metrics, **actor_metrics}
        return metrics
